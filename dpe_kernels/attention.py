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
* ``triton``: one fused kernel (``dpe_kernels.attention_triton``).

``merge_attention`` merges two partial attentions by their natural-log lse;
``lse_from_flash_attn2`` / ``lse_from_flash_attn3`` / ``lse_from_flashinfer``
convert other libraries' lse to that convention.
"""
from __future__ import annotations

import importlib.util
import math
import numbers
import sys
from typing import Optional

import torch

from .rope import _triton_usable, check_inference_only

__all__ = [
    "dpe_attention",
    "merge_attention",
    "lse_from_flash_attn2",
    "lse_from_flash_attn3",
    "lse_from_flashinfer",
    "available_attention_backends",
    "attention_reference",
    "ATTENTION_BACKENDS",
]

ATTENTION_BACKENDS = ("auto", "reference", "cpu", "flash", "triton")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INF = float("inf")

# Device types the flash backend runs on (FlashAttention 2 is CUDA-only; the
# tests widen this to run a fake flash_attn module on the CPU).
_FLASH_DEVICE_TYPES = ("cuda",)
_HAS_FLASH = importlib.util.find_spec("flash_attn") is not None
_CPU_OP = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)

# Window pass of the cpu backend: query rows per block, counted after folding
# the n_rep query heads of a KV head into the rows (256 rows: the aten
# kernel's 64-row tiles). A block of b positions attends to b + window - 1
# keys under a band mask, so about b logits per query are masked-out waste;
# folding keeps b small (256 / n_rep) while the kernel gets enough rows.
CPU_WINDOW_ROWS = 256


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
def _merge(out_a, lse_a, out_b, lse_b, out: Optional[torch.Tensor] = None):
    """Core of merge_attention, no validation. lse_* float32 natural log
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


