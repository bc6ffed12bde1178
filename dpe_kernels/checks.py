"""Argument checks of every public op, in one place: one rule per helper, each raising
TypeError (wrong type or dtype) or ValueError (shape, device, value) naming the argument.

The public functions call these once, then run the chosen backend; no backend checks its
arguments again. What this is not: no dispatch (:mod:`dpe_kernels.backends`) and no math.
Checks that read tensor values on the host (a device sync on CUDA) are kept apart
(``*_values``) so that ``check_inputs=False`` can skip them.
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable, Optional, Tuple

import torch

from .backends.shapes import AttentionInfo, PagedInfo
from .config import DPEConfig
from .utils import FLOAT_DTYPES, REFERENCE_DTYPES, host_ints, is_int, scaled_key_heads

__all__ = ["tensor", "same_dtype", "same_device", "unit_stride", "flag", "inference_only", "window_and_scale",
           "opt_int", "MAX_EXACT_POSITION", "LAYOUTS", "rope_mask", "rope_args", "rope_values", "rope_out",
           "inplace_out", "rope_cache_args", "attention_args", "key_padding_mask", "paged_args", "paged_values",
           "cache_append", "rotary_table_args", "paged_rotary_args", "paged_rotary_values"]

# float32 holds every integer only below 2^24: from there on neighbouring positions share one angle.
MAX_EXACT_POSITION = 1 << 24
LAYOUTS = ("neox", "gptj")
_INDEX_DTYPES = (torch.int32, torch.int64)


# --------------------------------------------------------------------------- one rule each
def tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def same_dtype(name, t, ref, dtype):
    if t.dtype != dtype:
        raise TypeError(f"{name} must have the dtype of {ref} ({dtype}), got {t.dtype}")


def same_device(name, t, ref, device):
    if t.device != device:
        raise ValueError(f"{name} must be on the device of {ref} ({device}), got {t.device}")


def unit_stride(name, t):
    if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have stride 1 on its last (head_dim) dimension, got strides "
                         f"{tuple(t.stride())}")


def flag(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def opt_int(name, x):
    if x is not None and not is_int(x):
        raise TypeError(f"{name} must be an int or None, got {type(x).__name__}")
    if x is not None and x < 0:
        raise ValueError(f"{name} must be >= 0, got {x}")


def inference_only(op: str, named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> None:
    """No autograd formulas: with grad mode on, an input that requires grad raises (under
    no_grad / inference_mode such inputs are accepted and the outputs do not require grad)."""
    if torch.is_grad_enabled():
        for name, t in named_tensors:
            if t.requires_grad:
                raise ValueError(
                    f"{op} is inference-only (no autograd) and {name} requires grad: call it under "
                    "torch.no_grad() or torch.inference_mode(), or pass detached tensors")


def window_and_scale(window, softmax_scale) -> None:
    """``window`` an int >= 1, ``softmax_scale`` None or a finite float."""
    if isinstance(window, bool) or not isinstance(window, numbers.Integral):
        raise TypeError(f"window must be an int, got {type(window).__name__}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if softmax_scale is not None:
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
            raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
        if not math.isfinite(float(softmax_scale)):
            raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")


def _float_inputs(named, index=()):
    """Tensors of one float dtype (float64 for the reference too) and one device, the first's;
    ``index``: tensors on that device too. Returns ``(dtype, device)``."""
    for name, t in (*named, *index):
        tensor(name, t)
    first, t0 = named[0]
    if t0.dtype not in REFERENCE_DTYPES:
        raise TypeError(f"{first} must be float32, float16 or bfloat16 (float64 for "
                        f"backend='reference'), got {t0.dtype}")
    for name, t in named[1:]:
        same_dtype(name, t, first, t0.dtype)
    for name, t in (*named[1:], *index):
        same_device(name, t, first, t0.device)
    return t0.dtype, t0.device


def _view(name, o, shape, like):
    """An output / cache view: a tensor of ``like``'s dtype and device, ``shape``, stride 1 on head_dim."""
    tensor(name, o)
    same_dtype(name, o, "q", like.dtype)
    if tuple(o.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(o.shape)}")
    same_device(name, o, "q", like.device)
    unit_stride(name, o)


# --------------------------------------------------------------------------- rope
def rope_mask(config, mask, layer):
    """This layer's mask: ``mask=``, or ``config.layer_mask(layer)``."""
    if mask is None and layer is not None:
        if not isinstance(config, DPEConfig):
            raise TypeError(f"config must be a DPEConfig, got {type(config).__name__}")
        if config.mask is None:
            raise ValueError("layer was given but config has no mask")
        return config.layer_mask(layer)
    if mask is not None and layer is not None:
        raise ValueError("pass either mask or layer, not both")
    if isinstance(config, DPEConfig) and config.mask is not None and mask is None:
        raise ValueError("config has a per-layer mask: pass layer= (or this layer's mask=)")
    return mask


