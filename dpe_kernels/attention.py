"""DPE attention: ``dpe_attention``, one causal softmax over two kinds of logits.

For a query at position ``m`` and a key at position ``n <= m`` (docs/method.md)::

    logit = <q_normal(m), k_normal(n)> * scale   if m - n <  window
          = <q_scaled(m), k_scaled(n)> * scale   if m - n >= window

Queries are the LAST ``S_q`` positions of the keys (bottom-right causal
alignment, the flash-attn convention), so one call covers prefill
(``S_q == S_k``), chunked prefill (``S_q < S_k``) and decode (``S_q == 1``).

This module is the API: it validates (:mod:`dpe_kernels.checks`) and dispatches
(:mod:`dpe_kernels.backends`: ``reference``, ``cpu``, ``flash``, ``triton``).
The log-sum-exp merge and the lse adapters live in :mod:`dpe_kernels.merge` and
are exported here.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import backends, checks
from .backends import ATTENTION_BACKENDS
from .merge import lse_from_flash_attn2, lse_from_flash_attn3, lse_from_flashinfer, merge_attention

__all__ = ["dpe_attention", "merge_attention", "lse_from_flash_attn2", "lse_from_flash_attn3", "lse_from_flashinfer",
           "available_attention_backends", "ATTENTION_BACKENDS"]


def available_attention_backends(device: torch.device | str = "cpu") -> list:
    """Attention backends that can run on tensors of ``device`` in this process."""
    return backends.available("attention", device)


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
    info = checks.attention_args(q_normal, q_scaled, k_normal, k_scaled, v, window, softmax_scale,
                                 key_padding_mask, cu_seqlens_q, cu_seqlens_k)
    name = backends.pick("attention", backend, q_normal.device, q_normal.dtype, info.D, info.Dv)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(info.D)
    return backends.run_attention(name, q_normal, q_scaled, k_normal, k_scaled, v, int(window), scale,
                                  key_padding_mask, cu_seqlens_q, cu_seqlens_k, info, return_lse)
