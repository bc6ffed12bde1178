"""dpe_attention (docs/method.md, "Attention"): the reference against a brute-force
construction of the formula, every non-Triton backend against the float64
oracle (tolerance rule of conftest), dispatch and bad input. The flash backend
runs against the fake ``flash_attn`` of fakes/flash_attn.py (conftest's
``fake_flash`` fixture). Backend-specific tests: backends/test_attention_*.py;
merge_attention and the lse adapters: test_merge.py."""
import math
import sys

import pytest
import torch

import dpe_kernels
from conftest import assert_attention_close, make_attention_inputs as make, run_attention as run
from dpe_kernels import available_attention_backends, dpe_attention
from dpe_kernels.reference import attention_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NEG_INF = float("-inf")


# --------------------------------------------------------------------------- reference vs brute force
def _brute_force(ins, window, scale, kpm=None):
    """The formula of docs/method.md with Python loops, float64, position by position."""
    qn, qs, kn, ks, v = (t.double() for t in ins)
    b_, s_q, h_q, _ = qn.shape
    s_k, h_k, h_ks = kn.shape[1], kn.shape[2], ks.shape[2]
    out = torch.zeros(b_, s_q, h_q, v.shape[-1], dtype=torch.float64)
    lse = torch.full((b_, s_q, h_q), NEG_INF, dtype=torch.float64)
    for b in range(b_):
        first = 0 if kpm is None else int((~kpm[b]).sum())  # left padding
        for j in range(s_q):
            m = s_k - s_q + j  # slot of the query; positions are slot - first
            if m < first:
                continue
            for h in range(h_q):
                hk, hs = h // (h_q // h_k), h // (h_q // h_ks)
                logits, vals = [], []
                for n in range(first, m + 1):
                    if (m - first) - (n - first) < window:
                        logits.append(float(qn[b, j, h] @ kn[b, n, hk]) * scale)
                    else:
                        logits.append(float(qs[b, j, h] @ ks[b, n, hs]) * scale)
                    vals.append(v[b, n, hk])
                mx = max(logits)
                w = [math.exp(x - mx) for x in logits]
                tot = sum(w)
                lse[b, j, h] = mx + math.log(tot)
                out[b, j, h] = sum(wi / tot * vi for wi, vi in zip(w, vals))
    return out, lse


