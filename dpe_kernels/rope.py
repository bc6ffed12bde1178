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

from typing import NamedTuple, Optional

import torch

from . import _ops
from .config import DPEConfig
from .reference import rope_reference
from .utils import FLOAT_DTYPES, check_inference_only, is_int, scaled_key_heads, triton_usable

__all__ = ["dpe_rope", "RopeOutput", "ROPE_BACKENDS", "available_rope_backends", "LAYOUTS",
           "MAX_EXACT_POSITION", "BACKENDS", "available_backends"]

ROPE_BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
LAYOUTS = ("neox", "gptj")
# The angle is float32(position) * inv_freq (as Hugging Face computes it): from
# 2^24 on, float32 no longer holds every integer, so neighbouring positions
# share one angle. check_positions=True refuses positions at or above this.
MAX_EXACT_POSITION = 1 << 24


class RopeOutput(NamedTuple):
    q_normal: torch.Tensor  # like q: [T, H_q, D] or [B, S, H_q, D]
    k_normal: torch.Tensor  # like k
    q_scaled: torch.Tensor  # like q
    k_scaled: torch.Tensor  # like k, with H_q heads when the mask is per query head

# --------------------------------------------------------------------------- backends
def available_rope_backends(device: torch.device | str = "cpu") -> list:
    """Backends that can run on tensors of ``device`` in this process."""
    device = torch.device(device)
    out = ["reference"]
    if device.type == "cpu" and _ops.has_kernel("rope", "CPU"):
        out.append("cpu")
    if device.type == "cuda" and _ops.has_kernel("rope", "CUDA"):
        out.append("cuda")
    if triton_usable(device):
        out.append("triton")
    return out


def _pick_backend(backend: str, device: torch.device) -> str:
    if not isinstance(backend, str) or backend not in ROPE_BACKENDS:
        raise ValueError(f"backend must be one of {ROPE_BACKENDS}, got {backend!r}")
    avail = available_rope_backends(device)
    if backend == "auto":
        for name in ("cuda", "cpu", "triton"):
            if name in avail and (name != "triton" or device.type == "cuda"):
                return name
        return "reference"
    if backend not in avail:
        why = {
            "cpu": "the compiled extension is not loaded" if not _ops.HAS_EXT else "q is not a CPU tensor",
            "cuda": "q is not a CUDA tensor or the extension was built without CUDA",
            "triton": "triton needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU) and the triton package",
        }.get(backend, "")
        raise ValueError(f"backend={backend!r} is not available for {device.type} tensors: {why}")
    return backend



# Names of the first release, kept as aliases.
BACKENDS = ROPE_BACKENDS
available_backends = available_rope_backends


# --------------------------------------------------------------------------- validation
def _check_inputs(q, k, positions, inv_freq, config, mask, layout, rotary_dim, check_positions):
    for name, t in (("q", q), ("k", k), ("positions", positions), ("inv_freq", inv_freq)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not isinstance(config, DPEConfig):
        raise TypeError(f"config must be a DPEConfig, got {type(config).__name__}")
    if q.dtype not in FLOAT_DTYPES:
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
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'neox' or 'gptj', got {layout!r}")
    if rotary_dim is None:
        rotary_dim = d
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
    if check_positions and not torch.compiler.is_compiling():
        # Reads tensor values on the host (a device sync on CUDA): skipped with
        # check_positions=False, as an engine's hot path wants.
        if positions.numel():
            lo, hi = torch.aminmax(positions)
            if int(lo) < 0:
                raise ValueError(f"positions must be non-negative, got a minimum of {int(lo)}")
            if int(hi) >= MAX_EXACT_POSITION:
                raise ValueError(
                    f"positions must be below 2^24 = {MAX_EXACT_POSITION} (float32 holds every integer "
                    f"only up to there, so neighbouring positions would share one angle), got {int(hi)}; "
                    "pass check_positions=False to rotate them anyway, rounded as Hugging Face rounds them")
        if not bool(torch.isfinite(inv_freq).all()):
            raise ValueError("inv_freq must be finite (no NaN or inf)")
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
        check_positions: verify ``0 <= positions < 2^24`` (:data:`MAX_EXACT_POSITION`)
            and that ``inv_freq`` is finite: reductions read back on the host
            (a device sync on CUDA). Skipped while torch.compile traces. With
            ``False`` nothing reads tensor values on the host; positions at or
            above 2^24 are then rotated at ``float32(position)``, which rounds
            them to a multiple of 2, 4, ... (as Hugging Face does, so
            neighbouring positions may share one angle); negative positions
            or a non-finite ``inv_freq`` then give meaningless outputs.
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
            from .backends.triton_rope import rope_triton

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
    lead = tuple(q.shape[:-2])
    want = (q.shape[-2], k.shape[-2], q.shape[-2], scaled_key_heads(k.shape[-2], mask))
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
