"""The fused Triton DPE attention kernel (dpe_kernels/backends/attention_triton.py)
against the float64 oracle, with the tolerance rule of conftest.

Without a GPU the kernel runs under TRITON_INTERPRET=1 (set by conftest) with
16 x 16 tiles, so small shapes already cross every kind of key tile: scaled
only, straddling the window edge, normal below the diagonal, normal on the
diagonal. Sizes are kept tiny: the interpreter is slow.
"""
import pytest
import torch

from conftest import DEVICE, assert_attention_close, make_attention_inputs
from dpe_kernels.attention import available_attention_backends, dpe_attention

if "triton" not in available_attention_backends(DEVICE):
    pytest.skip("the triton attention backend does not run here (needs triton, and CUDA or "
                "TRITON_INTERPRET=1)", allow_module_level=True)

import dpe_kernels.backends.attention_triton as at  # noqa: E402
from dpe_kernels.backends.attention_triton import attention_triton  # noqa: E402

NEG_INF = float("-inf")
# (H_q, H_k, heads of k_scaled): per-KV-head k_scaled (query heads packed
# into one program) and per-query-head k_scaled (one program per query head)
GQA_PACKED = (3, 1, 1)
GQA_PER_Q = (3, 1, 3)


def make(b, s_q, s_k, heads, d, dtype=torch.float32, dv=None, packed=False):
    """(q_normal, q_scaled, k_normal, k_scaled, v): [B, S, H, D], or [T, H, D] when packed."""
    h_q, h_k, h_ks = heads
    dv = d if dv is None else dv
    lead_q, lead_k = ((s_q,), (s_k,)) if packed else ((b, s_q), (b, s_k))
    r = lambda *s: torch.randn(*s).to(device=DEVICE, dtype=dtype)  # noqa: E731
    return (r(*lead_q, h_q, d), r(*lead_q, h_q, d), r(*lead_k, h_k, d), r(*lead_k, h_ks, d),
            r(*lead_k, h_k, dv))


def scale_of(ins):
    return ins[0].shape[-1] ** -0.5


def run(ins, window, **kw):
    return attention_triton(*ins, window, scale_of(ins), return_lse=True, **kw)


def check(ins, window, **kw):
    out, lse = run(ins, window, **kw)
    assert_attention_close(out, lse, ins, window, softmax_scale=scale_of(ins), **kw)
    return out, lse


# --------------------------------------------------------------------------- prefill
@pytest.mark.parametrize("heads", [GQA_PACKED, GQA_PER_Q], ids=["gqa_packed", "gqa_per_q"])
@pytest.mark.parametrize("s,window", [
    (12, 16),  # shorter than the window: plain RoPE attention, normal tiles only
    (16, 16),  # exactly the window
    (40, 16),  # beyond, window a multiple of the tile
    (45, 7),   # beyond, window not a multiple of the tile: straddling tiles
    (33, 1),   # window 1: only the diagonal is normal
    (50, 20),
])
def test_prefill(heads, s, window):
    check(make(1, s, s, heads, 24), window)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    # head dim 24 (padded to 32) and a value head dim of its own (40)
    check(make(2, 37, 37, GQA_PACKED, 24, dtype, dv=40), 9)
    check(make(1, 30, 30, (2, 2, 2), 16, dtype), 5)


def test_head_dims():
    check(make(1, 20, 20, (2, 1, 2), 32, dv=5), 6)  # power-of-two D (no D mask), tiny Dv
    check(make(1, 20, 20, (1, 1, 1), 5, dv=16), 6)  # tiny D, power-of-two Dv


@pytest.mark.parametrize("block", [(32, 16), (16, 32), (64, 16)])
def test_other_tile_shapes(monkeypatch, block):
    """Query and key tiles of different sizes (as GPU configs use), with GQA rows
    (3 heads per position) that do not divide the tile."""
    monkeypatch.setattr(at, "_block_config", lambda *a: (*block, 4, 1))
    ins = make(1, 53, 53, GQA_PACKED, 16)
    for window in (1, 17, 31):
        check(ins, window)
    check(make(1, 7, 53, GQA_PER_Q, 16), 20)


