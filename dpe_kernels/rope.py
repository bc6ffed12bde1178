"""The DPE rotary step (SPEC "Position remapping") as one fused operation.

``dpe_rope`` reads q and k once and returns the four rotated tensors that the
two attention passes of DPE need:

* ``q_normal, k_normal``: plain RoPE at the original positions (window pass);
* ``q_scaled, k_scaled``: per group of pairs, positions remapped by floor
  division by the group's scale plus the window offset (scaled pass).

Backends: ``reference`` (unfused PyTorch, written the way the authors' code
does it: the numerical reference and the benchmark baseline), ``cpu``
(compiled C++), ``cuda`` (compiled CUDA), ``triton``. All compute in float32
and round once to the input dtype.
"""
from __future__ import annotations

import importlib.util
import os
from typing import NamedTuple, Optional

import torch

from . import _ext
from .config import DPEConfig

__all__ = ["dpe_rope", "RopeOutput", "BACKENDS", "available_backends", "rope_reference"]

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LAYOUTS = ("neox", "gptj")


class RopeOutput(NamedTuple):
    q_normal: torch.Tensor  # like q: [T, H_q, D] or [B, S, H_q, D]
    k_normal: torch.Tensor  # like k
    q_scaled: torch.Tensor  # like q
    k_scaled: torch.Tensor  # like k, with H_q heads when the mask is per query head


# --------------------------------------------------------------------------- backends
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _triton_usable(device: torch.device) -> bool:
    if not _HAS_TRITON:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_backends(device: torch.device | str = "cpu") -> list:
    """Backends that can run on tensors of ``device`` in this process."""
    device = torch.device(device)
    out = ["reference"]
    if device.type == "cpu" and _ext.has_kernel("rope", "CPU"):
        out.append("cpu")
    if device.type == "cuda" and _ext.has_kernel("rope", "CUDA"):
        out.append("cuda")
    if _triton_usable(device):
        out.append("triton")
    return out


def _pick_backend(backend: str, device: torch.device) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    avail = available_backends(device)
    if backend == "auto":
        for name in ("cuda", "cpu", "triton"):
            if name in avail and (name != "triton" or device.type == "cuda"):
                return name
        return "reference"
    if backend not in avail:
        why = {
            "cpu": "the compiled extension is not loaded" if not _ext.HAS_EXT else "q is not a CPU tensor",
            "cuda": "q is not a CUDA tensor or the extension was built without CUDA",
            "triton": "triton needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU) and the triton package",
        }.get(backend, "")
        raise ValueError(f"backend={backend!r} is not available for {device.type} tensors: {why}")
    return backend


# --------------------------------------------------------------------------- validation
def check_inference_only(op: str, named_tensors) -> None:
    """The package has no autograd formulas: with grad mode on, an input that
    requires grad raises ValueError naming it (under no_grad / inference_mode
    such inputs are accepted and the outputs do not require grad)."""
    if torch.is_grad_enabled():
        for name, t in named_tensors:
            if t.requires_grad:
                raise ValueError(
                    f"{op} is inference-only (no autograd) and {name} requires grad: call it under "
                    "torch.no_grad() or torch.inference_mode(), or pass detached tensors")