def rope_args(q, k, positions, inv_freq, config, mask, layout, rotary_dim, op="dpe_rope") -> int:
    """Metadata checks of the rotary step (no host read); returns ``rotary_dim``."""
    for name, t in (("q", q), ("k", k), ("positions", positions), ("inv_freq", inv_freq)):
        tensor(name, t)
    if not isinstance(config, DPEConfig):
        raise TypeError(f"config must be a DPEConfig, got {type(config).__name__}")
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q must be float32, float16 or bfloat16, got {q.dtype}")
    same_dtype("k", k, "q", q.dtype)
    if q.dim() not in (3, 4):
        raise ValueError(f"q must be [T, H_q, D] or [B, S, H_q, D], got shape {list(q.shape)}")
    if k.dim() != q.dim() or k.shape[:-2] != q.shape[:-2]:
        raise ValueError(f"k must have the token dims of q {list(q.shape[:-2])}, got shape {list(k.shape)}")
    hq, hk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    if k.shape[-1] != d:
        raise ValueError(f"k must have the head_dim of q ({d}), got {k.shape[-1]}")
    if hk == 0 or hq % hk != 0:
        raise ValueError(f"the number of q heads ({hq}) must be a multiple of the number of k heads ({hk})")
    unit_stride("q", q)
    unit_stride("k", k)
    for name, t in (("k", k), ("positions", positions), ("inv_freq", inv_freq)):
        same_device(name, t, "q", q.device)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'neox' or 'gptj', got {layout!r}")
    rotary_dim = d if rotary_dim is None else rotary_dim
    if not is_int(rotary_dim):
        raise TypeError(f"rotary_dim must be an int, got {type(rotary_dim).__name__}")
    if rotary_dim < 2 or rotary_dim % 2 or rotary_dim > d:
        raise ValueError(f"rotary_dim must be even and in [2, head_dim={d}], got {rotary_dim}")
    npairs = rotary_dim // 2
    if inv_freq.dtype != torch.float32:
        raise TypeError(f"inv_freq must be float32, got {inv_freq.dtype}")
    if inv_freq.dim() != 1 or inv_freq.shape[0] != npairs:
        raise ValueError(f"inv_freq must be [rotary_dim / 2] = [{npairs}], got {list(inv_freq.shape)}")
    if config.num_pairs != npairs:
        raise ValueError(f"config.group_boundaries must cover the {npairs} pairs of rotary_dim={rotary_dim}, "
                         f"they end at {config.num_pairs}")
    if positions.dtype not in _INDEX_DTYPES:
        raise TypeError(f"positions must be int32 or int64, got {positions.dtype}")
    if q.dim() == 3 and positions.shape != (q.shape[0],):
        raise ValueError(f"positions must be [T] = [{q.shape[0]}] for q of shape {list(q.shape)}, "
                         f"got {list(positions.shape)}")
    if q.dim() == 4:
        b, s = q.shape[:2]
        if positions.dim() != 2 or positions.shape[1] != s or positions.shape[0] not in (1, b):
            raise ValueError(f"positions must be [B, S] = [{b}, {s}] (or [1, {s}]), got {list(positions.shape)}")
    if mask is not None:
        tensor("mask", mask)
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
        if mask.dim() != 2 or mask.shape[1] != npairs or mask.shape[0] not in (hq, hk):
            raise ValueError(f"mask must be [H_q={hq} or H_k={hk}, P={npairs}], got {list(mask.shape)}")
        same_device("mask", mask, "q", q.device)
    inference_only(op, (("q", q), ("k", k)))
    return rotary_dim


def rope_values(positions, inv_freq) -> None:
    """``0 <= positions < 2^24`` and a finite ``inv_freq``: reads values on the host."""
    if torch.compiler.is_compiling():
        return
    if positions.numel():
        lo, hi = torch.aminmax(positions)
        if int(lo) < 0:
            raise ValueError(f"positions must be non-negative, got a minimum of {int(lo)}")
        if int(hi) >= MAX_EXACT_POSITION:
            raise ValueError(
                f"positions must be below 2^24 = {MAX_EXACT_POSITION} (float32 holds every integer "
                f"only up to there, so neighbouring positions would share one angle), got {int(hi)}; "
                "pass check_inputs=False to rotate them anyway, rounded as Hugging Face rounds them")
    if not bool(torch.isfinite(inv_freq).all()):
        raise ValueError("inv_freq must be finite (no NaN or inf)")