# --------------------------------------------------------------------------- chunked prefill / decode
def test_chunked_prefill():
    """Queries are the last S_q positions: each chunk equals the oracle and the
    matching rows of the full prefill."""
    s_k, window = 50, 20
    ins = make(1, s_k, s_k, GQA_PER_Q, 16)
    full, full_lse = check(ins, window)
    for s_q in (1, 5, 16, 17, 49):
        chunk = (ins[0][:, -s_q:], ins[1][:, -s_q:], *ins[2:])
        out, lse = check(chunk, window)
        assert torch.allclose(out, full[:, -s_q:], atol=1e-5, rtol=0)
        assert torch.allclose(lse, full_lse[:, -s_q:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("s_k", [1, 15, 16, 17, 50])
def test_decode(s_k):
    """One query (GQA heads packed into one program) with the keys below, at,
    just past and far past the window."""
    check(make(3, 1, s_k, GQA_PACKED, 16, torch.float16), 16)


# --------------------------------------------------------------------------- split-KV
@pytest.mark.parametrize("num_splits", [1, 2, 3, 5])
@pytest.mark.parametrize("heads", [GQA_PACKED, GQA_PER_Q], ids=["gqa_packed", "gqa_per_q"])
def test_split_kv_decode(num_splits, heads):
    """Decode with the keys split into ranges (one program each, merged by
    log-sum-exp): every split count gives the oracle's answer, across the
    window edge, with left padding (a row whose keys all fall in the first
    splits, one with no key at all) and in half precision."""
    s_k, window = 70, 20
    lengths = [70, 33, 0]
    ins = make(len(lengths), 1, s_k, heads, 16)
    kpm = torch.zeros(len(lengths), s_k, dtype=torch.bool, device=DEVICE)
    for b, n in enumerate(lengths):
        kpm[b, s_k - n:] = True
    out, lse = run(ins, window, key_padding_mask=kpm, num_splits=num_splits)
    assert_attention_close(out, lse, ins, window, softmax_scale=scale_of(ins), key_padding_mask=kpm)
    assert (out[2] == 0).all() and (lse[2] == NEG_INF).all()
    one, one_lse = run(ins, window, key_padding_mask=kpm, num_splits=1)
    assert torch.allclose(out, one, atol=1e-5, rtol=0) and torch.allclose(lse, one_lse, atol=1e-5, rtol=0)
    half = make(2, 1, 45, heads, 16, torch.bfloat16)
    o, l = run(half, 9, num_splits=num_splits)
    assert_attention_close(o, l, half, 9, softmax_scale=scale_of(half))


def test_split_kv_varlen_and_prefill():
    """Packed sequences of different lengths (splits past a short sequence's
    end are empty) and a prefill tile split the same way; max_seqlen_* given
    (no host sync) or read from cu_seqlens."""
    seqs = [(1, 40), (3, 3), (1, 66), (20, 50)]
    t_q, t_k = sum(a for a, _ in seqs), sum(b for _, b in seqs)
    ins = make(None, t_q, t_k, GQA_PACKED, 16, packed=True)
    cu_q = torch.tensor([0] + [sum(a for a, _ in seqs[:i + 1]) for i in range(len(seqs))], device=DEVICE)
    cu_k = torch.tensor([0] + [sum(b for _, b in seqs[:i + 1]) for i in range(len(seqs))], device=DEVICE)
    kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    for extra in (dict(num_splits=4), dict(num_splits=3, max_seqlen_q=20, max_seqlen_k=66)):
        out, lse = run(ins, 8, **kw, **extra)
        assert_attention_close(out, lse, ins, 8, softmax_scale=scale_of(ins), **kw)


def test_split_kv_auto_and_bad_input():
    """None picks splits for a decode-sized grid (the interpreter's target is 4
    programs), and the merged result is the unsplit one; a bad count is refused."""
    from dpe_kernels.backends.triton_common import num_kv_splits

    assert num_kv_splits(1, 200, torch.device(DEVICE)) > 1
    ins = make(1, 1, 200, GQA_PACKED, 16)
    auto, auto_lse = run(ins, 30)
    one, one_lse = run(ins, 30, num_splits=1)
    assert torch.allclose(auto, one, atol=1e-5, rtol=0) and torch.allclose(auto_lse, one_lse, atol=1e-5, rtol=0)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="num_splits"):
            run(ins, 30, num_splits=bad)


# --------------------------------------------------------------------------- padding / varlen
@pytest.mark.parametrize("s_q", [1, 7, 30])
def test_left_padded_batch(s_q):
    s_k, window = 30, 6
    lengths = [30, 21, 3, 0]  # full, partly padded, shorter than S_q (padding queries), empty
    ins = make(len(lengths), s_q, s_k, GQA_PACKED, 16)
    kpm = torch.zeros(len(lengths), s_k, dtype=torch.bool, device=DEVICE)
    for b, n in enumerate(lengths):
        kpm[b, s_k - n:] = True
    out, lse = check(ins, window, key_padding_mask=kpm)
    for b, n in enumerate(lengths):
        nq = min(s_q, n)
        assert (out[b, : s_q - nq] == 0).all() and (lse[b, : s_q - nq] == NEG_INF).all()
        if nq == 0:
            continue
        one = (ins[0][b:b + 1, s_q - nq:], ins[1][b:b + 1, s_q - nq:], ins[2][b:b + 1, s_k - n:],
               ins[3][b:b + 1, s_k - n:], ins[4][b:b + 1, s_k - n:])
        o1, l1 = run(one, window)
        assert torch.allclose(out[b, s_q - nq:], o1[0], atol=1e-5, rtol=0)
        assert torch.allclose(lse[b, s_q - nq:], l1[0], atol=1e-5, rtol=0)


def test_left_padded_batch_bf16():
    kpm = torch.ones(2, 40, dtype=torch.bool, device=DEVICE)
    kpm[1, :23] = False
    check(make(2, 40, 40, GQA_PER_Q, 24, torch.bfloat16), 9, key_padding_mask=kpm)


@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("heads", [GQA_PACKED, GQA_PER_Q], ids=["gqa_packed", "gqa_per_q"])
def test_varlen(idx_dtype, heads):
    window = 8
    seqs = [(5, 5), (1, 40), (0, 3), (30, 50), (9, 9)]  # (S_q, S_k) per sequence
    t_q, t_k = sum(a for a, _ in seqs), sum(b for _, b in seqs)
    h_q, h_k, h_ks = heads
    ins = make(None, t_q, t_k, heads, 16, packed=True)
    cu_q = torch.tensor([0] + [sum(a for a, _ in seqs[:i + 1]) for i in range(len(seqs))],
                        dtype=idx_dtype, device=DEVICE)
    cu_k = torch.tensor([0] + [sum(b for _, b in seqs[:i + 1]) for i in range(len(seqs))],
                        dtype=idx_dtype, device=DEVICE)
    out, lse = check(ins, window, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert out.shape == (t_q, h_q, 16) and lse.shape == (t_q, h_q)
    for i, (sq, sk) in enumerate(seqs):
        if sq == 0:
            continue
        a, b = int(cu_q[i]), int(cu_k[i])
        one = tuple(t[None, a:a + sq] for t in ins[:2]) + tuple(t[None, b:b + sk] for t in ins[2:])
        o1, l1 = run(one, window)
        assert torch.allclose(out[a:a + sq], o1[0], atol=1e-5, rtol=0)
        assert torch.allclose(lse[a:a + sq], l1[0], atol=1e-5, rtol=0)


def test_varlen_half():
    cu = torch.tensor([0, 33, 40], dtype=torch.int32, device=DEVICE)
    ins = make(None, 40, 40, GQA_PACKED, 24, torch.float16, packed=True)
    check(ins, 10, cu_seqlens_q=cu, cu_seqlens_k=cu)


# --------------------------------------------------------------------------- layouts
def test_strided_views():
    """q/k/v as views of one packed tensor (a fused qkv projection), and a
    k_scaled with head-major strides, read in place."""
    qkv = torch.randn(2, 35, 3 + 3 + 1 + 1, 16, device=DEVICE)
    ks_t = torch.randn(2, 1, 35, 16, device=DEVICE).transpose(1, 2)  # [B, S, H, D], stride(1) = D
    ins = (qkv[:, :, :3], qkv[:, :, 3:6], qkv[:, :, 6:7], ks_t, qkv[:, :, 7:8])
    check(ins, 9)
    packed = tuple(t[0] for t in ins)
    cu = torch.tensor([0, 20, 35], device=DEVICE)
    check(packed, 9, cu_seqlens_q=cu, cu_seqlens_k=cu)


def test_huge_stride_fallback(monkeypatch):
    """Inputs whose in-tile offsets would not fit int32 are made contiguous
    first (forced here: such tensors are too large for a test)."""
    monkeypatch.setattr(at, "_fits_int32", lambda *a: False)
    qkv = torch.randn(1, 20, 5, 16, device=DEVICE)
    check((qkv[:, :, :2], qkv[:, :, 2:4], qkv[:, :, 4:5], qkv[:, :, 4:5], qkv[:, :, 4:5]), 4)


def test_return_lse_flag_and_empty():
    ins = make(1, 10, 10, (2, 1, 1), 16)
    out = attention_triton(*ins, 3, 0.25)
    assert isinstance(out, torch.Tensor)
    out2, lse = attention_triton(*ins, 3, 0.25, return_lse=True)
    assert torch.equal(out, out2) and lse.dtype == torch.float32 and lse.shape == (1, 10, 2)
    for e in (make(0, 4, 4, (2, 1, 1), 8), make(2, 0, 5, (2, 1, 1), 8)):
        o, l = attention_triton(*e, 3, 0.3, return_lse=True)
        assert o.shape == (*e[0].shape[:-1], 8) and l.shape == e[0].shape[:-1]


# --------------------------------------------------------------------------- integration
def test_through_dpe_attention():
    """dpe_attention(backend="triton") validates and dispatches here, with the
    default softmax scale."""
    ins = make(2, 9, 30, GQA_PACKED, 24)
    kpm = torch.ones(2, 30, dtype=torch.bool, device=DEVICE)
    kpm[0, :4] = False
    out, lse = dpe_attention(*ins, 11, key_padding_mask=kpm, return_lse=True, backend="triton")
    assert_attention_close(out, lse, ins, 11, key_padding_mask=kpm)
    ref = dpe_attention(*ins, 11, key_padding_mask=kpm, backend="reference")
    assert torch.allclose(out, ref, atol=1e-5, rtol=0)


def test_opcheck():
    ins = make(1, 5, 7, (2, 1, 1), 16)
    for splits in (0, 2):  # auto, and two key ranges merged by combine_splits_kernel
        torch.library.opcheck(torch.ops.dpe_kernels.attention_triton.default,
                              (*ins, 3, 0.25, None, None, None, 0, 0, splits, True))


def test_torch_compile_traces_without_graph_break():
    ins = make(1, 6, 6, (2, 1, 1), 16)

    def f(*t):
        return attention_triton(*t, 3, 0.25, return_lse=True)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    for x, y in zip(compiled(*ins), f(*ins)):
        assert torch.equal(x, y)


# --------------------------------------------------------------------------- compiled path
_COMPILE_SCRIPT = r'''
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import dpe_kernels.backends.attention_triton as at

assert not at.INTERPRETED
K = at._dpe_attn_fwd_kernel
names = K.arg_names
res = []
for arch, dt, d, dv, rows, group, pad, varlen, split in json.loads(sys.argv[1]):
    import torch
    tdt = getattr(torch, dt)
    bd, bdv = max(16, triton.next_power_of_2(d)), max(16, triton.next_power_of_2(dv))
    bm, bn, warps, stages = at._block_config(tdt, bd, bdv, rows, 232448 if arch >= 90 else 166912)
    ptr = "*" + {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[dt]
    const = dict(G=group, HEAD_DIM=d, HEAD_DIM_V=dv, HAS_PADDING=pad, VARLEN=varlen, RETURN_LSE=True,
                 SPLIT=split, BF16_BY_BITS=False, DOT_PRECISION="ieee" if dt == "float32" else "tf32",
                 BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DV=bdv)
    sig, attrs = {}, {}
    for i, n in enumerate(names):
        if n in const:
            sig[n] = "constexpr"
        elif n.endswith("_ptr"):
            sig[n] = {"lse_ptr": "*fp32", "po_ptr": "*fp32", "pl_ptr": "*fp32", "cu_q_ptr": "*i32",
                      "cu_k_ptr": "*i32", "kv_start_ptr": "*i32"}.get(n, ptr)
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[n] = "fp32" if n == "qk_scale" else "i64" if n.endswith("_sb") else "i32"
            if n.endswith(("_sb", "_ss", "_sh")) and not n.startswith("l_"):
                # as Triton specialises a launch with strides like H * D
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=K, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()},
                    attrs=attrs)
    c = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                       options=dict(num_warps=warps, num_stages=stages))
    est = at._smem_estimate(bm, bn, stages, bd, bdv, tdt.itemsize)
    res.append([arch, dt, c.metadata.shared, est, "cubin" in c.asm])
print(json.dumps(res))
'''


def test_compiles_for_gpu():
    """The interpreter accepts code compiled Triton rejects (e.g. loop-carried
    None): compile the kernel for sm_90 and sm_80 (no GPU needed, ptxas ships
    with Triton) in a fresh process without TRITON_INTERPRET, and check the
    shared-memory estimate the block-size heuristic relies on."""
    import json
    import os
    import subprocess
    import sys

    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as e:  # pragma: no cover - triton without its NVIDIA backend
        pytest.skip(f"triton's NVIDIA backend is not available: {e}")
    cases = [
        # arch, dtype, D, Dv, rows, G, padding, varlen, split-KV
        [90, "bfloat16", 128, 128, 4096, 4, True, False, False],  # prefill, pack GQA, left padding
        [80, "float16", 80, 64, 8, 8, False, True, True],         # decode-like rows, odd head dims, varlen, split
        [90, "bfloat16", 64, 64, 3, 3, True, False, True],        # decode, pack GQA, padding, split
        [90, "float32", 24, 24, 100, 1, False, False, False],     # IEEE fp32 dot, padded head dim
    ]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, json.dumps(cases)], capture_output=True,
                       text=True, env=env, timeout=600)
    if r.returncode != 0 and ("ptxas" in r.stderr and "not found" in r.stderr.lower()):
        pytest.skip("ptxas is not available")  # pragma: no cover
    assert r.returncode == 0, r.stderr[-4000:]
    for arch, dt, shared, est, has_cubin in json.loads(r.stdout.strip().splitlines()[-1]):
        assert has_cubin, (arch, dt)
        assert shared <= est, f"sm_{arch} {dt}: shared memory {shared} > estimate {est}"


def test_triton_dispatch(monkeypatch):
    """backend='triton' validates, then hands everything to attention_triton."""
    if "triton" not in available_attention_backends("cpu"):
        pytest.skip("triton backend not available here (needs triton, TRITON_INTERPRET=1 and "
                    "dpe_kernels.backends.attention_triton)")
    got = {}

    def stub(*args, **kw):
        got["args"], got["kw"] = args, kw
        return "result"

    monkeypatch.setattr(at, "attention_triton", stub)
    ins = make_attention_inputs(1, 6, 6, 4, 2, 8)
    assert dpe_attention(*ins, 3, return_lse=True, backend="triton") == "result"
    assert got["args"][5] == 3 and got["args"][6] == pytest.approx(8 ** -0.5)
    assert got["kw"]["return_lse"] is True and got["kw"]["key_padding_mask"] is None
    with pytest.raises(ValueError, match="window"):
        dpe_attention(*ins, 0, backend="triton")
