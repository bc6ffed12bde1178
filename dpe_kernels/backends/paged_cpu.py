"""The ``cpu`` paged-attention backend (it does not validate: its caller has).

Two paths:

* **Decode** (sequences with one query, ``q_len == 1``): the compiled
  ``paged_decode`` kernel (csrc/include/dpe/paged_decode_cpu.h) reads the
  keys and values in place through the block table, one online softmax per
  (sequence, KV head, key split) over both passes at once, splits merged by
  log-sum-exp. Without the compiled extension, the fallback below: it never gathers a
  sequence's context into one contiguous copy. The keys are walked by
  CHUNKS of blocks through the block table; each chunk is gathered
  (``index_select`` into a reused, cache-sized buffer) and attended by ONE
  call of ``aten._scaled_dot_product_flash_attention_for_cpu`` for every
  sequence and head at once; the partial results (output + lse of each
  "item" of blocks) are merged by log-sum-exp at the end (a two-stage
  softmax, as flash-decoding does). Two passes:

  - window pass: normal ``q``/``k`` over the blocks holding the last
    ``window`` keys (``ceil(window / block_size) + 1`` blocks at most),
    masked to distances ``0 .. window - 1``;
  - scaled pass: scaled ``q``/``k`` over the blocks before, masked to
    distances ``>= window`` (the block on the window edge is in both passes,
    with complementary masks).

* **Everything else** (prefill, chunked prefill, ``q_len > 1``, and any call
  whose ``v`` head dim differs from ``q``'s): each such sequence's pages ARE
  gathered into contiguous tensors and handed to the cpu attention
  kernel (:func:`~dpe_kernels.backends.attention_cpu.cpu_attention`; prefill is compute-bound: the O(S) copy is small next to the
  O(S^2) attention).

A batch of only decode rows (``max_seqlen_q == 1`` and ``T_q == B``) reads no
tensor value on the host; a mixed batch reads ``query_start_loc`` once (CPU
tensors: no device sync) to split it.
"""
from __future__ import annotations

import math
import threading
from typing import List, Tuple

import torch

from .. import ops
from ..reference import gather_sequence, rotary_indices, table_rotate
from ..utils import host_ints
from .attention_cpu import cpu_attention
from .shapes import AttentionInfo

__all__ = ["paged_attention_cpu", "paged_rotary_cpu", "decode_chunked", "head_major", "ITEM_KEYS", "CHUNK_KEYS", "HM_MIN_BLOCK"]

_INF = float("inf")
_CPU_OP = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

# Keys per "item": the blocks one batch entry of the aten op sees. The op
# parallelises over (batch entry, head) and has a fixed cost per entry, so
# an item groups ITEM_KEYS // block_size consecutive logical blocks (one
# block when block_size >= ITEM_KEYS). Measured on the 2-core EPYC at 16K
# context: items of 512 keys beat 128 and 256 (fewer entries, fewer partial
# results to merge).
ITEM_KEYS = 512
# Keys gathered per chunk over the whole batch: the reused K and V buffers
# (8192 keys x 3 heads x 64 dims x 4 bytes x 2 = 12 MiB at float32) stay in
# the 32 MiB L3, so the op reads the gathered copy from cache while the
# gather itself is the one pass over main memory. 16384 keys per chunk was
# slower at batch 4 (the buffers no longer fit).
CHUNK_KEYS = 8192
# Smallest block_size whose blocks are entries of their own when the cache is
# head-major (see _gather_items).
HM_MIN_BLOCK = 64


_tls = threading.local()


def _workspace(kind: str, shape, dtype) -> torch.Tensor:
    """A reused per-thread buffer (``kind`` "k" or "v") viewed as ``shape``.
    A fresh multi-MiB allocation every decode step costs page faults on
    every page it touches (measured: they tripled the gather time); the
    buffer is kept (about CHUNK_KEYS keys of K and of V, at least one item
    per sequence) and grows when a call needs more."""
    cache = getattr(_tls, "bufs", None)
    if cache is None:
        cache = _tls.bufs = {}
    n = math.prod(shape)
    buf = cache.get((kind, dtype))
    if buf is None or buf.numel() < n:
        buf = cache[(kind, dtype)] = torch.empty(n, dtype=dtype)
    return buf[:n].view(shape)