def inplace_out(out, q, k, mask):
    """The ``out`` of ``inplace=True``: (q, k, q_scaled, k_scaled)."""
    if out is None:
        ks_shape = (*q.shape[:-2], scaled_key_heads(k.shape[-2], mask), q.shape[-1])
        return (q, k, torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(ks_shape))
    if not isinstance(out, (tuple, list)) or len(out) != 4:
        raise TypeError("out must be a tuple (q_normal, k_normal, q_scaled, k_scaled)")
    for name, o, t in (("q_normal", out[0], q), ("k_normal", out[1], k)):
        if o is not None and o is not t:
            raise ValueError(f"inplace=True writes {name} over its input: out.{name} must be None or that "
                             "input itself")
    return (q, k, out[2], out[3])


def _span(t: torch.Tensor):
    """Byte range [lo, hi) that a tensor's elements occupy (metadata only; empty -> None)."""
    if t.numel() == 0:
        return None
    extent = sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (extent + 1) * t.element_size()


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.device == b.device)


def _no_overlap(outputs, inputs, in_place):
    """No output may overlap the memory of an input, except an output that is exactly its own
    input (``in_place``: output name -> input name; same offset, shape and strides). Byte
    ranges are compared (metadata only), so an output interleaved with an input counts as
    overlapping. Outputs may interleave with each other but no two may start at one address.
    Skipped while torch.compile traces (fake tensors have no addresses)."""
    if torch.compiler.is_compiling():
        return
    spans_in = [(n, t, _span(t)) for n, t in inputs]
    seen = {}
    for name, o in outputs:
        so = _span(o)
        if so is None:
            continue
        key = (o.device, so[0])
        if key in seen:
            raise ValueError(f"{name} and {seen[key]} are the same memory")
        seen[key] = name
        own = in_place.get(name)
        if own is not None and _same_view(o, dict(inputs)[own]):
            continue  # in place: q_normal is q / k_normal is k
        for iname, t, st in spans_in:
            if st is not None and o.device == t.device and so[0] < st[1] and st[0] < so[1]:
                hint = (f" (in place needs {name} to be {own} itself: same storage offset, shape and "
                        "strides)" if own == iname else "")
                raise ValueError(f"{name} overlaps the memory of {iname}{hint}")


def rope_out(out, q, k, positions, mask, fields):
    """``out=`` of dpe_rope: four views of the result shapes, none overlapping an input
    (``out.q_normal`` may be ``q`` and ``out.k_normal`` ``k`` themselves)."""
    if not isinstance(out, (tuple, list)) or len(out) != 4:
        raise TypeError("out must be a tuple (q_normal, k_normal, q_scaled, k_scaled)")
    lead = tuple(q.shape[:-2])
    want = (q.shape[-2], k.shape[-2], q.shape[-2], scaled_key_heads(k.shape[-2], mask))
    for name, o, h in zip(fields, out, want):
        _view(f"out.{name}", o, (*lead, h, q.shape[-1]), q)
    _no_overlap(tuple((f"out.{n}", o) for n, o in zip(fields, out)),
                (("q", q), ("k", k), ("positions", positions)), {"out.q_normal": "q", "out.k_normal": "k"})


