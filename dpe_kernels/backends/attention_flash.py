"""The ``flash`` attention backend (FlashAttention 2, CUDA): a
``window_size=(w-1, 0)`` pass with the normal q/k and a causal pass on the
scaled keys cut ``w`` short, merged by log-sum-exp. It does not validate: its
caller has (:class:`~dpe_kernels.backends.shapes.AttentionInfo`)."""
from __future__ import annotations

import importlib.util
import sys

import torch

from ..merge import lse_from_flash_attn2, merge_partials
from ..utils import host_ints
from .shapes import AttentionInfo

__all__ = ["flash_attention", "available", "supports", "flash_module"]

_INF = float("inf")
_HAS_FLASH = importlib.util.find_spec("flash_attn") is not None


def flash_module():
    """The flash_attn module, or None. A module already imported wins;
    otherwise it is imported only if it is installed."""
    mod = sys.modules.get("flash_attn")
    if mod is not None:
        return mod
    if not _HAS_FLASH:
        return None
    try:
        import flash_attn  # noqa: F401

        return flash_attn
    except Exception:  # installed but broken (ABI mismatch): not available
        return None


def available(device: torch.device) -> bool:
    """FlashAttention 2 is CUDA-only: CUDA tensors and an importable flash_attn."""
    return device.type == "cuda" and flash_module() is not None


def supports(dtype, d: int, dv: int) -> bool:
    """What FA2 takes: float16/bfloat16, one head dim for q, k, v, at most 256."""
    return dtype in (torch.float16, torch.bfloat16) and d == dv and d <= 256


def _flash_heads_loop(call, q, k, v):
    """FA2 needs k and v with the same heads. With per-query-head scaled keys
    (H_q heads) and H_k-head values, run one MHA call per query-head residue r
    on strided head views (no copy). ``call(q, k, v) -> (out, lse[..., H])``."""
    h_q, h_v = q.shape[-2], v.shape[-2]
    if k.shape[-2] == h_v:
        return call(q, k, v)
    n_rep = h_q // h_v
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    for r in range(n_rep):
        o, l = call(q[..., r::n_rep, :], k[..., r::n_rep, :], v)
        out[..., r::n_rep, :] = o
        lse[..., r::n_rep] = l
    return out, lse


def flash_attention(qn, qs, kn, ks, v, window, scale, key_padding_mask, cu_q, cu_k, info: AttentionInfo):
    """``(out, lse)`` of DPE attention with FlashAttention 2 (inputs already validated)."""
    fa = flash_module()
    if not info.varlen:
        lengths = None
        if key_padding_mask is not None and info.S_k > 0:
            lengths = key_padding_mask.sum(1)
            if bool((lengths == info.S_k).all()):
                lengths = None
        if lengths is None:
            return _flash_batched(fa, qn, qs, kn, ks, v, window, scale, info)
        # Left-padded batch -> packed sequences (gather), varlen, scatter back.
        b, s_q, s_k = info.B, info.S_q, info.S_k
        q_keep = key_padding_mask[:, s_k - s_q:].reshape(-1).nonzero().squeeze(1)
        k_keep = key_padding_mask.reshape(-1).nonzero().squeeze(1)
        zero = torch.zeros(1, dtype=torch.int32, device=qn.device)
        cu_q = torch.cat([zero, torch.cumsum(lengths.clamp(max=s_q), 0).to(torch.int32)])
        cu_k = torch.cat([zero, torch.cumsum(lengths, 0).to(torch.int32)])

        def pack(t, keep):
            return t.reshape(-1, *t.shape[2:]).index_select(0, keep)

        o_p, l_p = _flash_varlen(fa, pack(qn, q_keep), pack(qs, q_keep), pack(kn, k_keep),
                                 pack(ks, k_keep), pack(v, k_keep), cu_q, cu_k, window, scale)
        out = qn.new_zeros((b * s_q, info.H_q, info.Dv))
        lse = torch.full((b * s_q, info.H_q), -_INF, dtype=torch.float32, device=qn.device)
        out.index_copy_(0, q_keep, o_p)
        lse.index_copy_(0, q_keep, l_p)
        return out.view(b, s_q, info.H_q, info.Dv), lse.view(b, s_q, info.H_q)
    return _flash_varlen(fa, qn, qs, kn, ks, v, cu_q, cu_k, window, scale)


def _flash_batched(fa, qn, qs, kn, ks, v, window, scale, info):
    s_k = info.S_k
    if info.S_q == 0 or info.B == 0:
        return (qn.new_zeros((*qn.shape[:-1], info.Dv)),
                torch.full(qn.shape[:-1], -_INF, dtype=torch.float32, device=qn.device))
    o_n, l_n, _ = fa.flash_attn_func(qn, kn, v, dropout_p=0.0, softmax_scale=scale, causal=True,
                                     window_size=(window - 1, 0), return_attn_probs=True)
    l_n = lse_from_flash_attn2(l_n)
    if s_k <= window:  # no key is ever beyond the window
        return o_n, l_n

    def call(q, k, vv):  # keys cut w short + bottom-right causal: query p sees n <= p - w
        o, l, _ = fa.flash_attn_func(q, k, vv, dropout_p=0.0, softmax_scale=scale, causal=True,
                                     return_attn_probs=True)
        return o, lse_from_flash_attn2(l)

    n = s_k - window
    o_s, l_s = _flash_heads_loop(call, qs, ks[:, :n], v[:, :n])
    return merge_partials(o_n, l_n, o_s, l_s)


def _flash_varlen(fa, qn, qs, kn, ks, v, cu_q, cu_k, window, scale):
    cq, ck = host_ints(cu_q), host_ints(cu_k)
    if qn.shape[0] == 0:
        return (qn.new_zeros((0, qn.shape[1], v.shape[-1])),
                torch.full((0, qn.shape[1]), -_INF, dtype=torch.float32, device=qn.device))
    cu_q32, cu_k32 = cu_q.to(torch.int32), cu_k.to(torch.int32)
    max_q = max(b - a for a, b in zip(cq, cq[1:]))
    max_k = max(b - a for a, b in zip(ck, ck[1:]))
    o_n, l_n, _ = fa.flash_attn_varlen_func(qn, kn, v, cu_q32, cu_k32, max_q, max_k, dropout_p=0.0,
                                            softmax_scale=scale, causal=True,
                                            window_size=(window - 1, 0), return_attn_probs=True)
    l_n = lse_from_flash_attn2(l_n)
    # Scaled pass: each sequence's keys cut w short (gathered: a copy of those keys).
    keep_len = [max(0, (b - a) - window) for a, b in zip(ck, ck[1:])]
    if sum(keep_len) == 0:
        return o_n, l_n
    idx = torch.cat([torch.arange(a, a + n, device=qn.device) for a, n in zip(ck, keep_len)])
    cu_s = torch.tensor([0] + list(_cumsum(keep_len)), dtype=torch.int32, device=qn.device)
    max_s = max(keep_len)

    def call(q, k, vv):
        o, l, _ = fa.flash_attn_varlen_func(q, k, vv, cu_q32, cu_s, max_q, max_s, dropout_p=0.0,
                                            softmax_scale=scale, causal=True, return_attn_probs=True)
        return o, lse_from_flash_attn2(l)

    o_s, l_s = _flash_heads_loop(call, qs, ks.index_select(0, idx), v.index_select(0, idx))
    return merge_partials(o_n, l_n, o_s, l_s)


def _cumsum(xs):
    tot = 0
    for x in xs:
        tot += x
        yield tot
