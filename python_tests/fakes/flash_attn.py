"""A fake ``flash_attn`` module with FlashAttention 2's semantics (bottom-right causal
alignment, window_size, +inf lse for rows without keys), float64 inside: the flash backend
runs against it on machines without flash-attn. conftest's ``fake_flash`` fixture installs
it; backends/test_attention_flash.py checks the fake itself."""
import types

import torch

NEG_INF = float("-inf")


def _fa2_one(q, k, v, scale, causal, window_size):
    """One sequence, FA2 semantics, float64: q [S_q, H_q, D], k/v [S_k, H_k, D]."""
    s_q, s_k, h_q, h_k = q.shape[0], k.shape[0], q.shape[1], k.shape[1]
    left, right = window_size
    if causal:
        right = 0
    i = torch.arange(s_q)[:, None]
    j = torch.arange(s_k)[None, :]
    ok = torch.ones(s_q, s_k, dtype=torch.bool)
    if right >= 0:
        ok &= j <= i + s_k - s_q + right
    if left >= 0:
        ok &= j >= i + s_k - s_q - left
    qd = q.double().transpose(0, 1)
    kd = k.double().transpose(0, 1).repeat_interleave(h_q // h_k, 0)
    vd = v.double().transpose(0, 1).repeat_interleave(h_q // h_k, 0)
    logits = (qd @ kd.transpose(-1, -2) * scale).masked_fill(~ok, NEG_INF)
    lse = torch.logsumexp(logits, -1)
    p = torch.exp(logits - torch.where(lse == NEG_INF, 0.0, lse)[..., None])
    out = (p @ vd).transpose(0, 1).to(q.dtype)
    return out, torch.where(lse == NEG_INF, float("inf"), lse).float()  # FA2: empty row lse = +inf


def _fa2_checks(q, k, v):
    assert q.dtype in (torch.float16, torch.bfloat16), "FA2 runs fp16/bf16 only"
    assert k.shape[-2] == v.shape[-2], "FA2 needs k and v with the same heads"
    assert q.shape[-2] % k.shape[-2] == 0
    assert q.shape[-1] == k.shape[-1] == v.shape[-1]
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1


def make_fake_flash_attn(calls):
    mod = types.ModuleType("flash_attn")

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                        softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
        _fa2_checks(q, k, v)
        assert dropout_p == 0.0
        calls.append(("func", causal, tuple(window_size)))
        scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
        res = [_fa2_one(q[b], k[b], v[b], scale, causal, window_size) for b in range(q.shape[0])]
        out = torch.stack([r[0] for r in res])
        lse = torch.stack([r[1] for r in res]).reshape(q.shape[0], q.shape[2], q.shape[1])  # [B, H, S_q]
        return (out, lse, None) if return_attn_probs else out

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                               softcap=0.0, alibi_slopes=None, deterministic=False,
                               return_attn_probs=False, block_table=None):
        _fa2_checks(q, k, v)
        assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32
        calls.append(("varlen", causal, tuple(window_size)))
        scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        assert max_seqlen_q == max(b - a for a, b in zip(cq, cq[1:]))
        assert max_seqlen_k == max(b - a for a, b in zip(ck, ck[1:]))
        out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype)
        lse = torch.full((q.shape[1], q.shape[0]), float("inf"))  # [H, T_q]
        for b in range(len(cq) - 1):
            if cq[b + 1] == cq[b]:
                continue
            o, l = _fa2_one(q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]], scale, causal,
                            window_size)
            out[cq[b]:cq[b + 1]] = o
            lse[:, cq[b]:cq[b + 1]] = l.reshape(q.shape[1], -1)
        return (out, lse, None) if return_attn_probs else out

    mod.flash_attn_func = flash_attn_func
    mod.flash_attn_varlen_func = flash_attn_varlen_func
    return mod