def rope_cache_args(q, k, v, positions, inv_freq, config, mask, layout, rotary_dim, k_cache, ks_cache,
                    v_cache, slot_mapping, out, check_values):
    """Every check of dpe_rope_and_cache; returns ``(rotary_dim, out)`` (out allocated if None)."""
    for name, t in (("v", v), ("k_cache", k_cache), ("ks_cache", ks_cache), ("v_cache", v_cache),
                    ("slot_mapping", slot_mapping)):
        tensor(name, t)
    if isinstance(q, torch.Tensor) and q.dim() != 3:
        raise ValueError(f"q must be [T, H_q, D] (packed tokens), got shape {list(q.shape)}")
    rotary_dim = rope_args(q, k, positions, inv_freq, config, mask, layout, rotary_dim, op="dpe_rope_and_cache")
    if check_values:
        rope_values(positions, inv_freq)
    t, hq, d = q.shape
    hk = k.shape[1]
    if v.dim() != 3 or v.shape[:2] != (t, hk):
        raise ValueError(f"v must be [T={t}, H_k={hk}, D_v], got shape {list(v.shape)}")
    same_dtype("v", v, "q", q.dtype)
    same_device("v", v, "q", q.device)
    unit_stride("v", v)
    if slot_mapping.dtype != torch.int64:
        raise TypeError(f"slot_mapping must be int64, got {slot_mapping.dtype}")
    if slot_mapping.shape != (t,):
        raise ValueError(f"slot_mapping must be [T] = [{t}], got {list(slot_mapping.shape)}")
    same_device("slot_mapping", slot_mapping, "q", q.device)
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be [num_blocks, block_size, H_k, D], got shape {list(k_cache.shape)}")
    nb, bs = k_cache.shape[:2]
    if bs < 1:
        raise ValueError(f"k_cache must have block_size >= 1, got shape {list(k_cache.shape)}")
    _view("k_cache", k_cache, (nb, bs, hk, d), q)
    _view("ks_cache", ks_cache, (nb, bs, scaled_key_heads(hk, mask), d), q)
    _view("v_cache", v_cache, (nb, bs, hk, v.shape[-1]), q)
    if out is None:
        out = (q.new_empty(q.shape), q.new_empty(q.shape))
    elif not isinstance(out, (tuple, list)) or len(out) != 2:
        raise TypeError("out must be a tuple (q_normal, q_scaled)")
    for name, o in zip(("q_normal", "q_scaled"), out):
        _view(f"out.{name}", o, tuple(q.shape), q)
    inputs = (("q", q), ("k", k), ("v", v), ("positions", positions), ("slot_mapping", slot_mapping))
    # The caches may interleave with each other (planes of one page) but not with the inputs.
    _no_overlap((("out.q_normal", out[0]), ("out.q_scaled", out[1]), ("k_cache", k_cache),
                 ("ks_cache", ks_cache), ("v_cache", v_cache)), inputs, {"out.q_normal": "q"})
    inference_only("dpe_rope_and_cache", (("v", v),))
    if check_values and t and not torch.compiler.is_compiling():
        valid = slot_mapping[slot_mapping >= 0]
        if valid.numel():
            hi = int(valid.max())
            if hi >= nb * bs:
                raise ValueError(f"slot_mapping must be < num_blocks * block_size = {nb * bs} (or negative to "
                                 f"skip a token), got {hi}")
            if int(torch.unique(valid).numel()) != valid.numel():
                raise ValueError("slot_mapping must not repeat a slot (two tokens would write one cache row)")
    return rotary_dim, out


# --------------------------------------------------------------------------- attention
def attention_args(q_normal, q_scaled, k_normal, k_scaled, v, window, softmax_scale,
                   key_padding_mask_, cu_seqlens_q, cu_seqlens_k) -> AttentionInfo:
    """Every check of dpe_attention; returns what the backends need to know of the call."""
    names = ("q_normal", "q_scaled", "k_normal", "k_scaled", "v")
    tensors = (q_normal, q_scaled, k_normal, k_scaled, v)
    dtype, dev = _float_inputs(tuple(zip(names, tensors)))
    window_and_scale(window, softmax_scale)
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    if varlen:
        if cu_seqlens_q is None or cu_seqlens_k is None:
            missing = "cu_seqlens_q" if cu_seqlens_q is None else "cu_seqlens_k"
            raise ValueError(f"{missing} is required: the packed layout needs both cu_seqlens_q and "
                             "cu_seqlens_k")
        if key_padding_mask_ is not None:
            raise ValueError("key_padding_mask is for the batched layout; with cu_seqlens_q/cu_seqlens_k "
                             "(packed layout) the sequences carry no padding")
    ndim, layout = (3, "[T, H, D] (packed, with cu_seqlens)") if varlen else (4, "[B, S, H, D] (batched)")
    for name, t in zip(names, tensors):
        if t.dim() != ndim:
            hint = "" if varlen or t.dim() != 3 else ": pass cu_seqlens_q and cu_seqlens_k for [T, H, D]"
            raise ValueError(f"{name} must be {layout}, got shape {list(t.shape)}{hint}")
    lead_k = tuple(k_normal.shape[:-2])
    h_q, d, h_k = q_normal.shape[-2], q_normal.shape[-1], k_normal.shape[-2]
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
    info = AttentionInfo(varlen=varlen, H_q=h_q, H_k=h_k, H_ks=k_scaled.shape[-2], D=d, Dv=v.shape[-1])
    inference_only("dpe_attention", zip(names, tensors))
    if varlen:
        info.seqlens = _cu_seqlens(cu_seqlens_q, cu_seqlens_k, q_normal.shape[0], k_normal.shape[0], dev)
        info.B = len(info.seqlens)
        return info
    info.B, info.S_q, info.S_k = q_normal.shape[0], q_normal.shape[1], k_normal.shape[1]
    if info.S_q > info.S_k:
        raise ValueError(f"q_normal has S_q={info.S_q} queries but k_normal only S_k={info.S_k} keys: "
                         "queries are the last S_q key positions, so S_q <= S_k")
    key_padding_mask(key_padding_mask_, info.B, info.S_k, dev)
    return info


