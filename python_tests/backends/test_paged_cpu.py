"""backends/paged_cpu.py on its own: decode with vLLM's CPU block sizes, several gather chunks,
a query past position 2^20, and the compiled paged_decode kernel against the chunked fallback and
on unreadable metadata. Its parity over shapes runs in test_paged_attention.py (the ``cpu`` and
``cpu_chunked`` backend parameters)."""
import pytest
import torch

from conftest import DEVICE
from test_paged_attention import check, make_case


@pytest.mark.skipif(DEVICE != "cpu", reason="cpu backend")
@pytest.mark.parametrize("backend", ["cpu", "cpu_chunked"])
@pytest.mark.parametrize("bs", [64, 128])
@pytest.mark.parametrize("layout", ["head_major", "token_major"])
def test_cpu_decode_big_blocks(backend, bs, layout):
    """Block sizes of vLLM's CPU cache (a head-major cache with blocks >= 64
    is gathered head-major, one block per op entry), context over many chunks."""
    import dpe_kernels.backends.paged_cpu as pc

    lens = [3000, 130, 129, 1]
    args = make_case(lens, [1] * 4, bs=bs, layout=layout, h_q=4, h_k=2, d=16)
    assert pc.head_major(args[2]) == (layout == "head_major")
    check(backend, args, 100)


@pytest.mark.skipif(DEVICE != "cpu", reason="cpu backend")
def test_cpu_decode_small_chunks(monkeypatch):
    """Several gather chunks per pass, items of several blocks."""
    import dpe_kernels.backends.paged_cpu as pc

    monkeypatch.setattr(pc, "CHUNK_KEYS", 64)
    monkeypatch.setattr(pc, "ITEM_KEYS", 32)
    check("cpu_chunked", make_case([300, 77, 5], [1, 1, 1], bs=8, shared=3), 30)
    check("cpu_chunked", make_case([300, 77, 5], [1, 1, 1], bs=8, h_ks=6, layout="token_major"), 30)