@pytest.mark.parametrize("s_q,s_k,window", [(6, 6, 3), (3, 9, 4), (1, 7, 2), (5, 5, 8), (4, 6, 1)])
def test_reference_matches_brute_force(s_q, s_k, window):
    ins = make(2, s_q, s_k, 4, 2, 6, torch.float64, h_ks=4, dv=5)
    kpm = torch.ones(2, s_k, dtype=torch.bool)
    kpm[1, : s_k // 2] = False
    for mask in (None, kpm):
        o, l = attention_reference(*ins, window, 0.37, key_padding_mask=mask)
        bo, bl = _brute_force(ins, window, 0.37, mask)
        assert o.dtype == torch.float64 and l.dtype == torch.float64
        assert torch.allclose(o, bo, atol=1e-12, rtol=0)
        assert torch.equal(l == NEG_INF, bl == NEG_INF)
        fin = l != NEG_INF
        assert torch.allclose(l[fin], bl[fin], atol=1e-12, rtol=0)


def test_short_sequence_is_plain_rope_attention():
    """S <= w: only normal logits, i.e. plain causal softmax attention."""
    ins = make(1, 7, 7, 2, 2, 8, torch.float64)
    o, _ = attention_reference(*ins, 7, None)
    q, k, v = (t.transpose(1, 2) for t in (ins[0], ins[2], ins[4]))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    assert torch.allclose(o, ref, atol=1e-12)


# --------------------------------------------------------------------------- parity: prefill
BACKENDS = ["reference", "cpu", "flash"]
HEADS = [(2, 2, 2), (6, 2, 2), (6, 2, 6)]  # (H_q, H_k, heads of k_scaled): MHA, GQA 3:1, per-q-head k_scaled


def _dtypes_for(backend):
    return [torch.float16, torch.bfloat16] if backend == "flash" else DTYPES


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "flash":
        request.getfixturevalue("fake_flash")
    return request.param


@pytest.mark.parametrize("heads", HEADS, ids=lambda h: "x".join(map(str, h)))
@pytest.mark.parametrize("s,window", [(5, 8), (8, 8), (9, 8), (40, 8), (64, 1)])
def test_prefill(backend, heads, s, window):
    h_q, h_k, h_ks = heads
    for dtype in _dtypes_for(backend):
        ins = make(2, s, s, h_q, h_k, 16, dtype, h_ks=h_ks)
        out, lse = run(ins, window, backend)
        assert_attention_close(out, lse, ins, window)


def test_value_head_dim_differs():
    for dv in (5, 24):
        ins = make(2, 40, 40, 6, 2, 16, torch.float32, dv=dv)
        for backend in ("reference", "cpu"):
            out, lse = run(ins, 7, backend)
            assert out.shape == (2, 40, 6, dv)
            assert_attention_close(out, lse, ins, 7)


def test_softmax_scale(backend):
    dtype = _dtypes_for(backend)[0]
    ins = make(1, 30, 30, 4, 2, 16, dtype)
    out, lse = run(ins, 6, backend, softmax_scale=0.05)
    assert_attention_close(out, lse, ins, 6, softmax_scale=0.05)


# --------------------------------------------------------------------------- chunked prefill / decode
@pytest.mark.parametrize("window", [1, 16, 100, 400])
def test_chunked_prefill(backend, window):
    """Queries are the last S_q positions: several chunk sizes, each equal to
    the oracle and to the matching rows of the full prefill."""
    s_k = 300 if backend != "flash" else 120
    dtype = torch.float32 if backend != "flash" else torch.bfloat16
    ins = make(1, s_k, s_k, 6, 2, 16, dtype, h_ks=6)
    full, full_lse = run(ins, window, backend)
    for s_q in (1, 2, 7, 64, s_k - 1):
        chunk = (ins[0][:, -s_q:], ins[1][:, -s_q:], *ins[2:])
        out, lse = run(chunk, window, backend)
        assert_attention_close(out, lse, chunk, window)
        if dtype == torch.float32:
            assert torch.allclose(out, full[:, -s_q:], atol=1e-5)
            assert torch.allclose(lse, full_lse[:, -s_q:], atol=1e-5)


@pytest.mark.parametrize("s_k", [1, 15, 16, 17, 48, 200])
def test_decode(backend, s_k):
    """One query after a prefill, with the cache below, at, just past and far past the window."""
    window = 16
    for dtype in _dtypes_for(backend):
        ins = make(3, 1, s_k, 6, 2, 16, dtype, h_ks=2)
        out, lse = run(ins, window, backend)
        assert_attention_close(out, lse, ins, window)


@pytest.mark.parametrize("s,c,window", [(40, 10, 8), (100, 30, 32), (20, 20, 4)])
def test_prefill_equals_prefill_then_steps(backend, s, c, window):
    """Prefill of S tokens == prefill of S - c tokens, then c single-token decode steps."""
    dtype = torch.float32 if backend != "flash" else torch.bfloat16
    ins = make(2, s, s, 6, 2, 16, dtype)
    full, full_lse = run(ins, window, backend)
    outs, lses = [], []
    head = s - c
    if head:
        o, l = run((ins[0][:, :head], ins[1][:, :head], ins[2][:, :head], ins[3][:, :head], ins[4][:, :head]),
                   window, backend)
        outs.append(o)
        lses.append(l)
    for t in range(head, s):
        o, l = run((ins[0][:, t:t + 1], ins[1][:, t:t + 1], ins[2][:, :t + 1], ins[3][:, :t + 1],
                    ins[4][:, :t + 1]), window, backend)
        outs.append(o)
        lses.append(l)
    steps, steps_lse = torch.cat(outs, 1), torch.cat(lses, 1)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(steps.float(), full.float(), atol=tol, rtol=0)
    assert torch.allclose(steps_lse, full_lse, atol=tol, rtol=0)


# --------------------------------------------------------------------------- padding and varlen
@pytest.mark.parametrize("s_q", [1, 5, 24])
def test_left_padded_batch_equals_one_by_one(backend, s_q):
    s_k, window = 24, 6
    lengths = [24, 19, 3, 0]  # full, partly padded, shorter than S_q (padding queries), empty
    dtype = torch.float32 if backend != "flash" else torch.bfloat16
    ins = make(len(lengths), s_q, s_k, 6, 2, 16, dtype, h_ks=6)
    kpm = torch.zeros(len(lengths), s_k, dtype=torch.bool)
    for b, n in enumerate(lengths):
        kpm[b, s_k - n:] = True
    out, lse = run(ins, window, backend, key_padding_mask=kpm)
    assert_attention_close(out, lse, ins, window, key_padding_mask=kpm)
    for b, n in enumerate(lengths):
        nq = min(s_q, n)
        assert (out[b, : s_q - nq] == 0).all() and (lse[b, : s_q - nq] == NEG_INF).all()
        if nq == 0:
            continue
        one = (ins[0][b:b + 1, s_q - nq:], ins[1][b:b + 1, s_q - nq:], ins[2][b:b + 1, s_k - n:],
               ins[3][b:b + 1, s_k - n:], ins[4][b:b + 1, s_k - n:])
        o1, l1 = run(one, window, backend)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert torch.allclose(out[b, s_q - nq:].float(), o1[0].float(), atol=tol, rtol=0)
        assert torch.allclose(lse[b, s_q - nq:], l1[0], atol=1e-5, rtol=0)


def test_all_true_padding_mask_is_no_mask():
    ins = make(2, 10, 20, 4, 2, 16)
    kpm = torch.ones(2, 20, dtype=torch.bool)
    a = run(ins, 5, "cpu", key_padding_mask=kpm)
    b = run(ins, 5, "cpu")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_varlen_equals_per_sequence(backend, idx_dtype):
    window = 8
    seqs = [(5, 5), (1, 40), (0, 3), (30, 70), (9, 9)]  # (S_q, S_k) per sequence
    dtype = torch.float32 if backend != "flash" else torch.bfloat16
    t_q, t_k = sum(a for a, _ in seqs), sum(b for _, b in seqs)
    qn, qs = torch.randn(t_q, 6, 16).to(dtype), torch.randn(t_q, 6, 16).to(dtype)
    kn, ks, v = torch.randn(t_k, 2, 16).to(dtype), torch.randn(t_k, 6, 16).to(dtype), torch.randn(t_k, 2, 16).to(dtype)
    cu_q = torch.tensor([0] + [sum(a for a, _ in seqs[:i + 1]) for i in range(len(seqs))], dtype=idx_dtype)
    cu_k = torch.tensor([0] + [sum(b for _, b in seqs[:i + 1]) for i in range(len(seqs))], dtype=idx_dtype)
    ins = (qn, qs, kn, ks, v)
    out, lse = run(ins, window, backend, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert out.shape == (t_q, 6, 16) and lse.shape == (t_q, 6)
    assert_attention_close(out, lse, ins, window, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    for i, (sq, sk) in enumerate(seqs):
        if sq == 0:
            continue
        a, b = int(cu_q[i]), int(cu_k[i])
        one = (qn[None, a:a + sq], qs[None, a:a + sq], kn[None, b:b + sk], ks[None, b:b + sk], v[None, b:b + sk])
        o1, l1 = run(one, window, backend)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert torch.allclose(out[a:a + sq].float(), o1[0].float(), atol=tol, rtol=0)
        assert torch.allclose(lse[a:a + sq], l1[0], atol=1e-5, rtol=0)


def test_strided_views_of_packed_qkv():
    """q/k/v as views of one packed tensor (as a fused qkv projection gives) are read as they are."""
    qkv = torch.randn(2, 50, 6 + 6 + 2 + 2 + 2, 16)
    ins = (qkv[:, :, :6], qkv[:, :, 6:12], qkv[:, :, 12:14], qkv[:, :, 14:16], qkv[:, :, 16:18])
    for backend in ("reference", "cpu"):
        out, lse = run(ins, 9, backend)
        assert_attention_close(out, lse, ins, 9)
    packed = tuple(t[0] for t in ins)
    cu = torch.tensor([0, 20, 50])
    out, lse = run(packed, 9, "cpu", cu_seqlens_q=cu, cu_seqlens_k=cu)
    assert_attention_close(out, lse, packed, 9, cu_seqlens_q=cu, cu_seqlens_k=cu)


def test_empty_inputs():
    for ins in (make(0, 4, 4, 2, 2, 8), make(2, 0, 5, 2, 2, 8), make(2, 0, 0, 2, 2, 8)):
        for backend in ("reference", "cpu"):
            out, lse = run(ins, 3, backend)
            assert out.shape == (*ins[0].shape[:-1], 8) and lse.shape == ins[0].shape[:-1]


# --------------------------------------------------------------------------- backends and dispatch
def test_available_backends_cpu():
    avail = available_attention_backends("cpu")
    assert avail[:2] == ["reference", "cpu"]
    assert "flash" not in avail or "flash_attn" in sys.modules


def test_auto_picks_cpu_on_cpu_and_reference_for_float64():
    ins = make(1, 20, 20, 4, 2, 8)
    assert torch.equal(dpe_attention(*ins, 5), dpe_attention(*ins, 5, backend="cpu"))
    ins64 = tuple(t.double() for t in ins)
    out = dpe_attention(*ins64, 5)
    assert out.dtype == torch.float64
    assert torch.equal(out, dpe_attention(*ins64, 5, backend="reference"))


def test_return_lse_flag_and_exports():
    ins = make(1, 6, 6, 2, 2, 8)
    assert isinstance(dpe_attention(*ins, 3), torch.Tensor)
    assert len(dpe_attention(*ins, 3, return_lse=True)) == 2
    for name in ("dpe_attention", "merge_attention", "lse_from_flash_attn2", "lse_from_flash_attn3",
                 "lse_from_flashinfer", "available_attention_backends"):
        assert name in dpe_kernels.__all__ and hasattr(dpe_kernels, name)


# --------------------------------------------------------------------------- bad input
def _bad_cases():
    b, s, hq, hk, d = 2, 6, 4, 2, 8
    good = make(b, s, s, hq, hk, d)
    qn, qs, kn, ks, v = good
    packed = make(1, 6, 6, hq, hk, d, packed=True)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    right_pad = torch.ones(b, s, dtype=torch.bool)
    right_pad[0, -2:] = False
    holes = torch.ones(b, s, dtype=torch.bool)
    holes[1, 2] = False
    meta = kn.to("meta")
    return [
        # (args, kwargs, exception, match)
        ((qn.tolist(), qs, kn, ks, v, 3), {}, TypeError, "q_normal"),
        ((qn, qs, kn, ks, "v", 3), {}, TypeError, "v must be a torch.Tensor"),
        ((qn.long(), qs.long(), kn.long(), ks.long(), v.long()), {"window": 3}, TypeError, "q_normal"),
        ((qn, qs, kn, ks.half(), v, 3), {}, TypeError, "k_scaled"),
        ((qn, qs, kn, ks, v.double(), 3), {}, TypeError, "v must have the dtype"),
        (tuple(t.double() for t in good) + (3,), {"backend": "cpu"}, TypeError, "float64"),
        ((qn, qs, meta, ks, v, 3), {}, ValueError, "k_normal must be on the device"),
        ((qn[0], qs[0], kn[0], ks[0], v[0], 3), {}, ValueError, "q_normal must be .*cu_seqlens"),
        ((qn, qs[:, :-1], kn, ks, v, 3), {}, ValueError, "q_scaled"),
        ((qn, qs, kn[:1], ks[:1], v[:1], 3), {}, ValueError, "k_normal must have the batch"),
        ((qn, qs, kn[..., :4], ks, v, 3), {}, ValueError, "k_normal must have the head_dim"),
        ((qn, qs, kn, ks[..., :4], v, 3), {}, ValueError, "k_scaled must have the head_dim"),
        ((qn[:, :, :3], qs[:, :, :3], kn, ks, v, 3), {}, ValueError, "multiple of the number of k_normal heads"),
        ((qn, qs, kn, torch.randn(b, s, 3, d), v, 3), {}, ValueError, "k_scaled must have H_k"),
        ((qn, qs, kn, ks[:, :-1], v, 3), {}, ValueError, "k_scaled must have the token dims"),
        ((qn, qs, kn, ks, v[:, :-1], 3), {}, ValueError, "v must have the token dims"),
        ((qn, qs, kn, ks, torch.randn(b, s, hq, d), 3), {}, ValueError, "v must have the heads"),
        ((*good, 0), {}, ValueError, "window"),
        ((*good, -2), {}, ValueError, "window"),
        ((*good, 2.5), {}, TypeError, "window"),
        ((*good, True), {}, TypeError, "window"),
        ((*good, 3), {"softmax_scale": "x"}, TypeError, "softmax_scale"),
        ((*good, 3), {"softmax_scale": float("nan")}, ValueError, "softmax_scale"),
        ((qn, qs, kn[:, :3], ks[:, :3], v[:, :3], 3), {}, ValueError, "S_q"),
        ((*good, 3), {"backend": "cuda"}, ValueError, "backend must be one of"),
        ((*good, 3), {"backend": "flash"}, ValueError, "backend='flash' is not available"),
        ((*good, 3), {"key_padding_mask": right_pad}, ValueError, "key_padding_mask must be left-padded"),
        ((*good, 3), {"key_padding_mask": holes}, ValueError, "key_padding_mask must be left-padded"),
        ((*good, 3), {"key_padding_mask": right_pad.int()}, TypeError, "key_padding_mask"),
        ((*good, 3), {"key_padding_mask": right_pad[:, 1:]}, ValueError, "key_padding_mask must be"),
        ((*good, 3), {"key_padding_mask": [[True] * s] * b}, TypeError, "key_padding_mask"),
        ((*packed, 3), {"cu_seqlens_q": cu}, ValueError, "cu_seqlens_k is required"),
        ((*packed, 3), {"cu_seqlens_k": cu}, ValueError, "cu_seqlens_q is required"),
        ((*packed, 3), {"cu_seqlens_q": cu.float(), "cu_seqlens_k": cu}, TypeError, "cu_seqlens_q"),
        ((*packed, 3), {"cu_seqlens_q": cu, "cu_seqlens_k": cu[None]}, ValueError, "cu_seqlens_k must be"),
        ((*packed, 3), {"cu_seqlens_q": cu + 1, "cu_seqlens_k": cu}, ValueError, "cu_seqlens_q must start at 0"),
        ((*packed, 3), {"cu_seqlens_q": torch.tensor([0, 4, 2, 6]), "cu_seqlens_k": torch.tensor([0, 2, 4, 6])},
         ValueError, "cu_seqlens_q must start at 0 and be non-decreasing"),
        ((*packed, 3), {"cu_seqlens_q": cu, "cu_seqlens_k": torch.tensor([0, 2, 5])}, ValueError,
         "cu_seqlens_k must end"),
        ((*packed, 3), {"cu_seqlens_q": cu, "cu_seqlens_k": torch.tensor([0, 6])}, ValueError,
         "cu_seqlens_q and cu_seqlens_k must have the same length"),
        ((*packed, 3), {"cu_seqlens_q": torch.tensor([0, 3, 6]), "cu_seqlens_k": cu}, ValueError,
         "sequence 0 has S_q=3"),
        ((*packed, 3), {"cu_seqlens_q": cu, "cu_seqlens_k": cu, "key_padding_mask": right_pad}, ValueError,
         "key_padding_mask"),
        ((*good, 3), {"cu_seqlens_q": cu, "cu_seqlens_k": cu}, ValueError, "q_normal must be \\[T, H, D\\]"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input(case):
    args, kw, exc, match = _bad_cases()[case]
    with pytest.raises(exc, match=match):
        dpe_attention(*args, **kw)


def test_requires_grad():
    ins = list(make(1, 4, 4, 2, 2, 8))
    ins[3].requires_grad_(True)
    with pytest.raises(ValueError, match="k_scaled requires grad"):
        dpe_attention(*ins, 2)
    with torch.no_grad():
        out = dpe_attention(*ins, 2)
    assert not out.requires_grad
    with torch.inference_mode():
        dpe_attention(*make(1, 4, 4, 2, 2, 8), 2)