def _cu_seqlens(cu_seqlens_q, cu_seqlens_k, t_q, t_k, dev):
    """The packed layout's ``(q_start, S_q, k_start, S_k)`` per sequence (reads cu_seqlens on the host)."""
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        tensor(name, cu)
        if cu.dtype not in _INDEX_DTYPES:
            raise TypeError(f"{name} must be int32 or int64, got {cu.dtype}")
        if cu.dim() != 1 or cu.shape[0] < 2:
            raise ValueError(f"{name} must be [B + 1] with B >= 1, got shape {list(cu.shape)}")
        same_device(name, cu, "q_normal", dev)
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length (B + 1), got "
                         f"{cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}")
    cq, ck = host_ints(cu_seqlens_q), host_ints(cu_seqlens_k)
    for name, cu, total, tname in (("cu_seqlens_q", cq, t_q, "q_normal"), ("cu_seqlens_k", ck, t_k, "k_normal")):
        if cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])):
            raise ValueError(f"{name} must start at 0 and be non-decreasing, got {cu}")
        if cu[-1] != total:
            raise ValueError(f"{name} must end at the number of tokens of {tname} ({total}), got {cu[-1]}")
    seqlens = []
    for b in range(len(cq) - 1):
        sq, sk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        if sq > sk:
            raise ValueError(f"cu_seqlens_q/cu_seqlens_k: sequence {b} has S_q={sq} queries but only "
                             f"S_k={sk} keys (queries are the last S_q keys, so S_q <= S_k)")
        seqlens.append((cq[b], sq, ck[b], sk))
    return seqlens


def key_padding_mask(m, b, s_k, dev) -> None:
    """None, or bool ``[B, S_k]`` with left padding (True = real token)."""
    if m is None:
        return
    tensor("key_padding_mask", m)
    if m.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be a bool tensor (True = real token), got {m.dtype}")
    if tuple(m.shape) != (b, s_k):
        raise ValueError(f"key_padding_mask must be [B, S_k] = [{b}, {s_k}], got {list(m.shape)}")
    same_device("key_padding_mask", m, "q_normal", dev)
    # Left padding: no True followed by False in a row (one reduction).
    if s_k > 1 and not torch.compiler.is_compiling() and bool((m[:, :-1] & ~m[:, 1:]).any()):
        raise ValueError("key_padding_mask must be left-padded: in every row the real tokens "
                         "(True) must be contiguous and end at the last slot S_k - 1")


# --------------------------------------------------------------------------- paged attention
def paged_args(q_normal, q_scaled, k_cache, ks_cache, v_cache, block_table, seq_lens, query_start_loc,
               window, softmax_scale, max_seqlen_q, max_seqlen_k, out, *, qname: str = "q_normal",
               op: str = "dpe_paged_attention") -> PagedInfo:
    """Checks of dpe_paged_attention that read only dtypes, shapes, strides and devices (``qname``:
    the query's argument name in messages; ``op`` the caller's name)."""
    names = (qname, "q_scaled", "k_cache", "ks_cache", "v_cache")
    tensors = (q_normal, q_scaled, k_cache, ks_cache, v_cache)
    index = (("block_table", block_table), ("seq_lens", seq_lens), ("query_start_loc", query_start_loc))
    dtype, dev = _float_inputs(tuple(zip(names, tensors)), index)
    if q_normal.dim() != 3:
        raise ValueError(f"{qname} must be [T_q, H_q, D] (packed queries), got shape {list(q_normal.shape)}")
    if q_scaled.shape != q_normal.shape:
        raise ValueError(f"q_scaled must have the shape of q_normal {list(q_normal.shape)}, "
                         f"got {list(q_scaled.shape)}")
    for name, t in zip(names[2:], tensors[2:]):
        if t.dim() != 4:
            raise ValueError(f"{name} must be [num_blocks, block_size, heads, head_dim], "
                             f"got shape {list(t.shape)}")
    t_q, h_q, d = q_normal.shape
    nb, bs, h_k, dk = k_cache.shape
    if d == 0:
        raise ValueError(f"{qname} must have head_dim >= 1, got shape {list(q_normal.shape)}")
    if dk != d:
        raise ValueError(f"k_cache must have the head_dim of {qname} ({d}), got {dk}")
    if bs == 0:
        raise ValueError(f"k_cache must have block_size >= 1, got shape {list(k_cache.shape)}")
    if h_k == 0 or h_q % h_k != 0:
        raise ValueError(f"the number of q heads ({h_q}) must be a multiple of the number of k_cache "
                         f"heads ({h_k})")
    for name, t in (("ks_cache", ks_cache), ("v_cache", v_cache)):
        if tuple(t.shape[:2]) != (nb, bs):
            raise ValueError(f"{name} must have the [num_blocks, block_size] of k_cache {[nb, bs]}, "
                             f"got {list(t.shape[:2])}")
    h_ks, dv = ks_cache.shape[2], v_cache.shape[3]
    if h_ks not in (h_k, h_q):
        raise ValueError(f"ks_cache must have H_k={h_k} heads (per-KV-head mask) or H_q={h_q} "
                         f"(per-query-head mask), got {h_ks}")
    if ks_cache.shape[3] != d:
        raise ValueError(f"ks_cache must have the head_dim of q_normal ({d}), got {ks_cache.shape[3]}")
    if v_cache.shape[2] != h_k:
        raise ValueError(f"v_cache must have the heads of k_cache ({h_k}), got {v_cache.shape[2]}")
    if dv == 0:
        raise ValueError(f"v_cache must have head_dim >= 1, got shape {list(v_cache.shape)}")
    for name, t in zip(names, tensors):
        unit_stride(name, t)
    for name, t in index:
        if t.dtype not in _INDEX_DTYPES:
            raise TypeError(f"{name} must be int32 (or int64), got {t.dtype}")
    if block_table.dim() != 2:
        raise ValueError(f"block_table must be [B, max_blocks_per_seq], got shape {list(block_table.shape)}")
    b = block_table.shape[0]
    if seq_lens.shape != (b,):
        raise ValueError(f"seq_lens must be [B] = [{b}] (B from block_table), got {list(seq_lens.shape)}")
    if query_start_loc.shape != (b + 1,):
        raise ValueError(f"query_start_loc must be [B + 1] = [{b + 1}] (B from block_table), "
                         f"got {list(query_start_loc.shape)}")
    window_and_scale(window, softmax_scale)
    opt_int("max_seqlen_q", max_seqlen_q)
    opt_int("max_seqlen_k", max_seqlen_k)
    if max_seqlen_q is not None and max_seqlen_q > t_q:
        raise ValueError(f"max_seqlen_q ({max_seqlen_q}) exceeds the number of query tokens T_q={t_q}")
    if max_seqlen_k is not None and max_seqlen_k > block_table.shape[1] * bs:
        raise ValueError(f"max_seqlen_k ({max_seqlen_k}) exceeds what block_table can address "
                         f"(max_blocks_per_seq * block_size = {block_table.shape[1]} * {bs})")
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
        same_dtype("out", out, qname, dtype)
        same_device("out", out, qname, dev)
        if tuple(out.shape) != (t_q, h_q, dv):
            raise ValueError(f"out must be [T_q, H_q, Dv] = {[t_q, h_q, dv]}, got {list(out.shape)}")
    inference_only(op, zip(names + ("out",), tensors + (out if out is not None else q_normal,)))
    return PagedInfo(T_q=t_q, H_q=h_q, H_k=h_k, H_ks=h_ks, D=d, Dv=dv, B=b, num_blocks=nb, block_size=bs,
                     max_blocks=block_table.shape[1], max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)