def _check_inputs(q, k, positions, inv_freq, config, mask, layout, rotary_dim, check_positions):
    for name, t in (("q", q), ("k", k), ("positions", positions), ("inv_freq", inv_freq)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not isinstance(config, DPEConfig):
        raise TypeError(f"config must be a DPEConfig, got {type(config).__name__}")
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"q must be float32, float16 or bfloat16, got {q.dtype}")
    if k.dtype != q.dtype:
        raise TypeError(f"k must have the dtype of q ({q.dtype}), got {k.dtype}")
    if q.dim() not in (3, 4):
        raise ValueError(f"q must be [T, H_q, D] or [B, S, H_q, D], got shape {list(q.shape)}")
    if k.dim() != q.dim() or k.shape[:-2] != q.shape[:-2]:
        raise ValueError(f"k must have the token dims of q {list(q.shape[:-2])}, got shape {list(k.shape)}")
    hq, hk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    if k.shape[-1] != d:
        raise ValueError(f"k must have the head_dim of q ({d}), got {k.shape[-1]}")
    if hk == 0 or hq % hk != 0:
        raise ValueError(f"the number of q heads ({hq}) must be a multiple of the number of k heads ({hk})")
    for name, t in (("q", q), ("k", k)):
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"{name} must have stride 1 on its last (head_dim) dimension, got {t.stride()}")
    for name, t in (("k", k), ("positions", positions), ("inv_freq", inv_freq)):
        if t.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {t.device}")
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be 'neox' or 'gptj', got {layout!r}")
    if rotary_dim is None:
        rotary_dim = d
    if not isinstance(rotary_dim, int) or isinstance(rotary_dim, bool):
        raise TypeError(f"rotary_dim must be an int, got {type(rotary_dim).__name__}")
    if rotary_dim < 2 or rotary_dim % 2 or rotary_dim > d:
        raise ValueError(f"rotary_dim must be even and in [2, head_dim={d}], got {rotary_dim}")
    npairs = rotary_dim // 2
    if inv_freq.dtype != torch.float32:
        raise TypeError(f"inv_freq must be float32, got {inv_freq.dtype}")
    if inv_freq.dim() != 1 or inv_freq.shape[0] != npairs:
        raise ValueError(f"inv_freq must be [rotary_dim / 2] = [{npairs}], got {list(inv_freq.shape)}")
    if config.num_pairs != npairs:
        raise ValueError(
            f"config.group_boundaries must cover the {npairs} pairs of rotary_dim={rotary_dim}, "
            f"they end at {config.num_pairs}")
    if positions.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"positions must be int32 or int64, got {positions.dtype}")
    if q.dim() == 3:
        if positions.shape != (q.shape[0],):
            raise ValueError(f"positions must be [T] = [{q.shape[0]}] for q of shape {list(q.shape)}, "
                             f"got {list(positions.shape)}")
    else:
        b, s = q.shape[:2]
        if positions.dim() != 2 or positions.shape[1] != s or positions.shape[0] not in (1, b):
            raise ValueError(f"positions must be [B, S] = [{b}, {s}] (or [1, {s}]), got {list(positions.shape)}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
        if mask.dim() != 2 or mask.shape[1] != npairs or mask.shape[0] not in (hq, hk):
            raise ValueError(f"mask must be [H_q={hq} or H_k={hk}, P={npairs}], got {list(mask.shape)}")
        if mask.device != q.device:
            raise ValueError(f"mask must be on the device of q ({q.device}), got {mask.device}")
    check_inference_only("dpe_rope", (("q", q), ("k", k)))
    if check_positions and positions.numel() and not torch.compiler.is_compiling():
        if int(positions.min()) < 0:  # one reduction over T ints (a sync on CUDA)
            raise ValueError("positions must be non-negative")
    return rotary_dim


# --------------------------------------------------------------------------- public API
def dpe_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    config: DPEConfig,
    mask: Optional[torch.Tensor] = None,
    *,
    layer: Optional[int] = None,
    layout: str = "neox",
    rotary_dim: Optional[int] = None,
    backend: str = "auto",
    check_positions: bool = True,
    out: Optional[tuple] = None,
) -> RopeOutput:
    """Dimension-wise RoPE: rotate q and k at normal and at DPE-remapped positions.

    Args:
        q: ``[T, H_q, D]`` (packed tokens) or ``[B, S, H_q, D]``; float32,
            float16 or bfloat16; stride 1 on the last dim, any other strides
            (a view of a packed qkv tensor is read in place, never copied).
        k: like q with ``H_k`` heads, ``H_q % H_k == 0``.
        positions: int32/int64, ``[T]`` for packed q, ``[B, S]`` or ``[1, S]``
            for batched q; absolute positions ``>= 0`` (the angle is
            ``float32(position) * inv_freq`` as in Hugging Face, so positions
            above 2^24 round like theirs).
        inv_freq: float32 ``[rotary_dim / 2]``, the model's own frequencies.
        config: the :class:`DPEConfig`; its groups must cover ``rotary_dim / 2`` pairs.
        mask: this layer's key-dimension mask, bool ``[H_q or H_k, P]``.
            Default: ``config.layer_mask(layer)`` if ``layer`` is given, else
            every pair is scaled.
        layer: index into ``config.mask`` (``[num_layers, H_m, P]``).
        layout: ``"neox"`` (pairs ``(i, i + P)``, Llama/HF) or ``"gptj"`` (``(2i, 2i + 1)``).
        rotary_dim: rotated leading dims (default ``D``); the rest pass through.
        backend: ``"auto"`` (cuda > cpu > triton on CUDA > reference), or one
            of ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"`` to force it.
        check_positions: verify ``positions >= 0`` (one reduction; a device
            sync on CUDA). Skipped while torch.compile traces.
        out: optional preallocated ``(q_normal, k_normal, q_scaled, k_scaled)``,
            contiguous, dtype and device of q, shapes as returned; written in
            place (no allocation, as an engine with persistent buffers wants).
            They must not share memory with the inputs.

    Returns:
        ``RopeOutput(q_normal, k_normal, q_scaled, k_scaled)``, contiguous, in
        the dtype of q. ``k_scaled`` has ``H_q`` heads when the mask is per
        query head (``H_q != H_k``), else ``H_k``.

    Inference only: there is no autograd formula. With grad mode on, an input
    that requires grad raises ValueError; under ``torch.no_grad()`` /
    ``torch.inference_mode()`` such inputs are accepted and the outputs do
    not require grad.
    """
    if mask is None and layer is not None:
        if not isinstance(config, DPEConfig):
            raise TypeError(f"config must be a DPEConfig, got {type(config).__name__}")
        if config.mask is None:
            raise ValueError("layer was given but config has no mask")
        mask = config.layer_mask(layer)
    elif mask is not None and layer is not None:
        raise ValueError("pass either mask or layer, not both")
    elif isinstance(config, DPEConfig) and config.mask is not None and mask is None:
        raise ValueError("config has a per-layer mask: pass layer= (or this layer's mask=)")
    rotary_dim = _check_inputs(q, k, positions, inv_freq, config, mask, layout, rotary_dim,
                               check_positions)
    if out is not None:
        out = _check_out(out, q, k, positions, mask)
    name = _pick_backend(backend, q.device)
    neox = layout == "neox"
    if name == "reference":
        res = rope_reference(q, k, positions, inv_freq, config, mask, layout=layout,
                             rotary_dim=rotary_dim)
    else:
        if mask is not None:
            mask = mask.contiguous()
        args = (q, k, positions, inv_freq, config.pair_scales(q.device), mask, config.window,
                rotary_dim, neox)
        if name == "triton":
            from .rope_triton import rope_triton

            res = rope_triton(*args)
        elif out is not None:
            torch.ops.dpe_kernels.rope_out(*args, *out)
            return out
        else:
            res = torch.ops.dpe_kernels.rope(*args)
    if out is not None:
        for o, r in zip(out, res):
            o.copy_(r)
        return out
    return RopeOutput(*res)