@pytest.mark.skipif(DEVICE != "cpu", reason="cpu backend")
def test_cpu_decode_position_beyond_2_20():
    """A decode query past position 2^20 (the blocks repeat a few physical
    ones, as shared prefix blocks do): window and scaled passes at 1M keys."""
    bs, n = 1024, (1 << 20) + 37
    nl = -(-n // bs)
    kc, ksc, vc = (torch.randn(6, bs, 1, 16) for _ in range(3))
    bt = torch.randint(0, 6, (1, nl), dtype=torch.int32)
    qn, qs = torch.randn(1, 2, 16), torch.randn(1, 2, 16)
    args = (qn, qs, kc, ksc, vc, bt, torch.tensor([n], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32))
    for window in (1000, 5000):
        check("cpu", args, window)
        check("cpu_chunked", args, window)


needs_decode_kernel = pytest.mark.skipif(
    DEVICE != "cpu" or not __import__("dpe_kernels").ops.has_kernel("paged_decode", "CPU"),
    reason="the compiled CPU paged_decode kernel (the extension) is not loaded")


@needs_decode_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("d", [64, 128, 40], ids=lambda d: f"D{d}")  # 64 / 128: the compiled-size bodies
@pytest.mark.parametrize("h_ks", [2, 6], ids=["ks_per_kv_head", "ks_per_q_head"])
def test_compiled_decode_equals_the_fallback(dtype, d, h_ks):
    """The compiled kernel and the chunked fallback on one long case (many key
    splits, both passes, chunks crossing blocks of 48 keys): both within the
    oracle's bound (above) and close to each other."""
    args = make_case([2100, 700, 1], [1, 1, 1], bs=48, h_ks=h_ks, d=d, layout="head_major", dtype=dtype)
    a = check("cpu", args, 300)
    b = check("cpu_chunked", args, 300)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16 / fp16: each rounds its output once
    torch.testing.assert_close(a[0].float(), b[0].float(), rtol=tol, atol=tol)
    torch.testing.assert_close(a[1], b[1], rtol=tol, atol=tol)


@needs_decode_kernel
def test_compiled_decode_refuses_unreadable_metadata():
    """With check_inputs=False nothing is validated in Python; the kernel still
    never reads outside the cache: a block id past the cache, or a sequence
    longer than its block-table row, is a ValueError naming block_table."""
    qn, qs, kc, ksc, vc, bt, sl, qsl = make_case([40, 20], [1, 1], bs=8)
    op = torch.ops.dpe_kernels.paged_decode
    good = op(qn, qs, kc, ksc, vc, bt, sl, 9, 0.25, 40)
    assert good[0].shape == (2, 6, 16) and good[1].shape == (2, 6)
    bad_bt = bt.clone()
    bad_bt[0, 1] = kc.shape[0] + 7
    with pytest.raises(ValueError, match="block_table"):
        op(qn, qs, kc, ksc, vc, bad_bt, sl, 9, 0.25, 40)
    with pytest.raises(ValueError, match="block_table"):  # 8 * max_blocks keys at most
        op(qn, qs, kc, ksc, vc, bt, torch.tensor([8 * bt.shape[1] + 1, 20], dtype=torch.int32), 9, 0.25, 10 ** 4)
    with pytest.raises(ValueError, match="max_seqlen_k"):
        op(qn, qs, kc, ksc, vc, bt, sl, 9, 0.25, 39)
    with pytest.raises(TypeError, match="seq_lens"):
        op(qn, qs, kc, ksc, vc, bt, sl.long(), 9, 0.25, 40)
    with pytest.raises(TypeError, match="k_cache"):
        op(qn, qs, kc.double(), ksc, vc, bt, sl, 9, 0.25, 40)
    with pytest.raises(ValueError, match="window"):
        op(qn, qs, kc, ksc, vc, bt, sl, 0, 0.25, 40)
    with pytest.raises(ValueError, match="ks_cache"):
        op(qn, qs, kc, ksc[:, :4], vc, bt, sl, 9, 0.25, 40)


# --------------------------------------------------------------------------- unrotated keys (paged_decode_rotary)
needs_rotary_kernel = pytest.mark.skipif(
    DEVICE != "cpu" or not __import__("dpe_kernels").ops.has_kernel("paged_decode_rotary", "CPU"),
    reason="the compiled CPU paged_decode_rotary kernel (the extension) is not loaded")


def _rotary_gather(kw, **extra):
    """dpe_paged_attention_rotary(backend="cpu") with the compiled op hidden: the gather path
    (each sequence gathered, rotated in PyTorch, cpu attention)."""
    from unittest import mock

    import dpe_kernels.backends.paged_cpu as pc
    from dpe_kernels import dpe_paged_attention_rotary

    real = pc.ops.has_kernel
    with mock.patch.object(pc.ops, "has_kernel", lambda op, key: op != "paged_decode_rotary" and real(op, key)):
        return dpe_paged_attention_rotary(**kw, **extra, backend="cpu", return_lse=True)


# lens, configs (window, scales per pair of P = 8): several configurations in one batch, a long
# sequence (several key splits), sequences shorter than their window, one key
ROTARY_CASES = {
    "multi_config": ([700, 300, 45, 1, 129], [(64, [16, 16, 1, 1, 8, 8, 2, 2]), (5, [3, 3, 3, 1, 1, 2, 7, 7]),
                                              (1, [1] * 8)]),
    "long_splits": ([2100], [(300, [1, 2, 2, 4, 4, 4, 16, 16])]),
}


@needs_rotary_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "mask"])
@pytest.mark.parametrize("layout", ["neox", "gptj"])
@pytest.mark.parametrize("shape", ["d16", "d64_full_hm", "d64_r16_hm", "d16_r8_dv8_hm", "d40_r16_dv24"])
@pytest.mark.parametrize("case", sorted(ROTARY_CASES))
def test_compiled_rotary_decode_equals_the_gather_path(dtype, masked, layout, shape, case):
    """The compiled paged_decode_rotary (keys rotated as they are read) against the gather path,
    both close to each other and (neox) within the oracle's bound: dtypes, per-query-head masks,
    neox / gptj, rotary_dim < D, Dv != D, head-major caches (vLLM CPU), several configurations
    in one batch, several key splits. D 64 with rotary_dim 64 runs the vector rotation (P 32)."""
    from test_paged_attention_rotary import assert_close_to_oracle
    from test_paged_attention_rotary import make_case as make_rotary_case

    from dpe_kernels import dpe_paged_attention_rotary

    lens, configs = ROTARY_CASES[case]
    d, dv, rot, hm = {"d16": (16, 16, 16, False), "d64_full_hm": (64, 64, 64, True), "d64_r16_hm": (64, 64, 16, True),
                      "d16_r8_dv8_hm": (16, 8, 8, True), "d40_r16_dv24": (40, 24, 16, False)}[shape]
    p = rot // 2  # the 8 base scales, thinned (P 4) or widened (P 32) in runs
    configs = [(w, s[::2] if p == 4 else [x for x in s for _ in range(p // 8)]) for w, s in configs]
    kw, _ = make_rotary_case(lens, [1] * len(lens), bs=16, h_q=6, h_k=2, d=d, dv=dv, rotary_dim=rot, dtype=dtype,
                             configs=configs, masked=masked, head_major=hm)
    got = dpe_paged_attention_rotary(**kw, layout=layout, backend="cpu", return_lse=True)
    want = _rotary_gather(kw, layout=layout)
    if layout == "neox":
        assert_close_to_oracle(*got, kw)
    tol = 1e-5 if dtype == torch.float32 else 3e-2  # bf16 / fp16: the gather path rounds q, k once more
    torch.testing.assert_close(got[0].float(), want[0].float(), rtol=tol, atol=tol)
    torch.testing.assert_close(got[1], want[1], rtol=tol, atol=tol)


def _rotary_op_args(lens, **kw):
    from test_paged_attention_rotary import make_case as make_rotary_case

    kw, _ = make_rotary_case(lens, [1] * len(lens), **kw)
    return [kw["q"], kw["k_cache"], kw["v_cache"], kw["block_table"], kw["seq_lens"], kw["cos_sin"],
            kw["pair_scale"], kw["window"], kw["seq_config"], kw["mask"], kw["rotary_dim"], True, 0.25,
            max(lens)]


@needs_rotary_kernel
def test_compiled_rotary_decode_empty_sequence():
    """A sequence with 0 keys (called directly: dpe_paged_attention_rotary gives it no query)
    gets out 0 and lse -inf; its neighbours are unaffected."""
    op = torch.ops.dpe_kernels.paged_decode_rotary
    args = _rotary_op_args([40, 0, 20], configs=[(8, [1, 1, 2, 2, 4, 4, 8, 8]), (3, [2] * 8)], masked=True)
    out, lse = op(*args)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and (lse[1] == float("-inf")).all()
    assert torch.isfinite(lse[[0, 2]]).all()
    keep = [0, 2]
    args2 = list(args)
    for i in (0, 3, 4, 8):
        args2[i] = args[i][keep]
    out2, lse2 = op(*args2)
    torch.testing.assert_close(out2, out[keep], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse2, lse[keep], rtol=1e-6, atol=1e-6)


@needs_rotary_kernel
def test_compiled_rotary_decode_refuses_unreadable_metadata():
    """Values the kernel reads on the host are checked as read (no out-of-bounds read): a block id
    past the cache, a sequence past its row, a configuration past C, a scale or window < 1, a
    table shorter than a sequence: each a ValueError naming the argument."""
    op = torch.ops.dpe_kernels.paged_decode_rotary
    args = _rotary_op_args([40, 20], configs=[(8, [1, 1, 2, 2, 4, 4, 8, 8])], bs=8)
    good = op(*args)
    assert good[0].shape == (2, 4, 16) and good[1].shape == (2, 4)

    def bad(i, value, match, err=ValueError):
        a = list(args)
        a[i] = value
        with pytest.raises(err, match=match):
            op(*a)

    bt = args[3].clone()
    bt[0, 1] = args[1].shape[0] + 7
    bad(3, bt, "block_table")
    bt[0, 1] = -1
    bad(3, bt, "block_table")
    bad(4, torch.tensor([8 * args[3].shape[1] + 1, 20], dtype=torch.int32), "block_table")
    bad(13, 39, "max_seqlen_k")
    bad(8, torch.tensor([0, 1], dtype=torch.int32), "seq_config")
    bad(6, torch.zeros(1, 8, dtype=torch.int64), "pair_scale")
    bad(7, torch.tensor([0]), "window")
    bad(5, args[5][:30].contiguous(), "cos_sin")
    bad(4, args[4].long(), "seq_lens", TypeError)
    bad(1, args[1].double(), "k_cache", TypeError)
    bad(9, torch.ones(1, 2, 8, dtype=torch.bool), "mask")
    bad(10, 18, "rotary_dim")