def paged_values(block_table, seq_lens, query_start_loc, info: PagedInfo) -> None:
    """Checks of dpe_paged_attention that read tensor values on the host (skipped with check_inputs=False)."""
    qsl, lens = host_ints(query_start_loc), host_ints(seq_lens)
    if qsl[0] != 0 or any(b < a for a, b in zip(qsl, qsl[1:])):
        raise ValueError(f"query_start_loc must start at 0 and be non-decreasing, got {qsl}")
    if qsl[-1] != info.T_q:
        raise ValueError(f"query_start_loc must end at the number of query tokens T_q={info.T_q}, got {qsl[-1]}")
    cap = info.max_blocks * info.block_size
    q_lens = [b - a for a, b in zip(qsl, qsl[1:])]
    for i, (n, ql) in enumerate(zip(lens, q_lens)):
        if n < ql:
            raise ValueError(f"seq_lens[{i}] = {n} is smaller than the sequence's query count {ql} "
                             "(queries are the last q_len positions of its keys, so seq_lens >= q_len)")
        if n > cap:
            raise ValueError(f"seq_lens[{i}] = {n} exceeds what block_table can address "
                             f"(max_blocks_per_seq * block_size = {info.max_blocks} * {info.block_size})")
    if info.max_seqlen_q is not None and q_lens and max(q_lens) > info.max_seqlen_q:
        raise ValueError(f"max_seqlen_q ({info.max_seqlen_q}) is smaller than the longest query "
                         f"length ({max(q_lens)})")
    if info.max_seqlen_k is not None and lens and max(lens) > info.max_seqlen_k:
        raise ValueError(f"max_seqlen_k ({info.max_seqlen_k}) is smaller than the longest sequence "
                         f"({max(lens)})")
    # Block ids a sequence with queries reads (its first ceil(seq_len / block_size) entries).
    if info.max_blocks and info.B:
        used_blocks = (seq_lens.to(torch.int64) + info.block_size - 1) // info.block_size
        has_q = (query_start_loc[1:] - query_start_loc[:-1]) > 0
        cols = torch.arange(info.max_blocks, device=block_table.device)
        used = (cols[None, :] < used_blocks[:, None]) & has_q[:, None]
        bad = used & ((block_table < 0) | (block_table >= info.num_blocks))
        if bool(bad.any()):
            b, i = (int(x) for x in bad.nonzero()[0].tolist())
            raise ValueError(f"block_table[{b}, {i}] = {int(block_table[b, i])} is not a block of the "
                             f"cache (num_blocks = {info.num_blocks})")


