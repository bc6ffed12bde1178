"""The DPE rotary step: ``dpe_rope`` and ``dpe_rope_and_cache``, the public API.

``dpe_rope`` reads q and k once and returns the four rotated tensors the two
attention passes need: ``q_normal, k_normal`` (plain RoPE at the original
positions) and ``q_scaled, k_scaled`` (per group of pairs, positions remapped as
docs/method.md describes). ``dpe_rope_and_cache`` also writes the keys and
values into a paged KV cache at a slot per token, as vLLM's
``reshape_and_cache`` does after its rotary op.

This module validates (:mod:`dpe_kernels.checks`) and dispatches
(:mod:`dpe_kernels.backends`); it holds no kernel. ``check_inputs=False`` skips
every check that reads tensor values on the host (no device sync, nothing that
breaks CUDA-graph capture); metadata checks always run.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import backends, checks
from .backends import ROPE_BACKENDS
from .checks import LAYOUTS, MAX_EXACT_POSITION
from .config import DPEConfig

__all__ = ["dpe_rope", "RopeOutput", "ROPE_BACKENDS", "available_rope_backends", "LAYOUTS",
           "MAX_EXACT_POSITION", "dpe_rope_and_cache", "RopeCacheOutput", "rotary_table"]


class RopeOutput(NamedTuple):
    q_normal: torch.Tensor  # like q: [T, H_q, D] or [B, S, H_q, D]
    k_normal: torch.Tensor  # like k
    q_scaled: torch.Tensor  # like q
    k_scaled: torch.Tensor  # like k, with H_q heads when the mask is per query head


class RopeCacheOutput(NamedTuple):
    q_normal: torch.Tensor  # like q: [T, H_q, D]
    q_scaled: torch.Tensor  # like q

def available_rope_backends(device: torch.device | str = "cpu", op: str = "rope") -> list:
    """Backends that can run on tensors of ``device`` in this process
    (``op="rope_and_cache"`` for :func:`dpe_rope_and_cache`)."""
    return backends.available(op, device)


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
    mask = checks.rope_mask(config, mask, layer)
    checks.flag("check_inputs", check_inputs)
    checks.flag("inplace", inplace)
    rotary_dim = checks.rope_args(q, k, positions, inv_freq, config, mask, layout, rotary_dim)
    if check_inputs:
        checks.rope_values(positions, inv_freq)
    if inplace:
        out = checks.inplace_out(out, q, k, mask)
    if out is not None:
        checks.rope_out(out, q, k, positions, mask, RopeOutput._fields)
    name = backends.pick("rope", backend, q.device)
    return RopeOutput(*backends.run_rope(name, q, k, positions, inv_freq, config, mask, layout, rotary_dim, out))


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
    mask = checks.rope_mask(config, mask, layer)
    checks.flag("check_inputs", check_inputs)
    rotary_dim, out = checks.rope_cache_args(q, k, v, positions, inv_freq, config, mask, layout, rotary_dim, k_cache,
                                             ks_cache, v_cache, slot_mapping, out, check_inputs)
    out = RopeCacheOutput(*out)
    name = backends.pick("rope_and_cache", backend, q.device)
    backends.run_rope_and_cache(name, q, k, v, positions, inv_freq, config, mask, layout, rotary_dim, k_cache,
                                ks_cache, v_cache, slot_mapping, out)
    return out


# --------------------------------------------------------------------------- cos/sin table
def rotary_table(inv_freq: torch.Tensor, num_positions: int, *, device=None) -> torch.Tensor:
    """The cos/sin table of every position below ``num_positions``: float32 ``[num_positions, 2P]``,
    row ``t`` = ``cos(a) | sin(a)`` with ``a = float32(t) * inv_freq`` formed in float32 as
    docs/method.md defines the angle, then cos and sin taken in float64 and rounded once (so every
    entry is the float32 nearest the exact value of that angle; exact positions up to 2^24).

    The kernels that rotate keys as they load them (:func:`dpe_kernels.dpe_paged_attention_rotary`)
    read it: a DPE index (normal or remapped) is a position, so one table serves every configuration
    and plain RoPE. A row costs ``8 P`` bytes (256 for P = 32): 4 MiB for 16K positions.
    """
    checks.rotary_table_args(inv_freq, num_positions)
    device = inv_freq.device if device is None else torch.device(device)
    inv = inv_freq.to(device)
    out = torch.empty((num_positions, 2 * inv.numel()), dtype=torch.float32, device=device)
    p = inv.numel()
    step = 1 << 16  # rows per chunk: bounds the float64 temporaries (32 MiB at P = 32)
    for lo in range(0, num_positions, step):
        hi = min(num_positions, lo + step)
        angle = (torch.arange(lo, hi, device=device, dtype=torch.int64).to(torch.float32)[:, None] * inv)
        angle = angle.to(torch.float64)
        out[lo:hi, :p] = angle.cos().to(torch.float32)
        out[lo:hi, p:] = angle.sin().to(torch.float32)
    return out
