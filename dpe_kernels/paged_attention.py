"""DPE attention over a PAGED KV cache (what a serving engine such as vLLM keeps).

Semantics are SPEC "Attention", exactly as :func:`dpe_kernels.dpe_attention`::

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

Backends: ``reference`` (gathers each sequence's pages and calls the
float64-capable reference of ``dpe_attention``: the oracle), ``cpu``
(:mod:`dpe_kernels.backends.paged_cpu`: batched decode over the pages without
gathering the context), ``triton`` (:mod:`dpe_kernels.backends.paged_triton`:
one kernel reading pages through the block table, split-KV decode).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .attention import dpe_attention
from .utils import REFERENCE_DTYPES, check_inference_only, check_window_and_scale, is_int, triton_usable

__all__ = ["dpe_paged_attention", "PAGED_BACKENDS", "available_paged_backends"]

PAGED_BACKENDS = ("auto", "reference", "cpu", "triton")
_INDEX_DTYPES = (torch.int32, torch.int64)
_INF = float("inf")


def available_paged_backends(device: torch.device | str = "cpu") -> list:
    """Paged-attention backends that can run on tensors of ``device`` in this process."""
    device = torch.device(device)
    out = ["reference"]
    if device.type == "cpu":
        out.append("cpu")
    if triton_usable(device):
        out.append("triton")
    return out


def _pick_backend(backend, device, dtype) -> str:
    if not isinstance(backend, str) or backend not in PAGED_BACKENDS:
        raise ValueError(f"backend must be one of {PAGED_BACKENDS}, got {backend!r}")
    avail = available_paged_backends(device)
    if backend == "auto":
        if dtype == torch.float64:
            return "reference"
        if device.type == "cpu":
            return "cpu"
        if device.type == "cuda" and "triton" in avail:
            return "triton"
        return "reference"
    if backend not in avail:
        why = {
            "cpu": "it needs CPU tensors",
            "triton": "it needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU) and the triton package",
        }[backend]
        raise ValueError(f"backend={backend!r} is not available for {device.type} tensors: {why}")
    if dtype == torch.float64 and backend != "reference":
        raise TypeError(f"q_normal is float64, which only backend='reference' supports "
                        f"(got backend={backend!r})")
    return backend


# --------------------------------------------------------------------------- validation
class PagedInfo:
    """Shapes of one call (all from metadata, never from tensor values)."""
    __slots__ = ("T_q", "H_q", "H_k", "H_ks", "D", "Dv", "B", "num_blocks", "block_size",
                 "max_blocks", "max_seqlen_q", "max_seqlen_k")


def _check_opt_int(name, x):
    if x is None:
        return
    if not is_int(x):
        raise TypeError(f"{name} must be an int or None, got {type(x).__name__}")
    if x < 0:
        raise ValueError(f"{name} must be >= 0, got {x}")


def _check_metadata(q_normal, q_scaled, k_cache, ks_cache, v_cache, block_table, seq_lens,
                    query_start_loc, window, softmax_scale, max_seqlen_q, max_seqlen_k,
                    out) -> PagedInfo:
    """Checks that read only dtypes, shapes, strides and devices (no host sync)."""
    names = ("q_normal", "q_scaled", "k_cache", "ks_cache", "v_cache")
    tensors = (q_normal, q_scaled, k_cache, ks_cache, v_cache)
    for name, t in zip(names + ("block_table", "seq_lens", "query_start_loc"),
                       tensors + (block_table, seq_lens, query_start_loc)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    dtype, dev = q_normal.dtype, q_normal.device
    if dtype not in REFERENCE_DTYPES:
        raise TypeError(f"q_normal must be float32, float16 or bfloat16 (float64 for "
                        f"backend='reference'), got {dtype}")
    for name, t in zip(names[1:], tensors[1:]):
        if t.dtype != dtype:
            raise TypeError(f"{name} must have the dtype of q_normal ({dtype}), got {t.dtype}")
    for name, t in zip(names[1:] + ("block_table", "seq_lens", "query_start_loc"),
                       tensors[1:] + (block_table, seq_lens, query_start_loc)):
        if t.device != dev:
            raise ValueError(f"{name} must be on the device of q_normal ({dev}), got {t.device}")
    if q_normal.dim() != 3:
        raise ValueError(f"q_normal must be [T_q, H_q, D] (packed queries), got shape {list(q_normal.shape)}")
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
        raise ValueError(f"q_normal must have head_dim >= 1, got shape {list(q_normal.shape)}")
    if dk != d:
        raise ValueError(f"k_cache must have the head_dim of q_normal ({d}), got {dk}")
    if bs == 0:
        raise ValueError(f"k_cache must have block_size >= 1, got shape {list(k_cache.shape)}")
    if h_k == 0 or h_q % h_k != 0:
        raise ValueError(f"the number of q heads ({h_q}) must be a multiple of the number of k_cache "
                         f"heads ({h_k})")
    for name, t in (("ks_cache", ks_cache), ("v_cache", v_cache)):
        if tuple(t.shape[:2]) != (nb, bs):
            raise ValueError(f"{name} must have the [num_blocks, block_size] of k_cache {[nb, bs]}, "
                             f"got {list(t.shape[:2])}")
    h_ks = ks_cache.shape[2]
    if h_ks not in (h_k, h_q):
        raise ValueError(f"ks_cache must have H_k={h_k} heads (per-KV-head mask) or H_q={h_q} "
                         f"(per-query-head mask), got {h_ks}")
    if ks_cache.shape[3] != d:
        raise ValueError(f"ks_cache must have the head_dim of q_normal ({d}), got {ks_cache.shape[3]}")
    if v_cache.shape[2] != h_k:
        raise ValueError(f"v_cache must have the heads of k_cache ({h_k}), got {v_cache.shape[2]}")
    dv = v_cache.shape[3]
    if dv == 0:
        raise ValueError(f"v_cache must have head_dim >= 1, got shape {list(v_cache.shape)}")
    for name, t in zip(names, tensors):
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"{name} must have stride 1 on its last (head_dim) dimension, "
                             f"got strides {list(t.stride())}")
    for name, t in (("block_table", block_table), ("seq_lens", seq_lens),
                    ("query_start_loc", query_start_loc)):
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
    check_window_and_scale(window, softmax_scale)
    _check_opt_int("max_seqlen_q", max_seqlen_q)
    _check_opt_int("max_seqlen_k", max_seqlen_k)
    if max_seqlen_q is not None and max_seqlen_q > t_q:
        raise ValueError(f"max_seqlen_q ({max_seqlen_q}) exceeds the number of query tokens T_q={t_q}")
    if max_seqlen_k is not None and max_seqlen_k > block_table.shape[1] * bs:
        raise ValueError(f"max_seqlen_k ({max_seqlen_k}) exceeds what block_table can address "
                         f"(max_blocks_per_seq * block_size = {block_table.shape[1]} * {bs})")
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
        if out.dtype != dtype:
            raise TypeError(f"out must have the dtype of q_normal ({dtype}), got {out.dtype}")
        if out.device != dev:
            raise ValueError(f"out must be on the device of q_normal ({dev}), got {out.device}")
        if tuple(out.shape) != (t_q, h_q, dv):
            raise ValueError(f"out must be [T_q, H_q, Dv] = {[t_q, h_q, dv]}, got {list(out.shape)}")
    check_inference_only("dpe_paged_attention",
                         zip(names + ("out",), tensors + (out if out is not None else q_normal,)))
    info = PagedInfo()
    info.T_q, info.H_q, info.H_k, info.H_ks, info.D, info.Dv = t_q, h_q, h_k, h_ks, d, dv
    info.B, info.num_blocks, info.block_size, info.max_blocks = b, nb, bs, block_table.shape[1]
    info.max_seqlen_q, info.max_seqlen_k = max_seqlen_q, max_seqlen_k
    return info


def _check_values(block_table, seq_lens, query_start_loc, info: PagedInfo) -> None:
    """Checks that read tensor values on the host (skipped with check_inputs=False)."""
    qsl = [int(x) for x in query_start_loc.tolist()]
    lens = [int(x) for x in seq_lens.tolist()]
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


# --------------------------------------------------------------------------- reference
def gather_sequence(cache: torch.Tensor, block_table: torch.Tensor, b: int, seq_len: int) -> torch.Tensor:
    """Keys ``0 .. seq_len-1`` of sequence ``b`` as one contiguous ``[seq_len, H, D]`` copy."""
    bs = cache.shape[1]
    n_blocks = (seq_len + bs - 1) // bs
    idx = block_table[b, :n_blocks].to(torch.int64)
    return cache.index_select(0, idx).reshape(n_blocks * bs, *cache.shape[2:])[:seq_len]


def paged_attention_reference(q_normal, q_scaled, k_cache, ks_cache, v_cache, block_table, seq_lens,
                              query_start_loc, window, softmax_scale, out, lse):
    """Oracle: gather every sequence's pages and run ``dpe_attention``'s
    reference backend on them (float64 inputs compute in float64). Writes
    ``out`` / ``lse`` rows of sequences with queries; leaves the others."""
    qsl = [int(x) for x in query_start_loc.tolist()]
    lens = [int(x) for x in seq_lens.tolist()]
    for b, n in enumerate(lens):
        qa, qb = qsl[b], qsl[b + 1]
        if qb == qa:
            continue
        kn, ks, v = (gather_sequence(c, block_table, b, n)[None] for c in (k_cache, ks_cache, v_cache))
        o, l = dpe_attention(q_normal[None, qa:qb], q_scaled[None, qa:qb], kn, ks, v, window,
                             softmax_scale=softmax_scale, return_lse=True, backend="reference")
        out[qa:qb] = o[0]
        lse[qa:qb] = l[0]


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
    info = _check_metadata(q_normal, q_scaled, k_cache, ks_cache, v_cache, block_table, seq_lens,
                           query_start_loc, window, softmax_scale, max_seqlen_q, max_seqlen_k, out)
    name = _pick_backend(backend, q_normal.device, q_normal.dtype)
    if check_inputs:
        _check_values(block_table, seq_lens, query_start_loc, info)
    window = int(window)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(info.D)
    if info.max_seqlen_q is None and info.B:
        info.max_seqlen_q = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    if info.max_seqlen_k is None and info.B:
        info.max_seqlen_k = int(seq_lens.max())
    if info.B == 0:
        info.max_seqlen_q = info.max_seqlen_k = 0
    lse_dtype = torch.float64 if q_normal.dtype == torch.float64 else torch.float32
    lse = torch.empty((info.T_q, info.H_q), dtype=lse_dtype, device=q_normal.device)
    if out is None:
        out = q_normal.new_empty((info.T_q, info.H_q, info.Dv))
    if name == "reference":
        out.zero_()
        lse.fill_(-_INF)
        paged_attention_reference(q_normal, q_scaled, k_cache, ks_cache, v_cache, block_table, seq_lens,
                                  query_start_loc, window, scale, out, lse)
    elif name == "cpu":
        from .backends.paged_cpu import paged_attention_cpu

        paged_attention_cpu(q_normal, q_scaled, k_cache, ks_cache, v_cache, block_table, seq_lens,
                            query_start_loc, window, scale, info, out, lse)
    else:
        from .backends.paged_triton import paged_attention_triton

        paged_attention_triton(q_normal, q_scaled, k_cache, ks_cache, v_cache, block_table, seq_lens,
                               query_start_loc, window, scale, info.max_seqlen_q, info.max_seqlen_k,
                               out, lse, return_lse)
    return (out, lse) if return_lse else out
