"""DPE attention (SPEC "Attention"): one causal softmax over two kinds of logits.

For a query at position ``m`` and a key at position ``n <= m``::

    logit = <q_normal(m), k_normal(n)> * scale   if m - n <  window
          = <q_scaled(m), k_scaled(n)> * scale   if m - n >= window

Queries are the LAST ``S_q`` positions of the keys (bottom-right causal
alignment, the flash-attn convention), so one call covers prefill
(``S_q == S_k``), chunked prefill (``S_q < S_k``) and decode (``S_q == 1``).

Backends:

* ``reference``: the full logit matrix, materialised (float64-capable); the
  test oracle. Small sizes only.
* ``cpu``: two passes of ``aten._scaled_dot_product_flash_attention_for_cpu``
  (a sliding-window pass with the normal q/k, block by block under a small
  band mask, and a causal pass on shifted scaled q/k), merged by
  log-sum-exp. No ``S x S`` matrix or mask; GQA without copying KV heads.
* ``flash``: FlashAttention 2 (optional, CUDA): a ``window_size=(w-1, 0)``
  pass and a causal pass on the scaled keys cut ``w`` short, merged.
* ``triton``: one fused kernel (``dpe_kernels.backends.attention_triton``).

The backends live in :mod:`dpe_kernels.backends`; the reference formula in
:mod:`dpe_kernels.reference`; the log-sum-exp merge and the lse adapters in
:mod:`dpe_kernels.merge` (exported here). This module holds the API and its
validation.

``merge_attention`` merges two partial attentions by their natural-log lse;
``lse_from_flash_attn2`` / ``lse_from_flash_attn3`` / ``lse_from_flashinfer``
convert other libraries' lse to that convention.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .merge import (lse_from_flash_attn2, lse_from_flash_attn3, lse_from_flashinfer, merge_attention,
                    merge_partials, merge_partials_nonempty)
from .reference import attention_reference
from .utils import REFERENCE_DTYPES, check_inference_only, check_window_and_scale, host_ints, triton_usable

__all__ = [
    "dpe_attention",
    "merge_attention",
    "merge_partials",
    "merge_partials_nonempty",
    "lse_from_flash_attn2",
    "lse_from_flash_attn3",
    "lse_from_flashinfer",
    "available_attention_backends",
    "attention_reference",
    "ATTENTION_BACKENDS",
    "AttentionInfo",
]

ATTENTION_BACKENDS = ("auto", "reference", "cpu", "flash", "triton")


# --------------------------------------------------------------------------- backend choice
def available_attention_backends(device: torch.device | str = "cpu") -> list:
    """Attention backends that can run on tensors of ``device`` in this process."""
    device = torch.device(device)
    out = ["reference"]
    from .backends import attention_cpu, attention_flash

    if attention_cpu.available(device):
        out.append("cpu")
    if attention_flash.available(device):
        out.append("flash")
    if triton_usable(device):
        out.append("triton")
    return out


def _pick_backend(backend, device, dtype, d, dv) -> str:
    if not isinstance(backend, str) or backend not in ATTENTION_BACKENDS:
        raise ValueError(f"backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    from .backends import attention_flash

    avail = available_attention_backends(device)
    if backend == "auto":
        if dtype == torch.float64:
            return "reference"
        if device.type == "cpu" and "cpu" in avail:
            return "cpu"
        if "flash" in avail and attention_flash.supports(dtype, d, dv):
            return "flash"
        if "triton" in avail and device.type == "cuda":
            return "triton"
        return "reference"
    if backend not in avail:
        why = {
            "cpu": "it needs CPU tensors (and torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)",
            "flash": "it needs CUDA tensors and the flash_attn package (FlashAttention 2)",
            "triton": "it needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU), the triton package "
                      "and dpe_kernels.backends.attention_triton",
        }.get(backend, "")
        raise ValueError(f"backend={backend!r} is not available for {device.type} tensors: {why}")
    if dtype == torch.float64 and backend != "reference":
        raise TypeError(f"q_normal is float64, which only backend='reference' supports "
                        f"(got backend={backend!r})")
    if backend == "flash" and not attention_flash.supports(dtype, d, dv):
        raise ValueError(f"backend='flash' needs float16/bfloat16 inputs, head_dim <= 256 and v's "
                         f"head_dim equal to q's; got {dtype}, head_dim={d}, v head_dim={dv}")
    return backend


# --------------------------------------------------------------------------- validation
class AttentionInfo:
    """What validation learnt of a call, handed to the backends: layout
    (``varlen``), sizes, and for the packed layout ``seqlens``, one
    ``(q_start, S_q, k_start, S_k)`` per sequence."""
    __slots__ = ("varlen", "B", "S_q", "S_k", "H_q", "H_k", "H_ks", "D", "Dv", "seqlens")

    def with_head_dims(self, dim: int) -> "AttentionInfo":
        """A copy with ``D = Dv = dim`` (the cpu backend pads q/k or v to one head dim)."""
        new = AttentionInfo()
        for k in AttentionInfo.__slots__:
            setattr(new, k, getattr(self, k))
        new.D = new.Dv = dim
        return new


def _check_inputs(q_normal, q_scaled, k_normal, k_scaled, v, window, softmax_scale,
                  key_padding_mask, cu_seqlens_q, cu_seqlens_k) -> AttentionInfo:
    names = ("q_normal", "q_scaled", "k_normal", "k_scaled", "v")
    tensors = (q_normal, q_scaled, k_normal, k_scaled, v)
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    dtype = q_normal.dtype
    if dtype not in REFERENCE_DTYPES:
        raise TypeError(f"q_normal must be float32, float16 or bfloat16 (float64 for "
                        f"backend='reference'), got {dtype}")
    for name, t in zip(names[1:], tensors[1:]):
        if t.dtype != dtype:
            raise TypeError(f"{name} must have the dtype of q_normal ({dtype}), got {t.dtype}")
    for name, t in zip(names[1:], tensors[1:]):
        if t.device != q_normal.device:
            raise ValueError(f"{name} must be on the device of q_normal ({q_normal.device}), got {t.device}")
    check_window_and_scale(window, softmax_scale)

    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    info = AttentionInfo()
    info.varlen = varlen
    info.seqlens = None
    if varlen:
        if cu_seqlens_q is None or cu_seqlens_k is None:
            missing = "cu_seqlens_q" if cu_seqlens_q is None else "cu_seqlens_k"
            raise ValueError(f"{missing} is required: the packed layout needs both cu_seqlens_q and "
                             "cu_seqlens_k")
        if key_padding_mask is not None:
            raise ValueError("key_padding_mask is for the batched layout; with cu_seqlens_q/cu_seqlens_k "
                             "(packed layout) the sequences carry no padding")
        ndim, layout = 3, "[T, H, D] (packed, with cu_seqlens)"
    else:
        ndim, layout = 4, "[B, S, H, D] (batched)"
    for name, t in zip(names, tensors):
        if t.dim() != ndim:
            hint = "" if varlen or t.dim() != 3 else ": pass cu_seqlens_q and cu_seqlens_k for [T, H, D]"
            raise ValueError(f"{name} must be {layout}, got shape {list(t.shape)}{hint}")
    lead_q = tuple(q_normal.shape[:-2])
    lead_k = tuple(k_normal.shape[:-2])
    h_q, d = q_normal.shape[-2], q_normal.shape[-1]
    h_k = k_normal.shape[-2]
    if q_scaled.shape != q_normal.shape:
        raise ValueError(f"q_scaled must have the shape of q_normal {list(q_normal.shape)}, "
                         f"got {list(q_scaled.shape)}")
    if not varlen and k_normal.shape[0] != q_normal.shape[0]:
        raise ValueError(f"k_normal must have the batch size of q_normal ({q_normal.shape[0]}), "
                         f"got shape {list(k_normal.shape)}")
    if d == 0:
        raise ValueError(f"q_normal must have head_dim >= 1, got shape {list(q_normal.shape)}")
    if k_normal.shape[-1] != d:
        raise ValueError(f"k_normal must have the head_dim of q_normal ({d}), got {k_normal.shape[-1]}")
    if h_k == 0 or h_q == 0 or h_q % h_k != 0:
        raise ValueError(f"the number of q heads ({h_q}) must be a positive multiple of the number of k_normal "
                         f"heads ({h_k})")
    if tuple(k_scaled.shape[:-2]) != lead_k:
        raise ValueError(f"k_scaled must have the token dims of k_normal {list(lead_k)}, "
                         f"got shape {list(k_scaled.shape)}")
    if k_scaled.shape[-2] not in (h_k, h_q):
        raise ValueError(f"k_scaled must have H_k={h_k} or H_q={h_q} heads, got {k_scaled.shape[-2]}")
    if k_scaled.shape[-1] != d:
        raise ValueError(f"k_scaled must have the head_dim of q_normal ({d}), got {k_scaled.shape[-1]}")
    if tuple(v.shape[:-2]) != lead_k:
        raise ValueError(f"v must have the token dims of k_normal {list(lead_k)}, got shape {list(v.shape)}")
    if v.shape[-2] != h_k:
        raise ValueError(f"v must have the heads of k_normal ({h_k}), got {v.shape[-2]}")
    if v.shape[-1] == 0:
        raise ValueError(f"v must have head_dim >= 1, got shape {list(v.shape)}")
    info.H_q, info.H_k, info.H_ks, info.D, info.Dv = h_q, h_k, k_scaled.shape[-2], d, v.shape[-1]

    check_inference_only("dpe_attention", zip(names, tensors))

    if varlen:
        t_q, t_k = lead_q[0], lead_k[0]
        for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, t_q), ("cu_seqlens_k", cu_seqlens_k, t_k)):
            if not isinstance(cu, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
            if cu.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"{name} must be int32 or int64, got {cu.dtype}")
            if cu.dim() != 1 or cu.shape[0] < 2:
                raise ValueError(f"{name} must be [B + 1] with B >= 1, got shape {list(cu.shape)}")
            if cu.device != q_normal.device:
                raise ValueError(f"{name} must be on the device of q_normal ({q_normal.device}), got {cu.device}")
        if cu_seqlens_q.shape != cu_seqlens_k.shape:
            raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length (B + 1), got "
                             f"{cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}")
        cq, ck = host_ints(cu_seqlens_q), host_ints(cu_seqlens_k)
        for name, cu, total in (("cu_seqlens_q", cq, t_q), ("cu_seqlens_k", ck, t_k)):
            if cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])):
                raise ValueError(f"{name} must start at 0 and be non-decreasing, got {cu}")
            if cu[-1] != total:
                tname = "q_normal" if name == "cu_seqlens_q" else "k_normal"
                raise ValueError(f"{name} must end at the number of tokens of {tname} ({total}), got {cu[-1]}")
        seqlens = []
        for b in range(len(cq) - 1):
            sq, sk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
            if sq > sk:
                raise ValueError(f"cu_seqlens_q/cu_seqlens_k: sequence {b} has S_q={sq} queries but only "
                                 f"S_k={sk} keys (queries are the last S_q keys, so S_q <= S_k)")
            seqlens.append((cq[b], sq, ck[b], sk))
        info.seqlens = seqlens
        info.B, info.S_q, info.S_k = len(seqlens), None, None
    else:
        info.B, info.S_q, info.S_k = q_normal.shape[0], q_normal.shape[1], k_normal.shape[1]
        if info.S_q > info.S_k:
            raise ValueError(f"q_normal has S_q={info.S_q} queries but k_normal only S_k={info.S_k} keys: "
                             "queries are the last S_q key positions, so S_q <= S_k")
        if key_padding_mask is not None:
            m = key_padding_mask
            if not isinstance(m, torch.Tensor):
                raise TypeError(f"key_padding_mask must be a torch.Tensor, got {type(m).__name__}")
            if m.dtype != torch.bool:
                raise TypeError(f"key_padding_mask must be a bool tensor (True = real token), got {m.dtype}")
            if tuple(m.shape) != (info.B, info.S_k):
                raise ValueError(f"key_padding_mask must be [B, S_k] = [{info.B}, {info.S_k}], "
                                 f"got {list(m.shape)}")
            if m.device != q_normal.device:
                raise ValueError(f"key_padding_mask must be on the device of q_normal ({q_normal.device}), "
                                 f"got {m.device}")
            if info.S_k > 1 and not torch.compiler.is_compiling():
                # Left padding: no True followed by False in a row (one reduction).
                if bool((m[:, :-1] & ~m[:, 1:]).any()):
                    raise ValueError("key_padding_mask must be left-padded: in every row the real tokens "
                                     "(True) must be contiguous and end at the last slot S_k - 1")
    return info


# --------------------------------------------------------------------------- public API
def dpe_attention(
    q_normal: torch.Tensor,
    q_scaled: torch.Tensor,
    k_normal: torch.Tensor,
    k_scaled: torch.Tensor,
    v: torch.Tensor,
    window: int,
    *,
    softmax_scale: Optional[float] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Causal DPE attention: normal logits inside the window, scaled beyond, one softmax.

    Args:
        q_normal, q_scaled: ``[B, S_q, H_q, D]`` (batched) or ``[T_q, H_q, D]``
            (packed, with ``cu_seqlens_*``), from :func:`dpe_rope`.
        k_normal: ``[B, S_k, H_k, D]`` / ``[T_k, H_k, D]``, ``H_q % H_k == 0``.
        k_scaled: like k_normal with ``H_k`` heads, or ``H_q`` when the
            key-dimension mask was per query head.
        v: ``[B, S_k, H_k, Dv]`` / ``[T_k, H_k, Dv]``.
        window: int ``>= 1``; key at distance ``< window`` uses the normal
            logits, ``>= window`` the scaled ones.
        softmax_scale: default ``1 / sqrt(D)``.
        key_padding_mask: batched layout only, bool ``[B, S_k]``, True = real
            token, LEFT padding (each row's real tokens are contiguous and end
            at slot ``S_k - 1``). Query row ``j`` of sequence ``b`` is padding
            when ``key_padding_mask[b, S_k - S_q + j]`` is False: out 0, lse -inf.
        cu_seqlens_q, cu_seqlens_k: packed layout, int32/int64 ``[B + 1]``
            (flash-attn varlen convention); each sequence's queries are the
            last ``S_q_b <= S_k_b`` positions of its keys.
        return_lse: also return the log-sum-exp.
        backend: ``"auto"`` (CPU tensors: cpu; CUDA: flash if installed and
            the dtype/head_dim fit, else triton), ``"reference"``, ``"cpu"``,
            ``"flash"``, ``"triton"``.

    Queries are the LAST ``S_q`` positions of the keys: prefill ``S_q == S_k``,
    chunked prefill ``S_q < S_k``, decode ``S_q == 1``.

    Returns:
        ``out`` ``[..., H_q, Dv]`` in the dtype of q (math in float32), or
        ``(out, lse)`` with ``lse`` float32 ``[B, S_q, H_q]`` / ``[T_q, H_q]``,
        natural log; a row with no key has out 0 and lse ``-inf``. (The
        reference backend given float64 inputs computes and returns float64.)

    Inference only: with grad mode on, an input that requires grad raises
    ValueError.
    """
    info = _check_inputs(q_normal, q_scaled, k_normal, k_scaled, v, window, softmax_scale,
                         key_padding_mask, cu_seqlens_q, cu_seqlens_k)
    name = _pick_backend(backend, q_normal.device, q_normal.dtype, info.D, info.Dv)
    window = int(window)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(info.D)
    if name == "triton":
        from .backends.attention_triton import attention_triton

        return attention_triton(q_normal, q_scaled, k_normal, k_scaled, v, window, scale,
                                key_padding_mask=key_padding_mask, cu_seqlens_q=cu_seqlens_q,
                                cu_seqlens_k=cu_seqlens_k, return_lse=return_lse)
    if name == "reference":
        out, lse = attention_reference(q_normal, q_scaled, k_normal, k_scaled, v, window, scale,
                                       key_padding_mask=key_padding_mask, cu_seqlens_q=cu_seqlens_q,
                                       cu_seqlens_k=cu_seqlens_k)
    elif name == "cpu":
        from .backends.attention_cpu import cpu_attention

        out, lse = cpu_attention(q_normal, q_scaled, k_normal, k_scaled, v, window, scale,
                                 key_padding_mask, info)
    else:
        from .backends.attention_flash import flash_attention

        out, lse = flash_attention(q_normal, q_scaled, k_normal, k_scaled, v, window, scale,
                                   key_padding_mask, cu_seqlens_q, cu_seqlens_k, info)
    return (out, lse) if return_lse else out
