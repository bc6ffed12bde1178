"""The DPE rotary step (SPEC "Position remapping") as one fused operation.

``dpe_rope`` reads q and k once and returns the four rotated tensors that the
two attention passes of DPE need:

* ``q_normal, k_normal``: plain RoPE at the original positions (window pass);
* ``q_scaled, k_scaled``: per group of pairs, positions remapped by floor
  division by the group's scale plus the window offset (scaled pass).

``dpe_rope_and_cache`` is the same step fused with the write of the keys
(normal and scaled) and values into a paged KV cache at a slot per token, as
vLLM's ``reshape_and_cache`` does after its rotary op.

Backends: ``reference`` (unfused PyTorch, written the way the authors' code
does it: the numerical reference and the benchmark baseline), ``cpu``
(compiled C++), ``cuda`` (compiled CUDA), ``triton``. All compute in float32
and round once to the input dtype.

``check_inputs=False`` (both functions) skips every check that reads tensor
values on the host (no ``.item()`` / ``.tolist()`` / ``int(t)`` / ``bool(t)``,
so no device sync and nothing that breaks CUDA-graph capture); the checks of
shapes, dtypes, devices and strides read metadata only and always run.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import ops
from .config import DPEConfig
from .reference import rope_reference
from .utils import FLOAT_DTYPES, check_inference_only, is_int, scaled_key_heads, triton_usable

__all__ = ["dpe_rope", "RopeOutput", "ROPE_BACKENDS", "available_rope_backends", "LAYOUTS",
           "MAX_EXACT_POSITION", "dpe_rope_and_cache", "RopeCacheOutput"]

ROPE_BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
LAYOUTS = ("neox", "gptj")
# The angle is float32(position) * inv_freq (as Hugging Face computes it): from
# 2^24 on, float32 no longer holds every integer, so neighbouring positions
# share one angle. check_inputs=True refuses positions at or above this.
MAX_EXACT_POSITION = 1 << 24


class RopeOutput(NamedTuple):
    q_normal: torch.Tensor  # like q: [T, H_q, D] or [B, S, H_q, D]
    k_normal: torch.Tensor  # like k
    q_scaled: torch.Tensor  # like q
    k_scaled: torch.Tensor  # like k, with H_q heads when the mask is per query head


class RopeCacheOutput(NamedTuple):
    q_normal: torch.Tensor  # like q: [T, H_q, D]
    q_scaled: torch.Tensor  # like q

# --------------------------------------------------------------------------- backends
def available_rope_backends(device: torch.device | str = "cpu", op: str = "rope") -> list:
    """Backends that can run on tensors of ``device`` in this process
    (``op="rope_and_cache"`` for :func:`dpe_rope_and_cache`)."""
    device = torch.device(device)
    out = ["reference"]
    if device.type == "cpu" and ops.has_kernel(op, "CPU"):
        out.append("cpu")
    if device.type == "cuda" and ops.has_kernel(op, "CUDA"):
        out.append("cuda")
    if triton_usable(device):
        out.append("triton")
    return out


def _pick_backend(backend: str, device: torch.device, op: str = "rope") -> str:
    if not isinstance(backend, str) or backend not in ROPE_BACKENDS:
        raise ValueError(f"backend must be one of {ROPE_BACKENDS}, got {backend!r}")
    avail = available_rope_backends(device, op)
    if backend == "auto":
        for name in ("cuda", "cpu", "triton"):
            if name in avail and (name != "triton" or device.type == "cuda"):
                return name
        return "reference"
    if backend not in avail:
        why = {
            "cpu": "the compiled extension is not loaded" if not ops.HAS_EXT else "q is not a CPU tensor",
            "cuda": "q is not a CUDA tensor or the extension was built without CUDA",
            "triton": "triton needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU) and the triton package",
        }.get(backend, "")
        raise ValueError(f"backend={backend!r} is not available for {device.type} tensors: {why}")
    return backend



# --------------------------------------------------------------------------- validation
def _check_inputs(q, k, positions, inv_freq, config, mask, layout, rotary_dim, check_values,
                  op="dpe_rope"):
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
    check_inference_only(op, (("q", q), ("k", k)))
    if check_values and not torch.compiler.is_compiling():
        # Reads tensor values on the host (a device sync on CUDA): skipped with
        # check_inputs=False, as an engine's hot path wants.
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
    return rotary_dim


# --------------------------------------------------------------------------- public API
def _resolve_mask(config, mask, layer):
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


def _check_flag(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


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
    check_inputs: bool = True,
    out: Optional[tuple] = None,
    inplace: bool = False,
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
        check_inputs: verify ``0 <= positions < 2^24`` (:data:`MAX_EXACT_POSITION`)
            and that ``inv_freq`` is finite: reductions read back on the host
            (a device sync on CUDA). Skipped while torch.compile traces. With
            ``False`` nothing reads tensor values on the host (no
            ``.item()``, ``.tolist()``, ``int(t)``, ``bool(t)``); shape, dtype,
            device and stride checks still run (metadata only). Positions at
            or above 2^24 are then rotated at ``float32(position)``, which
            rounds them to a multiple of 2, 4, ... (as Hugging Face does, so
            neighbouring positions may share one angle); negative positions
            or a non-finite ``inv_freq`` give meaningless outputs on the
            GPU backends (the compiled CPU kernel, which reads the positions
            anyway, still refuses negative ones with ValueError).
        out: optional ``(q_normal, k_normal, q_scaled, k_scaled)`` to write
            into (no allocation, as an engine with persistent buffers wants):
            dtype and device of q, the shapes returned, any strides with
            stride 1 on the last dim (e.g. ``k_scaled`` a view into a cache);
            elements outside the views are not touched. ``out.q_normal`` may
            be ``q`` itself and ``out.k_normal`` ``k`` itself (in place); no
            other output may overlap the memory of q, k or positions.
        inplace: write ``q_normal`` over ``q`` and ``k_normal`` over ``k``
            (vLLM's rotary op works in place) and return
            ``RopeOutput(q, k, q_scaled, k_scaled)``; ``q_scaled`` and
            ``k_scaled`` are allocated, or taken from ``out`` (whose first
            two entries must then be None, or q and k).

    Returns:
        ``RopeOutput(q_normal, k_normal, q_scaled, k_scaled)`` in the dtype of
        q (contiguous when allocated; the ``out`` tensors themselves when
        given). ``k_scaled`` has ``H_q`` heads when the mask is per query head
        (``H_q != H_k``), else ``H_k``.

    Inference only: there is no autograd formula. With grad mode on, an input
    that requires grad raises ValueError; under ``torch.no_grad()`` /
    ``torch.inference_mode()`` such inputs are accepted and the outputs do
    not require grad.
    """
    mask = _resolve_mask(config, mask, layer)
    _check_flag("check_inputs", check_inputs)
    _check_flag("inplace", inplace)
    rotary_dim = _check_inputs(q, k, positions, inv_freq, config, mask, layout, rotary_dim,
                               check_inputs)
    if inplace:
        out = _inplace_out(out, q, k, mask)
    if out is not None:
        out = _check_out(out, q, k, positions, mask)
    name = _pick_backend(backend, q.device)
    neox = layout == "neox"
    if name == "reference":
        res = rope_reference(q, k, positions, inv_freq, config, mask, layout=layout,
                             rotary_dim=rotary_dim)
        if out is None:
            return RopeOutput(*res)
        for o, r in zip(out, res):  # every result is computed before q / k are overwritten
            o.copy_(r)
        return out
    if mask is not None:
        mask = mask.contiguous()
    args = (q, k, positions, inv_freq, config.pair_scales(q.device), mask, config.window,
            rotary_dim, neox)
    if name == "triton":
        from .backends.rope_triton import rope_out_triton, rope_triton

        if out is None:
            return RopeOutput(*rope_triton(*args))
        rope_out_triton(*args, *out)
        return out
    if out is None:
        return RopeOutput(*torch.ops.dpe_kernels.rope(*args))
    torch.ops.dpe_kernels.rope_out(*args, *out)
    return out


