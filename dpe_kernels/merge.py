"""Log-sum-exp arithmetic of partial attentions (docs/method.md, "Attention"): the merge of two
passes over disjoint key sets, and adapters from other libraries' lse conventions to this
package's (natural log, ``[..., H]`` token-major, ``-inf`` for a row with no key).
:mod:`dpe_kernels.attention` exports the public names; the backends use
:func:`merge_partials` / :func:`merge_partials_nonempty` directly."""
from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["merge_attention", "merge_partials", "merge_partials_nonempty", "lse_from_flash_attn2",
           "lse_from_flash_attn3", "lse_from_flashinfer"]

_INF = float("inf")


# --------------------------------------------------------------------------- lse conventions
def _check_lse_arg(lse, min_dim: int):
    if not isinstance(lse, torch.Tensor):
        raise TypeError(f"lse must be a torch.Tensor, got {type(lse).__name__}")
    if not lse.is_floating_point():
        raise TypeError(f"lse must be a floating-point tensor, got {lse.dtype}")
    if lse.dim() < min_dim:
        raise ValueError(f"lse must have at least {min_dim} dims, got shape {list(lse.shape)}")


def lse_from_flash_attn2(lse: torch.Tensor) -> torch.Tensor:
    """FlashAttention 2 softmax_lse -> this package's lse.

    Reads FA2's convention: natural log, layout ``[B, H, S_q]``
    (``flash_attn_func``) or ``[H, T_q]`` (``flash_attn_varlen_func``), and a
    row with no key at all reported as ``+inf``. Returns float32
    ``[B, S_q, H]`` / ``[T_q, H]`` (contiguous), natural log, empty rows
    ``-inf``.
    """
    _check_lse_arg(lse, 2)
    x = lse.float().transpose(-1, -2).contiguous()
    return torch.where(x == _INF, -_INF, x)


def lse_from_flash_attn3(lse: torch.Tensor) -> torch.Tensor:
    """FlashAttention 3 softmax_lse -> this package's lse.

    Reads FA3's convention: natural log, layout ``[B, H, S_q]`` or ``[H, T_q]``
    (as FA2), a row with no key reported as ``-inf``. Returns float32
    ``[B, S_q, H]`` / ``[T_q, H]`` (contiguous), natural log, empty rows ``-inf``.
    """
    _check_lse_arg(lse, 2)
    return lse.float().transpose(-1, -2).contiguous()


def lse_from_flashinfer(lse: torch.Tensor) -> torch.Tensor:
    """FlashInfer lse -> this package's lse.

    Reads FlashInfer's convention: BASE-2 log, layout ``[T_q, H]`` (or
    ``[..., H]``: already token-major), a row with no key ``-inf``. Returns
    float32 of the same shape (a new tensor), natural log (``lse2 * ln 2``),
    empty rows ``-inf``.
    """
    _check_lse_arg(lse, 1)
    return lse.float() * math.log(2.0)


# --------------------------------------------------------------------------- merge
def merge_partials(out_a, lse_a, out_b, lse_b, out: Optional[torch.Tensor] = None):
    """Core of :func:`merge_attention`, no validation (the backends call it). lse_* float32 natural log
    ``[..., H]``; out_* ``[..., H, Dv]``. Writes into ``out`` if given."""
    la = lse_a.float()
    lb = lse_b.float()
    mx = torch.maximum(la, lb)
    # Both passes empty: mx is -inf; shift by 0 instead so no inf - inf.
    mx = torch.where(mx == -_INF, 0.0, mx)
    ea = torch.exp(la - mx)  # 0 for an empty row
    eb = torch.exp(lb - mx)
    tot = ea + eb
    lse = mx + torch.log(tot)  # -inf when both are empty
    tot = torch.where(tot == 0, 1.0, tot)
    ca = (ea / tot).unsqueeze(-1)  # exactly 1 when b is empty, 0 when a is empty
    cb = (eb / tot).unsqueeze(-1)
    res = torch.mul(out_a, ca)  # float32 (type promotion reads out_a in its own dtype)
    res.addcmul_(out_b, cb)
    if out is None:
        return res.to(out_a.dtype), lse
    out.copy_(res)
    return out, lse


def merge_partials_nonempty(out_a, lse_a, out_b, lse_b, out: Optional[torch.Tensor] = None):
    """:func:`merge_partials` for rows known to have keys in both passes (finite lse): fewer
    ops (the cpu backend merges block by block). Same float32 math."""
    d = lse_b - lse_a
    ca = torch.sigmoid(-d).unsqueeze(-1)  # exp(lse_a - lse)
    cb = torch.sigmoid(d).unsqueeze(-1)   # exp(lse_b - lse)
    res = torch.mul(out_a, ca)
    res.addcmul_(out_b, cb)
    lse = torch.logaddexp(lse_a, lse_b)
    if out is None:
        return res.to(out_a.dtype), lse
    out.copy_(res)
    return out, lse


def merge_attention(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                    lse_b: torch.Tensor):
    """Merge two partial attentions over disjoint key sets into one.

    Args:
        out_a, out_b: ``[..., H, Dv]`` partial outputs (each normalised over
            its own keys; a row with no key must be finite, e.g. 0, as every
            attention library writes).
        lse_a, lse_b: ``[..., H]``, NATURAL-log log-sum-exp of each pass's
            logits; ``-inf`` marks a row with no key (convert another
            library's lse first: :func:`lse_from_flash_attn2`, ...).

    Returns:
        ``(out, lse)``: ``lse = log(exp(lse_a) + exp(lse_b))`` in float32,
        ``out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b``
        computed in float32 and returned in ``out_a``'s dtype. A row empty in
        one pass merges to exactly the other pass; a row empty in both gives
        out 0 and lse ``-inf``; never NaN.
    """
    for name, t in (("out_a", out_a), ("lse_a", lse_a), ("out_b", out_b), ("lse_b", lse_b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.device != out_a.device:
            raise ValueError(f"{name} must be on the device of out_a ({out_a.device}), got {t.device}")
    if out_a.dim() < 2:
        raise ValueError(f"out_a must be [..., H, Dv], got shape {list(out_a.shape)}")
    if out_b.shape != out_a.shape:
        raise ValueError(f"out_b must have the shape of out_a {list(out_a.shape)}, got {list(out_b.shape)}")
    for name, t in (("lse_a", lse_a), ("lse_b", lse_b)):
        if t.shape != out_a.shape[:-1]:
            raise ValueError(f"{name} must be out_a's shape without the last dim "
                             f"{list(out_a.shape[:-1])}, got {list(t.shape)}")
    return merge_partials(out_a, lse_a, out_b, lse_b)