def head_major(cache: torch.Tensor) -> bool:
    """Whether a block's heads are outer to its tokens (vLLM CPU's
    ``[num_blocks, H, block_size, D]`` storage seen as ``[num_blocks,
    block_size, H, D]``)."""
    return cache.shape[2] > 1 and cache.stride(2) > cache.stride(1)


def _gather_items(cache: torch.Tensor, idx: torch.Tensor, buf: torch.Tensor, g: int,
                  hm: bool) -> torch.Tensor:
    """Blocks ``cache[idx]`` copied into ``buf`` as op entries ``[n / g, H, g *
    block_size, D]`` (a view of ``buf``).

    Head-major gather (``hm``, ``g == 1``): ``buf`` is ``[n, H, bs, D]``, each
    block one memcpy-like run per head (3x faster than a transposing copy
    when the cache itself is head-major). Token-major gather: ``buf`` is
    ``[n, bs, H, D]``, so ``g`` consecutive blocks of a sequence are one
    ``[g * bs, H, D]`` run and one entry by a view, whatever the cache's
    strides.
    """
    n = idx.numel()
    if hm:
        return torch.index_select(cache.transpose(1, 2), 0, idx, out=buf[:n])
    nb, bs, h, d = buf.shape
    out = torch.index_select(cache, 0, idx, out=buf[:n])
    return out.view(n // g, g * bs, h, d).transpose(1, 2)


def _pass_chunks(q, k_cache, v_cache, phys, key_ok, item_has_key, n_rep, scale,
                 g: int, c_blocks: int, hm: bool) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """One attention pass over the blocks ``phys`` ``[B, nb]`` (physical ids,
    ``nb`` a multiple of ``g``), in chunks of ``c_blocks`` blocks per sequence.

    ``q``: ``[B, H_q, D]``; ``key_ok``: ``[B, nb * bs]`` additive mask (0 /
    -inf, q's dtype) over the pass's keys; ``item_has_key``: ``[B, nb // g]``.
    Returns, per chunk, ``(out [B, items, H_q, Dv], lse [B, items, H_q])``;
    an item without any allowed key has lse -inf.
    """
    bsz, h_q, d = q.shape
    nb = phys.shape[1]
    bs, h_kk = k_cache.shape[1], k_cache.shape[2]   # key heads: H_k, or H_q (per-query-head keys)
    h_v, dv = v_cache.shape[2], v_cache.shape[3]    # value heads: H_k
    ik = g * bs
    per_head_keys = h_kk != h_v
    c_blocks = min(c_blocks, nb)
    if hm:
        k_buf = _workspace("k", (bsz * c_blocks, h_kk, bs, d), k_cache.dtype)
        v_buf = _workspace("v", (bsz * c_blocks, h_v, bs, dv), v_cache.dtype)
    else:
        k_buf = _workspace("k", (bsz * c_blocks, bs, h_kk, d), k_cache.dtype)
        v_buf = _workspace("v", (bsz * c_blocks, bs, h_v, dv), v_cache.dtype)
    if not per_head_keys:
        # GQA folded into rows: the n_rep query heads of a KV head are the
        # n_rep query rows of one op entry, so each K/V item is read once for
        # all of them (the op's native GQA would read it once per query head;
        # folding was 3-4x faster in bfloat16 at n_rep = 3).
        qf = q.view(bsz, h_v, n_rep, d)
    res = []
    for c0 in range(0, nb, c_blocks):
        cb = min(c_blocks, nb - c0)
        it = cb // g
        idx = phys[:, c0: c0 + cb].reshape(-1)
        kg = _gather_items(k_cache, idx, k_buf, g, hm)
        vg = _gather_items(v_cache, idx, v_buf, g, hm)
        mask = key_ok[:, c0 * bs: (c0 + cb) * bs].reshape(bsz * it, 1, 1, ik)
        if not per_head_keys:
            qq = qf.unsqueeze(1).expand(bsz, it, h_v, n_rep, d).reshape(bsz * it, h_v, n_rep, d)
            o, l = _CPU_OP(qq, kg, vg, 0.0, False, attn_mask=mask, scale=scale)
            o = o.reshape(bsz, it, h_q, dv)
            l = l.reshape(bsz, it, h_q)
        else:
            # Scaled keys with H_q heads against H_k-head values: the op wants
            # one head count for k and v, so one call per residue r of the query
            # heads (heads r, r + n_rep, ...: strided head views, no copy).
            o = q.new_empty((bsz, it, h_v, n_rep, dv))
            l = torch.empty((bsz, it, h_v, n_rep), dtype=torch.float32)
            for r in range(n_rep):
                qq = q[:, r::n_rep].unsqueeze(1).expand(bsz, it, h_v, d).reshape(bsz * it, h_v, 1, d)
                o_r, l_r = _CPU_OP(qq, kg[:, r::n_rep], vg, 0.0, False, attn_mask=mask, scale=scale)
                o[:, :, :, r] = o_r.view(bsz, it, h_v, dv)
                l[:, :, :, r] = l_r.view(bsz, it, h_v)
            o = o.view(bsz, it, h_q, dv)
            l = l.view(bsz, it, h_q)
        # the op reports lse 0 for an entry whose keys are all masked
        l = torch.where(item_has_key[:, c0 // g: c0 // g + it, None], l, -_INF)
        res.append((o, l))
    return res


def _blocks_and_mask(bt, used_blocks, first_blk, nb: int, bs: int, lo, hi, g: int, dtype):
    """Logical blocks ``first_blk + [0, nb)`` of each sequence -> physical ids
    ``[B, nb]`` (blocks past a sequence's last one read block 0, fully
    masked: the block table's unused entries are never read), the additive
    mask of its keys ``lo <= n < hi`` ``[B, nb * bs]`` (q's dtype, as the op
    wants) and which items of ``g`` blocks hold an allowed key ``[B, nb // g]``."""
    dev = bt.device
    j = first_blk[:, None] + torch.arange(nb, device=dev)                   # [B, nb] logical
    phys = torch.gather(bt, 1, j.clamp(max=bt.shape[1] - 1)).to(torch.int64)
    phys = torch.where(j < used_blocks[:, None], phys, 0)
    n = (j[:, :, None] * bs + torch.arange(bs, device=dev)).reshape(j.shape[0], nb * bs)
    ok = (n >= lo[:, None]) & (n < hi[:, None])
    mask = torch.zeros(ok.shape, dtype=dtype, device=dev).masked_fill_(~ok, -_INF)
    item_has_key = ok.view(ok.shape[0], nb // g, g * bs).any(-1)
    return phys, mask, item_has_key


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _decode(qn, qs, k_cache, ks_cache, v_cache, bt, seq_lens, window: int, scale: float,
            max_seqlen_k: int):
    """One query per sequence (at position seq_len - 1): ``qn``/``qs`` ``[B, H_q, D]``.
    Returns ``(out [B, H_q, Dv] float32, lse [B, H_q] float32)``: the compiled kernel when the
    extension is loaded, else :func:`decode_chunked`."""
    if ops.has_kernel("paged_decode", "CPU"):
        if seq_lens.dtype != bt.dtype:
            seq_lens = seq_lens.to(bt.dtype)
        return torch.ops.dpe_kernels.paged_decode(qn, qs, k_cache, ks_cache, v_cache, bt, seq_lens, window,
                                                  float(scale), int(max_seqlen_k))
    return decode_chunked(qn, qs, k_cache, ks_cache, v_cache, bt, seq_lens, window, scale, max_seqlen_k)


def decode_chunked(qn, qs, k_cache, ks_cache, v_cache, bt, seq_lens, window: int, scale: float,
                   max_seqlen_k: int):
    """The decode path without the compiled extension: aten's CPU flash op over
    gathered chunks of blocks, merged by lse (see the module docstring).
    Same arguments and results as the compiled ``paged_decode``."""
    bsz, h_q = qn.shape[:2]
    bs, h_k = k_cache.shape[1], k_cache.shape[2]
    n_rep = h_q // h_k
    # Head-major caches with big blocks: one block per entry, gathered head-major
    # (the cheap copy). Otherwise entries of ITEM_KEYS keys, gathered token-major.
    hm = bs >= HM_MIN_BLOCK and all(head_major(c) for c in (k_cache, ks_cache, v_cache))
    g = 1 if hm else max(1, ITEM_KEYS // bs)
    # chunk: CHUNK_KEYS over the batch, at least one item per sequence
    c_blocks = max(g, (CHUNK_KEYS // (bsz * bs)) // g * g)
    lens = seq_lens.to(torch.int64)
    used = (lens + bs - 1) // bs
    w_lo = (lens - window).clamp(min=0)          # first key of the window
    zero = torch.zeros_like(lens)
    parts = []
    # Window pass: the blocks holding keys [L - w, L): ceil(w / bs) + 1 at most.
    nw = min(_cdiv(window, bs) + 1, _cdiv(max_seqlen_k, bs))
    nw = _cdiv(nw, g) * g
    phys, mask, has = _blocks_and_mask(bt, used, w_lo // bs, nw, bs, w_lo, lens, g, qn.dtype)
    parts += _pass_chunks(qn, k_cache, v_cache, phys, mask, has, n_rep, scale, g, c_blocks, hm)
    # Scaled pass: keys [0, L - w), the blocks before the window (+ the edge block).
    ns = _cdiv(max(max_seqlen_k - window, 0), bs)
    if ns:
        ns = _cdiv(ns, g) * g
        phys, mask, has = _blocks_and_mask(bt, used, zero, ns, bs, zero, lens - window, g, qn.dtype)
        parts += _pass_chunks(qs, ks_cache, v_cache, phys, mask, has, n_rep, scale, g, c_blocks, hm)
    # Merge every item's partial result by lse (float32): rows with no key at
    # all (seq_len 0) end with out 0 and lse -inf, never NaN.
    o_all = torch.cat([o for o, _ in parts], 1)                 # [B, n_items, H_q, Dv]
    l_all = torch.cat([l for _, l in parts], 1)                 # [B, n_items, H_q]
    m = l_all.amax(1)
    m = torch.where(m == -_INF, 0.0, m)
    wts = torch.exp(l_all - m[:, None])                         # 0 for an item without keys
    den = wts.sum(1)
    lse = m + torch.log(den)
    o_all = torch.where(wts[..., None] > 0, o_all.float(), 0.0)
    out = torch.einsum("bnh,bnhd->bhd", wts, o_all) / torch.where(den == 0, 1.0, den)[..., None]
    return out, lse


def _gather_path(qn, qs, k_cache, ks_cache, v_cache, bt, window, scale, seqs, out, lse):
    """Sequences ``seqs`` = [(b, q_start, q_len, seq_len)]: gather each one's
    pages into contiguous tensors and run the cpu attention kernel on them."""
    h_q, d = qn.shape[1:]
    h_k, h_ks, dv = k_cache.shape[2], ks_cache.shape[2], v_cache.shape[3]
    for b, qa, ql, n in seqs:
        kn, ks, v = (gather_sequence(c, bt, b, n)[None] for c in (k_cache, ks_cache, v_cache))
        info = AttentionInfo(varlen=False, B=1, S_q=ql, S_k=n, H_q=h_q, H_k=h_k, H_ks=h_ks, D=d, Dv=dv)
        o, l = cpu_attention(qn[None, qa: qa + ql], qs[None, qa: qa + ql], kn, ks, v, window, scale, None, info)
        out[qa: qa + ql] = o[0]
        lse[qa: qa + ql] = l[0]


def paged_attention_cpu(q_normal, q_scaled, k_cache, ks_cache, v_cache, block_table, seq_lens,
                        query_start_loc, window: int, scale: float, info, out, lse) -> None:
    """Writes ``out [T_q, H_q, Dv]`` and ``lse [T_q, H_q]`` (inputs validated by
    dpe_paged_attention; ``info`` carries the shapes and the caller's
    ``max_seqlen_q`` / ``max_seqlen_k``)."""
    if info.T_q == 0:
        return
    if info.num_blocks == 0:  # no key anywhere (valid inputs: every seq_len is 0)
        out.zero_()
        lse.fill_(-_INF)
        return
    decode_ok = info.D == info.Dv or ops.has_kernel("paged_decode", "CPU")  # the fallback needs D == Dv
    if decode_ok and info.max_seqlen_q <= 1 and info.T_q == info.B:
        # every sequence has exactly one query, row b: no host read at all
        o, l = _decode(q_normal, q_scaled, k_cache, ks_cache, v_cache, block_table, seq_lens,
                       window, scale, info.max_seqlen_k)
        out.copy_(o)
        lse.copy_(l)
        return
    qsl = [int(x) for x in query_start_loc.tolist()]
    q_lens = [b - a for a, b in zip(qsl, qsl[1:])]
    dec = [b for b, ql in enumerate(q_lens) if ql == 1] if decode_ok else []
    others = [b for b, ql in enumerate(q_lens) if ql > 1 or (ql == 1 and not decode_ok)]
    if dec:
        sel = torch.tensor(dec, dtype=torch.int64)
        rows = torch.tensor([qsl[b] for b in dec], dtype=torch.int64)
        o, l = _decode(q_normal.index_select(0, rows), q_scaled.index_select(0, rows), k_cache, ks_cache,
                       v_cache, block_table.index_select(0, sel), seq_lens.index_select(0, sel),
                       window, scale, info.max_seqlen_k)
        out.index_copy_(0, rows, o.to(out.dtype))
        lse.index_copy_(0, rows, l)
    if others:
        lens = [int(x) for x in seq_lens.tolist()]
        _gather_path(q_normal, q_scaled, k_cache, ks_cache, v_cache, block_table, window, scale,
                     [(b, qsl[b], q_lens[b], lens[b]) for b in others], out, lse)


# --------------------------------------------------------------------------- unrotated keys
def _rotate_sequence(q, k, cos_sin, pair_scale, window: int, key_dims, rotary_dim: int, neox: bool, dtype):
    """One sequence's queries ``q [S_q, H_q, D]`` (its last positions) and unrotated keys ``k [S_k,
    H_k, D]``: ``(q_normal, q_scaled, k_normal, k_scaled)`` in ``dtype``, rotated from the table;
    ``k_scaled`` has ``H_q`` heads when ``key_dims`` (``[H_q, P]``) is given, else ``H_k``."""
    s_q, h_q = q.shape[:2]
    s_k, h_k = k.shape[:2]
    p = rotary_dim // 2
    dev = q.device
    kd_q = key_dims if key_dims is not None else torch.ones(h_q, p, dtype=torch.bool, device=dev)
    kd_k = key_dims if key_dims is not None else torch.ones(h_k, p, dtype=torch.bool, device=dev)
    qn_i, qs_i, _ = rotary_indices(torch.arange(s_k - s_q, s_k, device=dev), pair_scale, window, kd_q)
    kn_i, _, ks_i = rotary_indices(torch.arange(s_k, device=dev), pair_scale, window, kd_k)
    rot = lambda x, i: table_rotate(x, i, cos_sin, rotary_dim, neox, torch.float32).to(dtype)  # noqa: E731
    k_s = k if key_dims is None else k.repeat_interleave(h_q // h_k, 1)
    return rot(q, qn_i), rot(q, qs_i), rot(k, kn_i[:, :h_k]), rot(k_s, ks_i)


def paged_rotary_cpu(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, cos_sin, pair_scale, window,
                     seq_config, mask, rotary_dim: int, neox: bool, scale: float, info, out, lse) -> None:
    """:func:`dpe_kernels.dpe_paged_attention_rotary` on CPU tensors (validated): decode rows by the
    compiled ``paged_decode_rotary`` kernel when the extension has it (keys rotated as they are
    read, in place in the cache); every other row (and every row without it) by gathering the
    sequence's pages, rotating them from the table (O(S) next to the O(S^2) attention) and the cpu
    attention kernel."""
    if info.T_q == 0:
        return
    if info.num_blocks == 0:
        out.zero_()
        lse.fill_(-_INF)
        return
    fused = ops.has_kernel("paged_decode_rotary", "CPU")
    if fused and info.max_seqlen_q <= 1 and info.T_q == info.B:
        _decode_rotary(q, k_cache, v_cache, block_table, seq_lens, cos_sin, pair_scale, window, seq_config, mask,
                       rotary_dim, neox, scale, info.max_seqlen_k, out, lse)
        return
    qsl = host_ints(query_start_loc)
    q_lens = [b - a for a, b in zip(qsl, qsl[1:])]
    dec = [b for b, ql in enumerate(q_lens) if ql == 1] if fused else []
    if dec:
        sel = torch.tensor(dec, dtype=torch.int64)
        rows = torch.tensor([qsl[b] for b in dec], dtype=torch.int64)
        o = out.new_empty((len(dec), info.H_q, info.Dv))
        l = lse.new_empty((len(dec), info.H_q))
        _decode_rotary(q.index_select(0, rows), k_cache, v_cache, block_table.index_select(0, sel),
                       seq_lens.index_select(0, sel), cos_sin, pair_scale, window, seq_config.index_select(0, sel),
                       mask, rotary_dim, neox, scale, info.max_seqlen_k, o, l)
        out.index_copy_(0, rows, o)
        lse.index_copy_(0, rows, l)
    others = [b for b, ql in enumerate(q_lens) if ql > 1 or (ql == 1 and not fused)]
    if not others:
        return
    lens, cfgs, wins = host_ints(seq_lens), host_ints(seq_config), host_ints(window)
    h_q, d, dv = info.H_q, info.D, info.Dv
    for b in others:
        qa, ql, n, c = qsl[b], q_lens[b], lens[b], cfgs[b]
        kd = None if mask is None else mask[c]
        k, v = (gather_sequence(t, block_table, b, n) for t in (k_cache, v_cache))
        qn, qs, kn, ks = _rotate_sequence(q[qa: qa + ql], k, cos_sin, pair_scale[c], wins[c], kd, rotary_dim, neox,
                                          q.dtype)
        ainfo = AttentionInfo(varlen=False, B=1, S_q=ql, S_k=n, H_q=h_q, H_k=info.H_k, H_ks=ks.shape[1], D=d, Dv=dv)
        o, l = cpu_attention(qn[None], qs[None], kn[None], ks[None], v[None], wins[c], scale, None, ainfo)
        out[qa: qa + ql] = o[0]
        lse[qa: qa + ql] = l[0]


def _decode_rotary(q, k_cache, v_cache, bt, seq_lens, cos_sin, pair_scale, window, seq_config, mask, rotary_dim,
                   neox, scale, max_seqlen_k, out, lse) -> None:
    """One query per sequence (row b at position seq_lens[b] - 1): the compiled kernel, which
    rotates q and every key it reads from the table."""
    if seq_lens.dtype != bt.dtype:
        seq_lens = seq_lens.to(bt.dtype)
    o, l = torch.ops.dpe_kernels.paged_decode_rotary(q, k_cache, v_cache, bt, seq_lens, cos_sin, pair_scale, window,
                                                     seq_config.to(bt.dtype), mask, rotary_dim, neox, float(scale),
                                                     int(max_seqlen_k))
    out.copy_(o)
    lse.copy_(l)
