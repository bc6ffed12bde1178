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