def _merge_nonempty(out_a, lse_a, out_b, lse_b, out: Optional[torch.Tensor] = None):
    """_merge for rows known to have keys in both passes (finite lse): fewer
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
    return _merge(out_a, lse_a, out_b, lse_b)


# --------------------------------------------------------------------------- backends
def _flash_module():
    """The flash_attn module, or None. A module already in sys.modules (e.g.
    a test double) wins; otherwise it is imported only if it is installed."""
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


def available_attention_backends(device: torch.device | str = "cpu") -> list:
    """Attention backends that can run on tensors of ``device`` in this process."""
    device = torch.device(device)
    out = ["reference"]
    if device.type == "cpu" and _CPU_OP is not None:
        out.append("cpu")
    if device.type in _FLASH_DEVICE_TYPES and _flash_module() is not None:
        out.append("flash")
    if _triton_usable(device):
        out.append("triton")
    return out


def _flash_ok(dtype, d, dv) -> bool:
    return dtype in (torch.float16, torch.bfloat16) and d == dv and d <= 256


def _pick_backend(backend, device, dtype, d, dv) -> str:
    if not isinstance(backend, str) or backend not in ATTENTION_BACKENDS:
        raise ValueError(f"backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    avail = available_attention_backends(device)
    if backend == "auto":
        if dtype == torch.float64:
            return "reference"
        if device.type == "cpu" and "cpu" in avail:
            return "cpu"
        if "flash" in avail and _flash_ok(dtype, d, dv):
            return "flash"
        if "triton" in avail and device.type == "cuda":
            return "triton"
        return "reference"
    if backend not in avail:
        why = {
            "cpu": "it needs CPU tensors (and torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)",
            "flash": "it needs CUDA tensors and the flash_attn package (FlashAttention 2)",
            "triton": "it needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU), the triton package "
                      "and dpe_kernels.attention_triton",
        }.get(backend, "")
        raise ValueError(f"backend={backend!r} is not available for {device.type} tensors: {why}")
    if dtype == torch.float64 and backend != "reference":
        raise TypeError(f"q_normal is float64, which only backend='reference' supports "
                        f"(got backend={backend!r})")
    if backend == "flash" and not _flash_ok(dtype, d, dv):
        raise ValueError(f"backend='flash' needs float16/bfloat16 inputs, head_dim <= 256 and v's "
                         f"head_dim equal to q's; got {dtype}, head_dim={d}, v head_dim={dv}")
    return backend


# --------------------------------------------------------------------------- validation
class _Info:
    __slots__ = ("varlen", "B", "S_q", "S_k", "H_q", "H_k", "H_ks", "D", "Dv", "seqlens")


def _int_list(t: torch.Tensor) -> list:
    return [int(x) for x in t.tolist()]


def _check_inputs(q_normal, q_scaled, k_normal, k_scaled, v, window, softmax_scale,
                  key_padding_mask, cu_seqlens_q, cu_seqlens_k) -> _Info:
    names = ("q_normal", "q_scaled", "k_normal", "k_scaled", "v")
    tensors = (q_normal, q_scaled, k_normal, k_scaled, v)
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    dtype = q_normal.dtype
    if dtype not in _FLOAT_DTYPES + (torch.float64,):
        raise TypeError(f"q_normal must be float32, float16 or bfloat16 (float64 for "
                        f"backend='reference'), got {dtype}")
    for name, t in zip(names[1:], tensors[1:]):
        if t.dtype != dtype:
            raise TypeError(f"{name} must have the dtype of q_normal ({dtype}), got {t.dtype}")
    for name, t in zip(names[1:], tensors[1:]):
        if t.device != q_normal.device:
            raise ValueError(f"{name} must be on the device of q_normal ({q_normal.device}), got {t.device}")
    if isinstance(window, bool) or not isinstance(window, numbers.Integral):
        raise TypeError(f"window must be an int, got {type(window).__name__}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if softmax_scale is not None:
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
            raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
        if not math.isfinite(float(softmax_scale)):
            raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")

    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    info = _Info()
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
        cq, ck = _int_list(cu_seqlens_q), _int_list(cu_seqlens_k)
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
        from .attention_triton import attention_triton

        return attention_triton(q_normal, q_scaled, k_normal, k_scaled, v, window, scale,
                                key_padding_mask=key_padding_mask, cu_seqlens_q=cu_seqlens_q,
                                cu_seqlens_k=cu_seqlens_k, return_lse=return_lse)
    if name == "reference":
        out, lse = attention_reference(q_normal, q_scaled, k_normal, k_scaled, v, window, scale,
                                       key_padding_mask=key_padding_mask, cu_seqlens_q=cu_seqlens_q,
                                       cu_seqlens_k=cu_seqlens_k)
    elif name == "cpu":
        out, lse = _cpu_attention(q_normal, q_scaled, k_normal, k_scaled, v, window, scale,
                                  key_padding_mask, info)
    else:
        out, lse = _flash_attention(q_normal, q_scaled, k_normal, k_scaled, v, window, scale,
                                    key_padding_mask, cu_seqlens_q, cu_seqlens_k, info)
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------- reference
def attention_reference(q_normal, q_scaled, k_normal, k_scaled, v, window, softmax_scale=None, *,
                        key_padding_mask=None, cu_seqlens_q=None, cu_seqlens_k=None):
    """The SPEC formula with the full ``[B, H_q, S_q, S_k]`` logit matrix.

    KV heads are repeated per query head, both logit matrices are formed and
    selected by distance, causal/padding masked, one softmax. Computes in
    float64 for float64 inputs (returns float64 out and lse), else in float32
    (out in the dtype of q, lse float32). No validation: call
    :func:`dpe_attention` with ``backend="reference"`` for that. Small sizes only.
    """
    if cu_seqlens_q is not None:
        cq, ck = _int_list(cu_seqlens_q), _int_list(cu_seqlens_k)
        lse_dtype = torch.float64 if q_normal.dtype == torch.float64 else torch.float32
        out = q_normal.new_zeros((*q_normal.shape[:-1], v.shape[-1]))
        lse = torch.full(q_normal.shape[:-1], -_INF, dtype=lse_dtype, device=q_normal.device)
        for b in range(len(cq) - 1):
            qa, qb, ka, kb = cq[b], cq[b + 1], ck[b], ck[b + 1]
            if qb == qa:
                continue
            o, l = attention_reference(q_normal[None, qa:qb], q_scaled[None, qa:qb], k_normal[None, ka:kb],
                                       k_scaled[None, ka:kb], v[None, ka:kb], window, softmax_scale)
            out[qa:qb] = o[0]
            lse[qa:qb] = l[0]
        return out, lse

    cdt = torch.float64 if q_normal.dtype == torch.float64 else torch.float32
    b, s_q, h_q, d = q_normal.shape
    s_k = k_normal.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    dev = q_normal.device

    def heads(x):  # [B, S, h, X] -> [B, H_q, S, X] in cdt, KV heads copied per query head
        x = x.to(cdt).transpose(1, 2)
        return x.repeat_interleave(h_q // x.shape[1], dim=1) if x.shape[1] != h_q else x

    logit_n = heads(q_normal) @ heads(k_normal).transpose(-1, -2) * scale
    logit_s = heads(q_scaled) @ heads(k_scaled).transpose(-1, -2) * scale
    q_pos = torch.arange(s_q, device=dev) + (s_k - s_q)
    k_pos = torch.arange(s_k, device=dev)
    dist = q_pos[:, None] - k_pos[None, :]
    logits = torch.where(dist < window, logit_n, logit_s)
    allowed = (dist >= 0)[None, None]
    if key_padding_mask is not None:
        kpm = key_padding_mask.to(dev)
        allowed = allowed & kpm[:, None, None, :] & kpm[:, None, s_k - s_q:, None]
    logits = logits.masked_fill(~allowed, -_INF)
    lse = torch.logsumexp(logits, dim=-1)  # -inf for a row with no key
    probs = torch.exp(logits - torch.where(lse == -_INF, 0.0, lse)[..., None])
    out = probs @ heads(v)
    out_dtype = torch.float64 if cdt == torch.float64 else q_normal.dtype
    return out.transpose(1, 2).to(out_dtype), lse.transpose(1, 2).contiguous()


# --------------------------------------------------------------------------- cpu backend
def _op_cpu(q, k, v, scale, causal, mask=None):
    """aten._scaled_dot_product_flash_attention_for_cpu on ``[B, H, S, D]``
    tensors (any strides with a unit last stride, overlapping views included;
    one head_dim for q, k and v). Returns (out [B, H, S_q, D], lse [B, H, S_q]
    float32; a row whose keys are all masked gets lse 0, not -inf: callers
    never pass one)."""
    return _CPU_OP(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)


def _sdpa_cpu(q, k, v, scale, causal):
    """One attention call on ``[B, S, H, D]``-layout views (transposed to
    ``[B, H, S, D]`` without a copy; the op honours strides). ``k`` has H_k
    heads (native GQA: query head h reads KV head h // n_rep, no copy) or H_q
    heads with ``v`` at H_k (then one call per query-head residue r, on
    strided head views). Causal is top-left aligned. Returns ``(out [B, S_q,
    H_q, Dv], lse [B, S_q, H_q])`` (callers never pass a row without keys)."""
    h_q, h_k, h_v = q.shape[2], k.shape[2], v.shape[2]
    if h_k != h_v:  # per-query-head keys against per-KV-head values
        n_rep = h_q // h_v
        out = q.new_empty((*q.shape[:3], v.shape[-1]))
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        for r in range(n_rep):
            o, l = _sdpa_cpu(q[:, :, r::n_rep], k[:, :, r::n_rep], v, scale, causal)
            out[:, :, r::n_rep] = o
            lse[:, :, r::n_rep] = l
        return out, lse
    o, l = _op_cpu(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale, causal)
    return o.transpose(1, 2), l.transpose(1, 2)


_band_cache: dict = {}


def _band_mask(rows: int, window: int, n_rep: int, dtype, device) -> torch.Tensor:
    """``[n_rep * rows, rows + window - 1]`` additive mask, the ``[rows, rows +
    window - 1]`` band (row i sees columns i .. i + window - 1) stacked n_rep
    times. Column c of a block whose first query sits at position p is key
    p - window + 1 + c. Cached (a few per run)."""
    key = (rows, window, n_rep, dtype, str(device))
    m = _band_cache.get(key)
    if m is None:
        c = torch.arange(rows + window - 1, device=device)
        i = torch.arange(rows, device=device)[:, None]
        ok = (c >= i) & (c <= i + window - 1)
        m = torch.zeros(ok.shape, dtype=dtype, device=device).masked_fill_(~ok, -_INF)
        m = m.repeat(n_rep, 1)
        if len(_band_cache) > 16:
            _band_cache.clear()
        _band_cache[key] = m
    return m


def _cpu_window_pass(qn, kn, v, window, scale, off, out, lse):
    """Window pass (distances 0 .. w-1) of every query, written to out/lse.

    * Queries at positions p < w see every key 0 .. p: plain causal attention
      (one call, or a non-causal prefix call + a causal call when off > 0).
    * The other queries go in blocks of ``block`` positions; the block starting
      at position pa sees keys pa-w+1 .. pa+block-1 through one ``[block,
      block + w - 1]`` band mask (about ``block`` masked-out logits per query:
      the waste). All full blocks of a sequence run as ONE call: the blocks
      are the batch dimension, each block's keys an overlapping strided view
      of K and V (no copy), the band mask broadcast over the batch.
    * GQA: the n_rep query heads of one KV head are folded into the query axis
      of each block (one copy of q), so each block has n_rep * block rows per
      KV head: the kernel runs its efficient tile sizes while a block spans
      few positions.

    Few calls in all: on a busy CPU every parallel op waits for its threads.
    """
    bsz, s_q, h_q, d = qn.shape
    h_k, dv = kn.shape[2], v.shape[-1]
    n_rep = h_q // h_k
    # Rows [0, j_a): positions < w, all their keys are in the window.
    j_a = min(s_q, max(0, window - off))
    if j_a:
        if off == 0:
            o, l = _sdpa_cpu(qn[:, :j_a], kn[:, :j_a], v[:, :j_a], scale, True)
        elif j_a == 1:
            o, l = _sdpa_cpu(qn[:, :1], kn[:, : off + 1], v[:, : off + 1], scale, False)
        else:
            o_p, l_p = _sdpa_cpu(qn[:, :j_a], kn[:, :off], v[:, :off], scale, False)
            o_c, l_c = _sdpa_cpu(qn[:, :j_a], kn[:, off: off + j_a], v[:, off: off + j_a], scale, True)
            o, l = _merge_nonempty(o_p, l_p, o_c, l_c)
        out[:, :j_a] = o
        lse[:, :j_a] = l
    n_b = s_q - j_a
    if n_b == 0:
        return
    if n_b == 1:  # (decode) one query sees every key of its window: no mask
        ka = off + j_a - window + 1
        o, l = _sdpa_cpu(qn[:, j_a:], kn[:, ka:], v[:, ka:], scale, False)
        out[:, j_a:] = o
        lse[:, j_a:] = l
        return
    block = max(16, CPU_WINDOW_ROWS // n_rep)
    n_blk, rem = divmod(n_b, block)
    if n_blk == 0:
        block, n_blk, rem = n_b, 1, 0
    kb = block + window - 1  # keys per block
    ka0 = off + j_a - window + 1  # first key of the first block (>= 1)
    sb, ss, sh, sd = kn.stride()
    vb, vs, vh, vd = v.stride()

    def fold(q, nblk, rows):  # [B, nblk*rows, H_q, D] -> [B, nblk, H_k, n_rep*rows, D] (one copy)
        q = q.reshape(bsz, nblk, rows, h_k, n_rep, d).permute(0, 1, 3, 4, 2, 5).contiguous()
        return q.view(bsz, nblk, h_k, n_rep * rows, d)

    def unfold_into(rows_sl, o, l, nblk, rows):  # o [B, nblk, H_k, n_rep*rows, Dv] -> out rows
        out[:, rows_sl].view(bsz, nblk, rows, h_k, n_rep, dv).copy_(
            o.view(bsz, nblk, h_k, n_rep, rows, dv).permute(0, 1, 4, 2, 3, 5))
        lse[:, rows_sl].view(bsz, nblk, rows, h_k, n_rep).copy_(
            l.view(bsz, nblk, h_k, n_rep, rows).permute(0, 1, 4, 2, 3))

    mask = _band_mask(block, window, n_rep, qn.dtype, qn.device)
    qf = fold(qn[:, j_a: j_a + n_blk * block], n_blk, block)
    outs, lses = [], []
    for b in range(bsz):  # (the batch dim carries the blocks: one call per sequence)
        k_win = kn.as_strided((n_blk, h_k, kb, d), (block * ss, sh, ss, sd),
                              kn.storage_offset() + b * sb + ka0 * ss)
        v_win = v.as_strided((n_blk, h_k, kb, dv), (block * vs, vh, vs, vd),
                             v.storage_offset() + b * vb + ka0 * vs)
        o, l = _op_cpu(qf[b], k_win, v_win, scale, False, mask)
        outs.append(o)
        lses.append(l)
    o_all = outs[0].unsqueeze(0) if bsz == 1 else torch.stack(outs)
    l_all = lses[0].unsqueeze(0) if bsz == 1 else torch.stack(lses)
    unfold_into(slice(j_a, j_a + n_blk * block), o_all, l_all, n_blk, block)
    if rem:  # the last, partial block
        ja = j_a + n_blk * block
        ka = off + ja - window + 1
        o, l = _op_cpu(fold(qn[:, ja:], 1, rem)[:, 0], kn[:, ka:].transpose(1, 2), v[:, ka:].transpose(1, 2),
                       scale, False, _band_mask(rem, window, n_rep, qn.dtype, qn.device))
        unfold_into(slice(ja, s_q), o.unsqueeze(1), l.unsqueeze(1), 1, rem)


def _cpu_scaled_pass(qs, ks, v, window, scale, j0):
    """Scaled logits, queries j >= j0 (position p = S_k - S_q + j), keys n <= p - window.
    Returns (out, lse) for those S_q - j0 queries."""
    s_q, s_k = qs.shape[1], ks.shape[1]
    q = qs[:, j0:]
    n_keys = s_k - window  # keys 0 .. S_k - w - 1 are ever seen
    if j0 > 0:
        # First query (position w) sees key 0 only: square, top-left causal.
        return _sdpa_cpu(q, ks[:, :n_keys], v[:, :n_keys], scale, True)
    prefix = n_keys - s_q  # keys every query sees
    if s_q == 1 or prefix == 0:
        return _sdpa_cpu(q, ks[:, :n_keys], v[:, :n_keys], scale, s_q > 1)
    o_p, l_p = _sdpa_cpu(q, ks[:, :prefix], v[:, :prefix], scale, False)
    o_c, l_c = _sdpa_cpu(q, ks[:, prefix:n_keys], v[:, prefix:n_keys], scale, True)
    return _merge_nonempty(o_p, l_p, o_c, l_c)


def _cpu_dense(qn, qs, kn, ks, v, window, scale, out, lse):
    """All B rows the same length (no padding): writes out [B, S_q, H_q, Dv], lse [B, S_q, H_q]."""
    s_q, s_k = qn.shape[1], kn.shape[1]
    if s_q == 0 or qn.shape[0] == 0:  # (the aten op must never see an empty dim)
        return
    off = s_k - s_q  # position of query 0
    _cpu_window_pass(qn, kn, v, window, scale, off, out, lse)
    # Scaled pass (distances >= w): the queries at positions >= w (rows j >= j0),
    # merged in place by lse; rows before j0 keep the window pass alone.
    j0 = max(0, window - off)
    if j0 < s_q:
        o_s, l_s = _cpu_scaled_pass(qs, ks, v, window, scale, j0)
        _, l = _merge_nonempty(out[:, j0:], lse[:, j0:], o_s, l_s, out=out[:, j0:])
        lse[:, j0:] = l


def _with_dims(info, dim):
    new = _Info()
    for k in _Info.__slots__:
        setattr(new, k, getattr(info, k))
    new.D = new.Dv = dim
    return new


def _as_last_dim_contiguous(t):
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _cpu_attention(qn, qs, kn, ks, v, window, scale, key_padding_mask, info):
    qn, qs, kn, ks, v = (_as_last_dim_contiguous(t) for t in (qn, qs, kn, ks, v))
    if info.Dv != info.D:
        # The aten op wants one head_dim for q, k and v: zero-pad the narrower
        # side (a copy; zero dims change no logit and no output).
        pad = torch.nn.functional.pad
        if info.Dv < info.D:
            v = pad(v, (0, info.D - info.Dv))
        else:
            qn, qs, kn, ks = (pad(t, (0, info.Dv - info.D)) for t in (qn, qs, kn, ks))
        out, lse = _cpu_attention(qn, qs, kn, ks, v, window, scale, key_padding_mask,
                                  _with_dims(info, max(info.D, info.Dv)))
        return out[..., : info.Dv].contiguous(), lse
    out_shape = (*qn.shape[:-1], info.Dv)
    if info.varlen:
        out = qn.new_zeros(out_shape)
        lse = torch.full(qn.shape[:-1], -_INF, dtype=torch.float32, device=qn.device)
        for qa, sq, ka, sk in info.seqlens:
            if sq == 0:
                continue
            sl_q, sl_k = slice(qa, qa + sq), slice(ka, ka + sk)
            _cpu_dense(qn[None, sl_q], qs[None, sl_q], kn[None, sl_k], ks[None, sl_k], v[None, sl_k],
                       window, scale, out[None, sl_q], lse[None, sl_q])
        return out, lse
    s_q, s_k = info.S_q, info.S_k
    lengths = None
    if key_padding_mask is not None and s_k > 0:
        lengths = _int_list(key_padding_mask.sum(1))
        if all(n == s_k for n in lengths):
            lengths = None
    if lengths is None:
        out = qn.new_empty(out_shape)
        lse = torch.empty(qn.shape[:-1], dtype=torch.float32, device=qn.device)
        _cpu_dense(qn, qs, kn, ks, v, window, scale, out, lse)
        return out, lse
    out = qn.new_zeros(out_shape)
    lse = torch.full(qn.shape[:-1], -_INF, dtype=torch.float32, device=qn.device)
    for b, n in enumerate(lengths):  # left padding: row b's real tokens are its last n slots
        nq = min(s_q, n)
        if nq == 0:
            continue
        bs = slice(b, b + 1)
        _cpu_dense(qn[bs, s_q - nq:], qs[bs, s_q - nq:], kn[bs, s_k - n:], ks[bs, s_k - n:],
                   v[bs, s_k - n:], window, scale, out[bs, s_q - nq:], lse[bs, s_q - nq:])
    return out, lse


# --------------------------------------------------------------------------- flash backend
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


def _flash_attention(qn, qs, kn, ks, v, window, scale, key_padding_mask, cu_q, cu_k, info):
    fa = _flash_module()
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
    return _merge(o_n, l_n, o_s, l_s)


def _flash_varlen(fa, qn, qs, kn, ks, v, cu_q, cu_k, window, scale):
    cq, ck = _int_list(cu_q), _int_list(cu_k)
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
    return _merge(o_n, l_n, o_s, l_s)


def _cumsum(xs):
    tot = 0
    for x in xs:
        tot += x
        yield tot