def _inplace_out(out, q, k, mask):
    """The ``out`` of ``inplace=True``: (q, k, q_scaled, k_scaled)."""
    if out is None:
        lead = tuple(q.shape[:-2])
        ks_shape = (*lead, scaled_key_heads(k.shape[-2], mask), q.shape[-1])
        return (q, k, torch.empty_like(q, memory_format=torch.contiguous_format),
                q.new_empty(ks_shape))
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
    lo = t.data_ptr()
    return lo, lo + (extent + 1) * t.element_size()


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.device == b.device)


def _check_overlaps(outputs, inputs, in_place):
    """No output may overlap the memory of an input, except an output that is
    exactly its own input (``in_place``: output name -> input name; same
    storage offset, shape and strides), which is in place. The test compares
    byte ranges (metadata only), so an output interleaved with an input in
    one buffer counts as overlapping. Outputs may interleave with each other
    (e.g. planes of one cache page) but no two may start at one address.
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


def _check_view(name, o, shape, like):
    if not isinstance(o, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(o).__name__}")
    if o.dtype != like.dtype:
        raise TypeError(f"{name} must have the dtype of q ({like.dtype}), got {o.dtype}")
    if tuple(o.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(o.shape)}")
    if o.device != like.device:
        raise ValueError(f"{name} must be on the device of q ({like.device}), got {o.device}")
    if o.dim() and o.shape[-1] > 1 and o.stride(-1) != 1:
        raise ValueError(f"{name} must have stride 1 on its last (head_dim) dimension, got strides "
                         f"{tuple(o.stride())}")


def _check_out(out, q, k, positions, mask) -> RopeOutput:
    if not isinstance(out, (tuple, list)) or len(out) != 4:
        raise TypeError("out must be a tuple (q_normal, k_normal, q_scaled, k_scaled)")
    lead = tuple(q.shape[:-2])
    want = (q.shape[-2], k.shape[-2], q.shape[-2], scaled_key_heads(k.shape[-2], mask))
    for name, o, h in zip(RopeOutput._fields, out, want):
        _check_view(f"out.{name}", o, (*lead, h, q.shape[-1]), q)
    _check_overlaps(tuple((f"out.{n}", o) for n, o in zip(RopeOutput._fields, out)),
                    (("q", q), ("k", k), ("positions", positions)), {"out.q_normal": "q", "out.k_normal": "k"})
    return RopeOutput(*out)


# --------------------------------------------------------------------------- rope + cache
def dpe_rope_and_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    config: DPEConfig,
    k_cache: torch.Tensor,
    ks_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    mask: Optional[torch.Tensor] = None,
    layer: Optional[int] = None,
    layout: str = "neox",
    rotary_dim: Optional[int] = None,
    backend: str = "auto",
    check_inputs: bool = True,
    out: Optional[tuple] = None,
) -> RopeCacheOutput:
    """:func:`dpe_rope` fused with the write of the new keys and values into a
    paged KV cache, as an engine's attention layer does per step.

    Rotates the ``T`` packed tokens of ``q`` / ``k`` once; writes ``k_normal``
    into ``k_cache``, ``k_scaled`` into ``ks_cache`` and ``v`` (unchanged)
    into ``v_cache`` at ``slot = slot_mapping[t]`` (block ``slot // block_size``,
    offset ``slot % block_size``); a negative slot skips token ``t``'s cache
    writes (vLLM pads with -1). Returns the queries' ``q_normal`` / ``q_scaled``.

    Args:
        q: ``[T, H_q, D]``; float32, float16 or bfloat16; stride 1 on the
            last dim, any other strides.
        k: ``[T, H_k, D]``, dtype of q, ``H_q % H_k == 0``.
        v: ``[T, H_k, D_v]``, dtype of q.
        positions: int32/int64 ``[T]``, absolute positions ``>= 0``.
        inv_freq, config, mask, layer, layout, rotary_dim, backend: as
            :func:`dpe_rope` (one ``layer``'s mask, or ``mask=``).
        k_cache: ``[num_blocks, block_size, H_k, D]``, any strides with stride
            1 on the last dim (e.g. a head-major page viewed with transpose).
        ks_cache: ``[num_blocks, block_size, H_ks, D]``: ``H_ks`` is ``H_q``
            with a per-query-head mask, else ``H_k``.
        v_cache: ``[num_blocks, block_size, H_k, D_v]``.
        slot_mapping: int64 ``[T]``; ``< num_blocks * block_size``, negative
            to skip; the non-negative slots distinct.
        check_inputs: as :func:`dpe_rope`, plus the slots (every slot below
            ``num_blocks * block_size``, no slot twice): reads tensor values
            on the host (a device sync on CUDA). With ``False`` no tensor
            value is read on the host; an out-of-range slot is then skipped
            (never written) by the cuda / triton kernels, refused with
            ValueError by the cpu kernel (which reads the slots anyway) and
            an IndexError of the reference; a repeated slot gets one of its
            tokens' rows. The reference backend indexes by the valid slots
            (a device sync on CUDA): it is the oracle, not the hot path.
        out: optional ``(q_normal, q_scaled)`` to write into, shape of q, any
            strides (stride 1 on the last dim); ``q_normal`` may be ``q``
            itself (in place).

    Returns:
        ``RopeCacheOutput(q_normal, q_scaled)``.
    """
    mask = _resolve_mask(config, mask, layer)
    _check_flag("check_inputs", check_inputs)
    for name, t in (("v", v), ("k_cache", k_cache), ("ks_cache", ks_cache), ("v_cache", v_cache),
                    ("slot_mapping", slot_mapping)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if isinstance(q, torch.Tensor) and q.dim() != 3:
        raise ValueError(f"q must be [T, H_q, D] (packed tokens), got shape {list(q.shape)}")
    rotary_dim = _check_inputs(q, k, positions, inv_freq, config, mask, layout, rotary_dim,
                               check_inputs, op="dpe_rope_and_cache")
    t, hq, d = q.shape
    hk = k.shape[1]
    hks = scaled_key_heads(hk, mask)
    if v.dim() != 3 or v.shape[:2] != (t, hk):
        raise ValueError(f"v must be [T={t}, H_k={hk}, D_v], got shape {list(v.shape)}")
    if v.dtype != q.dtype:
        raise TypeError(f"v must have the dtype of q ({q.dtype}), got {v.dtype}")
    if v.device != q.device:
        raise ValueError(f"v must be on the device of q ({q.device}), got {v.device}")
    if v.shape[-1] > 1 and v.stride(-1) != 1:
        raise ValueError(f"v must have stride 1 on its last (head_dim) dimension, got {v.stride()}")
    if slot_mapping.dtype != torch.int64:
        raise TypeError(f"slot_mapping must be int64, got {slot_mapping.dtype}")
    if slot_mapping.shape != (t,):
        raise ValueError(f"slot_mapping must be [T] = [{t}], got {list(slot_mapping.shape)}")
    if slot_mapping.device != q.device:
        raise ValueError(f"slot_mapping must be on the device of q ({q.device}), got {slot_mapping.device}")
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be [num_blocks, block_size, H_k, D], got shape {list(k_cache.shape)}")
    nb, bs = k_cache.shape[:2]
    if bs < 1:
        raise ValueError(f"k_cache must have block_size >= 1, got shape {list(k_cache.shape)}")
    _check_view("k_cache", k_cache, (nb, bs, hk, d), q)
    _check_view("ks_cache", ks_cache, (nb, bs, hks, d), q)
    _check_view("v_cache", v_cache, (nb, bs, hk, v.shape[-1]), q)
    if out is None:
        out = (q.new_empty(q.shape), q.new_empty(q.shape))
    elif not isinstance(out, (tuple, list)) or len(out) != 2:
        raise TypeError("out must be a tuple (q_normal, q_scaled)")
    for name, o in zip(RopeCacheOutput._fields, out):
        _check_view(f"out.{name}", o, tuple(q.shape), q)
    inputs = (("q", q), ("k", k), ("v", v), ("positions", positions), ("slot_mapping", slot_mapping))
    # The caches may interleave with each other (planes of one page) but not with the inputs.
    _check_overlaps((("out.q_normal", out[0]), ("out.q_scaled", out[1]), ("k_cache", k_cache),
                     ("ks_cache", ks_cache), ("v_cache", v_cache)), inputs, {"out.q_normal": "q"})
    check_inference_only("dpe_rope_and_cache", (("v", v),))
    if check_inputs and t and not torch.compiler.is_compiling():
        valid = slot_mapping[slot_mapping >= 0]
        if valid.numel():
            hi = int(valid.max())
            if hi >= nb * bs:
                raise ValueError(f"slot_mapping must be < num_blocks * block_size = {nb * bs} (or negative to "
                                 f"skip a token), got {hi}")
            if int(torch.unique(valid).numel()) != valid.numel():
                raise ValueError("slot_mapping must not repeat a slot (two tokens would write one cache row)")
    out = RopeCacheOutput(*out)
    name = _pick_backend(backend, q.device, "rope_and_cache")
    if name == "reference":
        qn, kn, qs, ks = rope_reference(q, k, positions, inv_freq, config, mask, layout=layout,
                                        rotary_dim=rotary_dim)
        keep = slot_mapping >= 0
        slots = slot_mapping[keep]
        idx = (slots // bs, slots % bs)
        k_cache.index_put_(idx, kn[keep])
        ks_cache.index_put_(idx, ks[keep])
        v_cache.index_put_(idx, v[keep])
        out.q_normal.copy_(qn)
        out.q_scaled.copy_(qs)
        return out
    if mask is not None:
        mask = mask.contiguous()
    args = (q, k, v, positions, inv_freq, config.pair_scales(q.device), mask, config.window, rotary_dim,
            layout == "neox", slot_mapping, k_cache, ks_cache, v_cache, out.q_normal, out.q_scaled)
    if name == "triton":
        from .backends.rope_triton import rope_and_cache_triton

        rope_and_cache_triton(*args)
    else:
        torch.ops.dpe_kernels.rope_and_cache(*args)
    return out
