"""DPE attention over a PAGED KV cache (what a serving engine such as vLLM keeps):
``dpe_paged_attention``, the API (it validates with :mod:`dpe_kernels.checks` and
dispatches with :mod:`dpe_kernels.backends`; it holds no kernel).

Semantics are those of :func:`dpe_kernels.dpe_attention` (docs/method.md)::

    logit(m, n) = <q_normal(m), k_normal(n)> * scale   if m - n <  window
                = <q_scaled(m), k_scaled(n)> * scale   if m - n >= window

causal, one softmax over every key ``n <= m``, GQA without repeated KV heads.

Layout (vLLM's):

* ``q_normal``, ``q_scaled`` ``[T_q, H_q, D]``: the queries of ``B``
  sequences packed in ``query_start_loc`` order; sequence ``b`` owns rows
  ``query_start_loc[b] .. query_start_loc[b + 1] - 1``.
* ``k_cache`` / ``ks_cache`` / ``v_cache`` ``[num_blocks, block_size, H, D]``
  (``H_k`` / ``H_k`` or ``H_q`` / ``H_k`` heads; ``D`` / ``D`` / ``Dv``): any
  strides with stride 1 on the head dim, so views into one engine buffer
  (e.g. vLLM's head-major ``[num_blocks, H_k, block_size, ...]`` permuted)
  are read in place.
* ``block_table[b, i]``: physical block of logical block ``i`` of sequence
  ``b``; key ``n`` of ``b`` lives at ``block_table[b, n // block_size]``,
  offset ``n % block_size``. Blocks may be shared by several sequences
  (prefix caching).
* ``seq_lens[b]``: keys of ``b``, new tokens included. Its queries are its
  LAST ``q_len_b`` positions: query ``j`` sits at position
  ``seq_lens[b] - q_len_b + j``. One call covers prefill, chunked prefill,
  decode and mixed batches; ``q_len_b`` may be 0 (skipped).

Backends: ``reference`` (:func:`dpe_kernels.reference.paged_attention_reference`:
each sequence's pages gathered, then the float64-capable attention oracle),
``cpu`` (:mod:`dpe_kernels.backends.paged_cpu`: batched decode over the pages
without gathering the context), ``triton`` (:mod:`dpe_kernels.backends.paged_triton`:
one kernel reading pages through the block table, split-KV decode).

:func:`dpe_paged_attention_rotary` is the same attention over a cache of UNROTATED keys (the
engine's own layout and size): keys are rotated as they are loaded, from a cos/sin table, so DPE
costs no KV memory and each sequence may use its own configuration.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import backends, checks
from .backends import PAGED_BACKENDS

__all__ = ["dpe_paged_attention", "dpe_paged_attention_rotary", "PAGED_BACKENDS", "available_paged_backends"]


def available_paged_backends(device: torch.device | str = "cpu") -> list:
    """Paged-attention backends that can run on tensors of ``device`` in this process."""
    return backends.available("paged", device)


def _outputs(info, q, seq_lens, query_start_loc, softmax_scale, out):
    """``(scale, out, lse)`` of a paged call; fills ``info.max_seqlen_*`` the caller left None (one
    host read each)."""
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(info.D)
    if info.max_seqlen_q is None and info.B:
        info.max_seqlen_q = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    if info.max_seqlen_k is None and info.B:
        info.max_seqlen_k = int(seq_lens.max())
    if info.B == 0:
        info.max_seqlen_q = info.max_seqlen_k = 0
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = torch.empty((info.T_q, info.H_q), dtype=lse_dtype, device=q.device)
    if out is None:
        out = q.new_empty((info.T_q, info.H_q, info.Dv))
    return scale, out, lse


# --------------------------------------------------------------------------- public API
def dpe_paged_attention(
    q_normal: torch.Tensor,
    q_scaled: torch.Tensor,
    k_cache: torch.Tensor,
    ks_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    window: int,
    *,
    softmax_scale: Optional[float] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    out: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    check_inputs: bool = True,
    backend: str = "auto",
):
    """Causal DPE attention of packed queries over a paged KV cache.

    Args:
        q_normal, q_scaled: ``[T_q, H_q, D]``, the queries of ``B`` sequences
            packed in ``query_start_loc`` order (from :func:`dpe_rope`).
        k_cache, ks_cache, v_cache: ``[num_blocks, block_size, H, D]`` with
            ``H_k`` / (``H_k`` or ``H_q``) / ``H_k`` heads and head dims ``D``
            / ``D`` / ``Dv``; any strides with stride 1 on the last dim. The
            scaled key head of query head ``h`` is ``h`` when ``ks_cache`` has
            ``H_q`` heads (per-query-head mask), else ``h // (H_q // H_k)``.
        block_table: int32 ``[B, max_blocks_per_seq]``, physical block of each
            logical block (entries past a sequence's last block are never read).
        seq_lens: int32 ``[B]``, keys of each sequence, new tokens included.
        query_start_loc: int32 ``[B + 1]``, cu_seqlens of the queries; the
            ``q_len_b`` queries of sequence ``b`` are its LAST ``q_len_b``
            positions (query ``j`` at ``seq_lens[b] - q_len_b + j``); 0 skips it.
        window: int ``>= 1``: distance ``< window`` uses the normal logits,
            ``>= window`` the scaled ones.
        softmax_scale: default ``1 / sqrt(D)``.
        max_seqlen_q, max_seqlen_k: the longest query length / sequence, as
            ints from the caller (they size the Triton grid and the cpu
            decode path; never read back from the device). If None they are
            computed from ``query_start_loc`` / ``seq_lens`` (one host read).
        out: optional ``[T_q, H_q, Dv]`` tensor (dtype of q) written in place
            and returned.
        return_lse: also return the float32 natural-log lse ``[T_q, H_q]``.
        check_inputs: True validates dtypes, shapes, strides and devices AND
            the values: ``query_start_loc`` starts at 0, is non-decreasing and
            ends at ``T_q``; ``q_len_b <= seq_lens[b] <= max_blocks_per_seq *
            block_size``; every block id a sequence reads is in
            ``[0, num_blocks)``; given ``max_seqlen_*`` are not too small.
            False skips every check that reads tensor values on the host
            (``.item()``, ``.tolist()``, ``bool()`` / ``int()`` of a tensor) so
            a serving engine's hot path makes no host sync; the metadata checks
            stay. With False, bad values give undefined results; pass
            ``max_seqlen_q`` / ``max_seqlen_k`` too, or they are read from the
            device. (The ``reference`` backend, and the ``cpu`` backend
            unless every sequence has exactly one query (``max_seqlen_q ==
            1``, ``T_q == B``) and ``Dv == D``, read the lengths on the host
            to split the batch: CPU tensors, no device sync.)
        backend: ``"auto"`` (CPU tensors: cpu; CUDA: triton; float64:
            reference), ``"reference"``, ``"cpu"``, ``"triton"``.

    Returns:
        ``out`` ``[T_q, H_q, Dv]`` in the dtype of q (math in float32; float64
        for the reference backend on float64 inputs), or ``(out, lse)``. Rows
        of a sequence without keys (``seq_lens[b] == 0``) get out 0 and lse
        ``-inf``.

    Inference only: with grad mode on, an input that requires grad raises
    ValueError.
    """
    info = checks.paged_args(q_normal, q_scaled, k_cache, ks_cache, v_cache, block_table, seq_lens,
                             query_start_loc, window, softmax_scale, max_seqlen_q, max_seqlen_k, out)
    name = backends.pick("paged", backend, q_normal.device, q_normal.dtype)
    if check_inputs:
        checks.paged_values(block_table, seq_lens, query_start_loc, info)
    scale, out, lse = _outputs(info, q_normal, seq_lens, query_start_loc, softmax_scale, out)
    backends.run_paged(name, q_normal, q_scaled, k_cache, ks_cache, v_cache, block_table, seq_lens, query_start_loc,
                       int(window), scale, info, out, lse, return_lse)
    return (out, lse) if return_lse else out


def dpe_paged_attention_rotary(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    cos_sin: torch.Tensor,
    pair_scale: torch.Tensor,
    window,
    *,
    seq_config: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    rotary_dim: Optional[int] = None,
    layout: str = "neox",
    softmax_scale: Optional[float] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    out: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    check_inputs: bool = True,
    backend: str = "auto",
):
    """DPE attention over a paged cache of UNROTATED keys: each key is rotated as it is loaded.

    The cache holds keys exactly as the model's key projection makes them (no rotary applied), in
    the engine's own layout and at the engine's own size, so DPE costs no KV memory; one cache
    serves plain RoPE and every DPE configuration, and each sequence of a batch picks its own
    (``seq_config``). For sequence ``b`` with configuration ``c = seq_config[b]`` (window ``w =
    window[c]``, pair scales ``s_i = pair_scale[c, i]``, key dimensions ``mask[c]``), a key at
    position ``n`` (its index in the sequence) is rotated at ``n`` where the window pass reads it and
    at ``n // s_i`` per key-dimension pair where the scaled pass does; the query at ``m`` at ``m``
    and ``m // s_i + (w - w // s_i)``; one softmax over both (docs/method.md). A configuration with
    every scale 1 is plain RoPE.

    Args:
        q: ``[T_q, H_q, D]`` UNROTATED queries of ``B`` sequences packed in ``query_start_loc``
            order; the ``q_len_b`` queries of ``b`` are its last positions.
        k_cache, v_cache: ``[num_blocks, block_size, H_k, D / Dv]`` (unrotated keys, values), any
            strides with stride 1 on the last dim.
        block_table, seq_lens, query_start_loc, softmax_scale, max_seqlen_q, max_seqlen_k, out,
            return_lse, check_inputs: as :func:`dpe_paged_attention`.
        cos_sin: float32 ``[N, rotary_dim]`` from :func:`dpe_kernels.rotary_table` with ``N`` at
            least the longest sequence (every index the method forms is below its position).
        pair_scale: int ``[P]`` (one configuration) or ``[C, P]``, the scale of every pair
            (``DPEConfig.pair_scales()``); all ones is plain RoPE.
        window: int, or int ``[C]``: the window of each configuration.
        seq_config: int ``[B]``, each sequence's configuration (default: all 0, with ``C == 1``).
        mask: optional bool ``[C, H_q, P]``: True marks a key dimension of query head ``h``
            (default: every pair). One row per QUERY head: expand a per-KV-head mask with
            ``repeat_interleave(H_q // H_k, 1)``. With no KV memory at stake a per-query-head
            mask costs nothing extra here.
        rotary_dim: rotated leading dims (default ``D``); layout ``"neox"`` or ``"gptj"``.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"``.

    Returns:
        ``out [T_q, H_q, Dv]`` in the dtype of q, or ``(out, lse)`` (float32 natural-log lse).
    """
    info, pair_scale, window_t, seq_config, mask, rotary_dim = checks.paged_rotary_args(
        q, k_cache, v_cache, block_table, seq_lens, query_start_loc, cos_sin, pair_scale, window, seq_config, mask,
        rotary_dim, layout, softmax_scale, max_seqlen_q, max_seqlen_k, out)
    checks.flag("check_inputs", check_inputs)
    checks.flag("return_lse", return_lse)
    name = backends.pick("paged_rotary", backend, q.device, q.dtype)
    if check_inputs:
        checks.paged_values(block_table, seq_lens, query_start_loc, info)
        checks.paged_rotary_values(cos_sin, pair_scale, window_t, seq_config, seq_lens, info)
    if info.max_seqlen_k is not None and info.max_seqlen_k > cos_sin.shape[0]:
        raise ValueError(f"max_seqlen_k ({info.max_seqlen_k}) is longer than the cos_sin table "
                         f"({cos_sin.shape[0]} positions)")
    scale, out, lse = _outputs(info, q, seq_lens, query_start_loc, softmax_scale, out)
    backends.run_paged_rotary(name, q, k_cache, v_cache, block_table, seq_lens, query_start_loc, cos_sin, pair_scale,
                              window_t, seq_config, mask, rotary_dim, layout == "neox", scale, info, out, lse)
    return (out, lse) if return_lse else out