# --------------------------------------------------------------------------- the KV cache
def cache_append(k_normal, k_scaled, v, held: Optional[tuple]) -> None:
    """An append to one layer of a DPEKVCache: ``[B, S_new, H, D]`` tensors of one dtype and
    device; ``held`` (the layer's buffers, or None before its first append) fixes the rest."""
    names, ts = ("k_normal", "k_scaled", "v"), (k_normal, k_scaled, v)
    for name, t in zip(names, ts):
        tensor(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, S_new, H, D], got shape {list(t.shape)}")
    if k_normal.dtype not in REFERENCE_DTYPES:
        raise TypeError(f"k_normal must be a float32, float16, bfloat16 or float64 tensor, got {k_normal.dtype}")
    for name, t in (("k_scaled", k_scaled), ("v", v)):
        same_dtype(name, t, "k_normal", k_normal.dtype)
        same_device(name, t, "k_normal", k_normal.device)
        if t.shape[:2] != k_normal.shape[:2]:
            raise ValueError(f"{name} must have the [B, S_new] of k_normal {list(k_normal.shape[:2])}, "
                             f"got shape {list(t.shape)}")
    hk, d = k_normal.shape[2], k_normal.shape[3]
    if hk == 0:
        raise ValueError("k_normal must have at least one head")
    if k_scaled.shape[3] != d:
        raise ValueError(f"k_scaled must have the head_dim of k_normal ({d}), got {k_scaled.shape[3]}")
    if k_scaled.shape[2] % hk != 0:
        raise ValueError(f"k_scaled must have H_k={hk} heads or a multiple (H_q), got {k_scaled.shape[2]}")
    if v.shape[2] != hk:
        raise ValueError(f"v must have the heads of k_normal ({hk}), got {v.shape[2]}")
    inference_only("DPEKVCache", zip(names, ts))
    cache_matches(ts, held)


def cache_matches(ts, held: Optional[tuple]) -> None:
    """New ``(k_normal, k_scaled, v)`` against what a layer holds (its buffers, also after crop(0))."""
    if held is None:
        return
    for name, t, buf in zip(("k_normal", "k_scaled", "v"), ts, held):
        if t.dtype != buf.dtype:
            raise TypeError(f"{name} must have the dtype of the cached tensors ({buf.dtype}), got {t.dtype}")
        if t.device != buf.device:
            raise ValueError(f"{name} must be on the device of the cached tensors ({buf.device}), "
                             f"got {t.device}")
        if t.shape[0] != buf.shape[0]:
            raise ValueError(f"{name} must have the batch size of the cache ({buf.shape[0]}), got {t.shape[0]}")
        if t.shape[2:] != buf.shape[2:]:
            raise ValueError(f"{name} must have [H, D] = {list(buf.shape[2:])} like the cached {name}, "
                             f"got {list(t.shape[2:])}")


# --------------------------------------------------------------------------- paged, unrotated keys
def rotary_table_args(inv_freq, num_positions) -> None:
    tensor("inv_freq", inv_freq)
    if inv_freq.dtype != torch.float32 or inv_freq.dim() != 1 or inv_freq.numel() == 0:
        raise TypeError(f"inv_freq must be a non-empty 1-D float32 tensor, got {inv_freq.dtype} "
                        f"{list(inv_freq.shape)}")
    if not is_int(num_positions):
        raise TypeError(f"num_positions must be an int, got {type(num_positions).__name__}")
    if not 1 <= num_positions <= MAX_EXACT_POSITION:
        raise ValueError(f"num_positions must be in [1, 2^24] (float32 holds every position below 2^24), "
                         f"got {num_positions}")