def _check_out(out, q, k, positions, mask) -> RopeOutput:
    if not isinstance(out, (tuple, list)) or len(out) != 4:
        raise TypeError("out must be a tuple (q_normal, k_normal, q_scaled, k_scaled)")
    heads_ks = mask.shape[0] if mask is not None else k.shape[-2]
    lead = tuple(q.shape[:-2])
    want = (q.shape[-2], k.shape[-2], q.shape[-2], heads_ks)
    for name, o, h in zip(RopeOutput._fields, out, want):
        if not isinstance(o, torch.Tensor):
            raise TypeError(f"out.{name} must be a torch.Tensor, got {type(o).__name__}")
        shape = (*lead, h, q.shape[-1])
        if tuple(o.shape) != shape or o.dtype != q.dtype or o.device != q.device or not o.is_contiguous():
            raise ValueError(f"out.{name} must be contiguous {q.dtype} on {q.device} with shape "
                             f"{list(shape)}, got {o.dtype} {list(o.shape)} on {o.device}")
        for iname, t in (("q", q), ("k", k), ("positions", positions)):
            if o.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
                raise ValueError(f"out.{name} shares memory with {iname}: in-place rotation is not supported")
    return RopeOutput(*out)


# --------------------------------------------------------------------------- reference
def _cos_sin(index: torch.Tensor, inv_freq: torch.Tensor, compute_dtype: torch.dtype):
    # The angle is float32(index) * inv_freq in float32, as Hugging Face does;
    # only then is it widened (to float64 for the float64 oracle).
    angle = (index.to(torch.float32)[..., None] * inv_freq).to(compute_dtype)
    return angle.cos(), angle.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox: bool) -> torch.Tensor:
    """x: [..., H, R]; cos/sin: [..., P] per token, broadcast over heads."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    if neox:
        x1, x2 = x.chunk(2, dim=-1)
        cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
        rotated = torch.cat([-x2, x1], -1)
    else:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        cos, sin = cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)
        rotated = torch.stack([-x2, x1], -1).flatten(-2)
    return x * cos + rotated * sin


def rope_reference(q, k, positions, inv_freq, config: DPEConfig, mask=None, *, layout="neox",
                   rotary_dim=None, compute_dtype: torch.dtype = torch.float32):
    """Unfused PyTorch DPE rotary step, structured like the authors' code.

    One cos/sin table per group scale over all pairs, sliced to the group's
    pairs and concatenated; both rotations computed for every head; the
    scaled result selected per key dimension with ``where``; KV heads copied
    to every query head for a per-query-head mask. Computes in
    ``compute_dtype`` (float64 makes it the test oracle) and returns that
    dtype if it is float64, else the dtype of q. No input validation: call
    :func:`dpe_rope` with ``backend="reference"`` for that.
    """
    out_dtype = torch.float64 if compute_dtype == torch.float64 else q.dtype
    d = q.shape[-1]
    rotary_dim = d if rotary_dim is None else rotary_dim
    neox = layout == "neox"
    w = config.window
    pos = positions.to(torch.int64)
    if q.dim() == 4 and pos.dim() == 1:
        pos = pos[None]

    cos_n, sin_n = _cos_sin(pos, inv_freq, compute_dtype)
    cq, sq, ck, sk = [], [], [], []
    for s, b0, b1 in zip(config.scales, config.group_boundaries, config.group_boundaries[1:]):
        c, si = _cos_sin(pos // s + (w - w // s), inv_freq, compute_dtype)
        cq.append(c[..., b0:b1])
        sq.append(si[..., b0:b1])
        c, si = _cos_sin(pos // s, inv_freq, compute_dtype)
        ck.append(c[..., b0:b1])
        sk.append(si[..., b0:b1])
    cos_qs, sin_qs = torch.cat(cq, -1), torch.cat(sq, -1)
    cos_ks, sin_ks = torch.cat(ck, -1), torch.cat(sk, -1)

    hq, hk = q.shape[-2], k.shape[-2]
    if mask is not None:
        mask_dims = torch.cat([mask, mask], -1) if neox else mask.repeat_interleave(2, -1)  # [H_m, R]
        if mask.shape[0] != hk:  # per query head: the authors copy KV heads to every query head
            k = k.repeat_interleave(hq // hk, dim=-2)
    qr, q_pass = q[..., :rotary_dim].to(compute_dtype), q[..., rotary_dim:].to(compute_dtype)
    kr = k[..., :rotary_dim].to(compute_dtype)
    k_pass = k[..., rotary_dim:].to(compute_dtype)

    q_normal = _rotate(qr, cos_n, sin_n, neox)
    q_scaled = _rotate(qr, cos_qs, sin_qs, neox)
    k_normal_all = _rotate(kr, cos_n, sin_n, neox)
    k_scaled = _rotate(kr, cos_ks, sin_ks, neox)
    if mask is not None:
        q_mask = mask_dims if mask.shape[0] == hq else mask_dims.repeat_interleave(hq // hk, 0)
        q_scaled = torch.where(q_mask, q_scaled, q_normal)
        k_scaled = torch.where(mask_dims, k_scaled, k_normal_all)
        # k_normal keeps H_k heads: take one copy per KV head.
        k_normal = k_normal_all if mask.shape[0] == hk else k_normal_all[..., :: hq // hk, :]
        k_pass_n = k_pass if mask.shape[0] == hk else k_pass[..., :: hq // hk, :]
    else:
        k_normal, k_pass_n = k_normal_all, k_pass

    def finish(rot, rest):
        return torch.cat([rot, rest], -1).to(out_dtype)

    return (finish(q_normal, q_pass), finish(k_normal, k_pass_n), finish(q_scaled, q_pass),
            finish(k_scaled, k_pass))