def paged_rotary_args(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, cos_sin, pair_scale, window,
                      seq_config, mask, rotary_dim, layout, softmax_scale, max_seqlen_q, max_seqlen_k, out):
    """Checks of dpe_paged_attention_rotary that read only dtypes, shapes, strides and devices.
    Returns ``(info, pair_scale [C, P], window [C], seq_config [B], mask [C, H_q, P] or None,
    rotary_dim)``, the per-configuration tensors in their canonical form (int64, bool)."""
    # The shape checks of the paged call, with q in both query slots and k in both key slots.
    info = paged_args(q, q, k_cache, k_cache, v_cache, block_table, seq_lens, query_start_loc, 1, softmax_scale,
                      max_seqlen_q, max_seqlen_k, out, qname="q", op="dpe_paged_attention_rotary")
    for name, t in (("cos_sin", cos_sin), ("pair_scale", pair_scale)):
        tensor(name, t)
    dev = q.device
    if isinstance(window, torch.Tensor):
        if window.dim() != 1 or window.dtype not in _INDEX_DTYPES:
            raise TypeError(f"window must be an int or an int32/int64 [C] tensor, got {window.dtype} "
                            f"{list(window.shape)}")
    elif isinstance(window, bool) or not isinstance(window, numbers.Integral):
        raise TypeError(f"window must be an int or an int32/int64 [C] tensor, got {type(window).__name__}")
    elif window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    window_and_scale(1, softmax_scale)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    d = info.D
    if rotary_dim is None:
        rotary_dim = d
    if not is_int(rotary_dim):
        raise TypeError(f"rotary_dim must be an int or None, got {type(rotary_dim).__name__}")
    if rotary_dim < 2 or rotary_dim % 2 or rotary_dim > d:
        raise ValueError(f"rotary_dim must be even, >= 2 and <= head_dim ({d}), got {rotary_dim}")
    p = rotary_dim // 2
    if cos_sin.dtype != torch.float32 or cos_sin.dim() != 2 or cos_sin.shape[1] != 2 * p:
        raise TypeError(f"cos_sin must be a float32 [num_positions, rotary_dim = {2 * p}] table (cos | sin, "
                        f"dpe_kernels.rotary_table), got {cos_sin.dtype} {list(cos_sin.shape)}")
    same_device("cos_sin", cos_sin, "q", dev)
    if not cos_sin.is_contiguous():
        raise ValueError("cos_sin must be contiguous")
    if pair_scale.dim() == 1:
        pair_scale = pair_scale[None]
    if pair_scale.dim() != 2 or pair_scale.shape[1] != p or pair_scale.shape[0] < 1 or pair_scale.dtype not in _INDEX_DTYPES:
        raise TypeError(f"pair_scale must be an int32/int64 [P] or [C, P] tensor with P = rotary_dim / 2 = {p}, "
                        f"got {pair_scale.dtype} {list(pair_scale.shape)}")
    same_device("pair_scale", pair_scale, "q", dev)
    c = pair_scale.shape[0]
    if isinstance(window, torch.Tensor):
        if window.shape[0] != c:
            raise ValueError(f"window must have one entry per configuration ({c}), got {list(window.shape)}")
        same_device("window", window, "q", dev)
        window = window.to(torch.int64)
    else:
        window = torch.full((c,), int(window), dtype=torch.int64, device=dev)
    if seq_config is None:
        if c != 1:
            raise ValueError(f"seq_config is required with {c} configurations (pair_scale [C, P])")
        seq_config = torch.zeros(info.B, dtype=torch.int64, device=dev)
    else:
        tensor("seq_config", seq_config)
        if seq_config.dtype not in _INDEX_DTYPES or tuple(seq_config.shape) != (info.B,):
            raise TypeError(f"seq_config must be an int32/int64 [B = {info.B}] tensor, got {seq_config.dtype} "
                            f"{list(seq_config.shape)}")
        same_device("seq_config", seq_config, "q", dev)
    if mask is not None:
        tensor("mask", mask)
        if mask.dtype not in (torch.bool, torch.uint8) or tuple(mask.shape) != (c, info.H_q, p):
            raise TypeError(f"mask must be a bool [C, H_q, P] = {[c, info.H_q, p]} tensor (one row per query "
                            f"head; expand a per-KV-head mask), got {mask.dtype} {list(mask.shape)}")
        same_device("mask", mask, "q", dev)
        mask = mask.to(torch.bool)
    return info, pair_scale.to(torch.int64), window, seq_config, mask, rotary_dim


def paged_rotary_values(cos_sin, pair_scale, window, seq_config, seq_lens, info) -> None:
    """Value checks of dpe_paged_attention_rotary (host reads; skipped with check_inputs=False)."""
    c = pair_scale.shape[0]
    if bool((pair_scale < 1).any()):
        raise ValueError(f"pair_scale must be >= 1, got {pair_scale.tolist()}")
    if bool((window < 1).any()):
        raise ValueError(f"window must be >= 1, got {window.tolist()}")
    if info.B and bool(((seq_config < 0) | (seq_config >= c)).any()):
        raise ValueError(f"seq_config must index the {c} configurations, got {seq_config.tolist()}")
    longest = int(seq_lens.max()) if info.B else 0
    if longest > cos_sin.shape[0]:
        raise ValueError(f"cos_sin has {cos_sin.shape[0]} rows but a sequence has {longest} keys: the table "
                         "needs one row per position (rotary_table(inv_freq, max_model_len))")
