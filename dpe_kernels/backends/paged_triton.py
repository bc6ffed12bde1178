"""The ``triton`` paged-attention backend: DPE attention over a paged KV cache as one
Triton kernel. It does not validate: its caller (``dpe_paged_attention``) has.

The key loop is that of ``attention_triton`` (tiles classified by the distances they
cover, one online softmax over both kinds of logits, ``triton_common``), plus:

* pages: key ``n`` of sequence ``b`` is read at ``block_table[b, n // PAGE_SIZE]``,
  offset ``n % PAGE_SIZE``; a tile inside one page (``TILE_IN_PAGE``) costs one
  block-table load and contiguous K/V loads;
* split-KV decode: the keys of a decode step are cut into ``num_splits`` ranges, one
  program each, whose float32 partial outputs and lse a second kernel merges
  (``num_splits == 1`` writes the output directly);
* packed varlen queries through ``query_start_loc``; the grid is sized by the caller's
  ``max_seqlen_q`` (never read back from the device).

Addressing: 64-bit scalar bases for block / token / head, 32-bit offsets inside a tile.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .triton_common import (INTERPRETED, bf16_bits_to_f32, classify_key_tiles, combine_splits_kernel, next_pow2,
                           num_kv_splits, online_softmax_step, round_out)

__all__ = ["paged_attention_triton", "num_kv_splits"]

_LOG2E = 1.4426950408889634

# Tile kinds of the key loop (constexpr MODE of _paged_tiles).
_NORMAL = tl.constexpr(0)
_SCALED = tl.constexpr(1)
_BOTH = tl.constexpr(2)


# --------------------------------------------------------------------------- kernels
@triton.jit
def _key_ptrs(head, blk, in_page, offs_n, blk_s, tok_s, TILE_IN_PAGE: tl.constexpr):
    """Pointers [BLOCK_N] to a tile's keys in one cache (block / token strides
    blk_s / tok_s; ``head`` already points at the head). In one page: the
    64-bit scalar base is added to the pointer first, so the per-key part
    stays 32-bit; else 64-bit per key."""
    if TILE_IN_PAGE:
        return (head + (blk * blk_s + in_page.to(tl.int64) * tok_s)) + offs_n * tok_s
    else:
        return head + (blk * blk_s + in_page.to(tl.int64) * tok_s)


@triton.jit
def _paged_tiles(
    acc, l_i, m_i, q_n, q_s,
    kn_head, ks_head, v_head, bt_row,
    kn_bs, kn_ts, ks_bs, ks_ts, v_bs, v_ts,
    offs_n, offs_d, offs_dv, kd_ok, vd_ok,
    pos_m, k_lo, k_hi, j_lo, j_hi, window, qk_scale,
    MODE: tl.constexpr,          # _NORMAL / _SCALED / _BOTH logits in these tiles
    MASKED: tl.constexpr,        # tiles may cross the causal diagonal or the end of the range
    PAGE_SIZE: tl.constexpr, TILE_IN_PAGE: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BF16_BY_BITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Key tiles j_lo .. j_hi-1 (keys k_lo + j * BLOCK_N + [0, BLOCK_N)) of one query tile."""
    for j in range(j_lo, j_hi):
        n0 = k_lo + j * BLOCK_N
        n = n0 + offs_n
        if MASKED:
            n_ok = n < k_hi
        else:
            n_ok = None
        # load masks only where needed: full tiles of a power-of-two head dim
        # load unpredicated (vectorised)
        if MASKED:
            if EVEN_D:
                k_mask = n_ok[None, :]
            else:
                k_mask = kd_ok & n_ok[None, :]
            if EVEN_DV:
                v_mask = n_ok[:, None]
            else:
                v_mask = vd_ok & n_ok[:, None]
            k_other = 0.0
            v_other = 0.0
        else:
            if EVEN_D:
                k_mask = None
                k_other = None
            else:
                k_mask = kd_ok
                k_other = 0.0
            if EVEN_DV:
                v_mask = None
                v_other = None
            else:
                v_mask = vd_ok
                v_other = 0.0
        # physical block of the tile's keys: one block-table load per tile
        # (TILE_IN_PAGE: the tile lies in one page), else one per key
        if TILE_IN_PAGE:
            blk = tl.load(bt_row + n0 // PAGE_SIZE).to(tl.int64)
            in_page = n0 % PAGE_SIZE
        else:
            if MASKED:
                blk = tl.load(bt_row + n // PAGE_SIZE, mask=n_ok, other=0).to(tl.int64)
            else:
                blk = tl.load(bt_row + n // PAGE_SIZE).to(tl.int64)
            in_page = n % PAGE_SIZE
        if MODE != _SCALED:
            kp = _key_ptrs(kn_head, blk, in_page, offs_n, kn_bs, kn_ts, TILE_IN_PAGE)
            kn = tl.load(kp[None, :] + offs_d[:, None], mask=k_mask, other=k_other)
            if BF16_BY_BITS:
                kn = bf16_bits_to_f32(kn)
            qk = tl.dot(q_n, kn, input_precision=DOT_PRECISION)
        if MODE != _NORMAL:
            kp = _key_ptrs(ks_head, blk, in_page, offs_n, ks_bs, ks_ts, TILE_IN_PAGE)
            ks = tl.load(kp[None, :] + offs_d[:, None], mask=k_mask, other=k_other)
            if BF16_BY_BITS:
                ks = bf16_bits_to_f32(ks)
            qk_s = tl.dot(q_s, ks, input_precision=DOT_PRECISION)
            if MODE == _BOTH:
                # per element: normal inside the window, scaled beyond
                qk = tl.where(pos_m[:, None] - n[None, :] < window, qk, qk_s)
            else:
                qk = qk_s
        qk = qk * qk_scale                             # log2 units
        if MASKED:
            # causal (n <= m); keys at or past k_hi are beyond every real row's
            # diagonal or outside this program's split range
            qk = tl.where((n[None, :] <= pos_m[:, None]) & n_ok[None, :], qk, float("-inf"))
        vp = _key_ptrs(v_head, blk, in_page, offs_n, v_bs, v_ts, TILE_IN_PAGE)
        vt = tl.load(vp[:, None] + offs_dv[None, :], mask=v_mask, other=v_other)
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, qk, vt, MASKED, BF16_BY_BITS, DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _paged_fwd_kernel(
    qn_ptr, qs_ptr, kn_ptr, ks_ptr, v_ptr, out_ptr, lse_ptr, po_ptr, pl_ptr,
    bt_ptr, seq_lens_ptr, qsl_ptr,
    n_rep, ks_div, window, qk_scale, num_splits, keys_per_split,
    qn_ts, qn_hs, qs_ts, qs_hs,
    kn_bs, kn_ts, kn_hs, ks_bs, ks_ts, ks_hs, v_bs, v_ts, v_hs,
    o_ts, o_hs, l_ts, l_hs, bt_s,
    G: tl.constexpr,             # query heads packed into the rows of one program (pack GQA)
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    PAGE_SIZE: tl.constexpr, TILE_IN_PAGE: tl.constexpr,
    SPLIT: tl.constexpr,         # write float32 partials (po/pl) for the combine kernel
    RETURN_LSE: tl.constexpr,
    BF16_BY_BITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # Grid: (query-row tiles x splits, head groups, sequences). Rows of a
    # program are (query, packed head) pairs, row = s * G + r.
    pid0 = tl.program_id(0)
    start_m = pid0 // num_splits
    split = pid0 % num_splits
    hg = tl.program_id(1)
    b = tl.program_id(2)

    q_start = tl.load(qsl_ptr + b).to(tl.int32)
    seqlen_q = tl.load(qsl_ptr + b + 1).to(tl.int32) - q_start
    rows = seqlen_q * G
    if start_m * BLOCK_M >= rows:
        return  # the grid covers the longest query; this sequence's is shorter (or 0)
    seqlen_k = tl.load(seq_lens_ptr + b).to(tl.int32)
    off = seqlen_k - seqlen_q                # query s sits at position s + off

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < rows
    s_idx = offs_m // G
    h_q = hg * G + (offs_m - s_idx * G)
    pos_m = s_idx + off
    h_kv = (hg * G) // n_rep                 # one KV head and one k_scaled head per program
    h_ks = (hg * G) // ks_div
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    # 64-bit scalar bases + 32-bit in-tile offsets
    s0 = (start_m * BLOCK_M) // G
    h0 = hg * G
    ds = s_idx - s0
    dh = h_q - h0
    t0 = (q_start + s0).to(tl.int64)         # first query token of the tile
    h0_64 = h0.to(tl.int64)
    if HEAD_DIM == BLOCK_D:
        q_mask = row_ok[:, None]
    else:
        q_mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    q_n = tl.load(qn_ptr + (t0 * qn_ts + h0_64 * qn_hs) + (ds * qn_ts + dh * qn_hs)[:, None] + offs_d[None, :],
                  mask=q_mask, other=0.0)
    q_s = tl.load(qs_ptr + (t0 * qs_ts + h0_64 * qs_hs) + (ds * qs_ts + dh * qs_hs)[:, None] + offs_d[None, :],
                  mask=q_mask, other=0.0)
    if BF16_BY_BITS:
        q_n = bf16_bits_to_f32(q_n)
        q_s = bf16_bits_to_f32(q_s)
    kn_head = kn_ptr + h_kv.to(tl.int64) * kn_hs
    ks_head = ks_ptr + h_ks.to(tl.int64) * ks_hs
    v_head = v_ptr + h_kv.to(tl.int64) * v_hs
    bt_row = bt_ptr + b.to(tl.int64) * bt_s
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    EVEN_DV: tl.constexpr = HEAD_DIM_V == BLOCK_DV
    kd_ok = (offs_d < HEAD_DIM)[:, None]
    vd_ok = (offs_dv < HEAD_DIM_V)[None, :]

    # --- key range of this program and its tile classes -------------------
    m0 = (start_m * BLOCK_M) // G + off                      # first real row's position
    m1 = (tl.minimum(start_m * BLOCK_M + BLOCK_M, rows) - 1) // G + off   # last real row's
    k_lo = split * keys_per_split                            # a multiple of BLOCK_N
    k_hi = tl.minimum(k_lo + keys_per_split, m1 + 1)
    n_tiles, j_s, j_n, j_d = classify_key_tiles(m0, m1, k_lo, k_hi, window, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    acc, l_i, m_i = _paged_tiles(
        acc, l_i, m_i, q_n, q_s, kn_head, ks_head, v_head, bt_row,
        kn_bs, kn_ts, ks_bs, ks_ts, v_bs, v_ts, offs_n, offs_d, offs_dv, kd_ok, vd_ok,
        pos_m, k_lo, k_hi, 0, j_s, window, qk_scale,
        _SCALED, False, PAGE_SIZE, TILE_IN_PAGE, EVEN_D, EVEN_DV, BLOCK_N, BF16_BY_BITS, DOT_PRECISION)
    acc, l_i, m_i = _paged_tiles(
        acc, l_i, m_i, q_n, q_s, kn_head, ks_head, v_head, bt_row,
        kn_bs, kn_ts, ks_bs, ks_ts, v_bs, v_ts, offs_n, offs_d, offs_dv, kd_ok, vd_ok,
        pos_m, k_lo, k_hi, j_s, j_n, window, qk_scale,
        _BOTH, True, PAGE_SIZE, TILE_IN_PAGE, EVEN_D, EVEN_DV, BLOCK_N, BF16_BY_BITS, DOT_PRECISION)
    acc, l_i, m_i = _paged_tiles(
        acc, l_i, m_i, q_n, q_s, kn_head, ks_head, v_head, bt_row,
        kn_bs, kn_ts, ks_bs, ks_ts, v_bs, v_ts, offs_n, offs_d, offs_dv, kd_ok, vd_ok,
        pos_m, k_lo, k_hi, j_n, j_d, window, qk_scale,
        _NORMAL, False, PAGE_SIZE, TILE_IN_PAGE, EVEN_D, EVEN_DV, BLOCK_N, BF16_BY_BITS, DOT_PRECISION)
    acc, l_i, m_i = _paged_tiles(
        acc, l_i, m_i, q_n, q_s, kn_head, ks_head, v_head, bt_row,
        kn_bs, kn_ts, ks_bs, ks_ts, v_bs, v_ts, offs_n, offs_d, offs_dv, kd_ok, vd_ok,
        pos_m, k_lo, k_hi, j_d, n_tiles, window, qk_scale,
        _NORMAL, True, PAGE_SIZE, TILE_IN_PAGE, EVEN_D, EVEN_DV, BLOCK_N, BF16_BY_BITS, DOT_PRECISION)

    # --- epilogue: normalise; rows without a key -> out 0, lse -inf ---------
    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    o = acc / l_safe[:, None]
    lse = tl.where(has_key, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    if HEAD_DIM_V == BLOCK_DV:
        o_mask = row_ok[:, None]
    else:
        o_mask = row_ok[:, None] & (offs_dv < HEAD_DIM_V)[None, :]
    tok = t0 + ds                                            # int64 token of each row
    if SPLIT:
        # workspace [T_q, H_q, num_splits, (Dv)], float32, contiguous
        prow = (tok * (tl.num_programs(1) * G) + h_q) * num_splits + split
        tl.store(po_ptr + prow[:, None] * HEAD_DIM_V + offs_dv[None, :], o, mask=o_mask)
        tl.store(pl_ptr + prow, lse, mask=row_ok)
    else:
        o_ptrs = out_ptr + (tok * o_ts + h_q.to(tl.int64) * o_hs)[:, None] + offs_dv[None, :]
        tl.store(o_ptrs, round_out(o, out_ptr.dtype.element_ty, BF16_BY_BITS), mask=o_mask)
        if RETURN_LSE:
            tl.store(lse_ptr + tok * l_ts + h_q.to(tl.int64) * l_hs, lse, mask=row_ok)


# --------------------------------------------------------------------------- launcher
def _block_config(dtype: torch.dtype, bd: int, rows: int) -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). A power-of-two page of at
    least BLOCK_N keys holds whole tiles (TILE_IN_PAGE: one block-table load
    per tile). Smaller pages (vLLM's GPU default is 16) keep the wider tile
    and load each key's block id (each key's row is still contiguous), as
    vLLM's own Triton attention does, rather than shrinking the tile to the
    page. Not tuned on a GPU (none was available): a starting point."""
    if INTERPRETED:
        # the interpreter pays per program and per op: the smallest legal tiles
        # (tl.dot needs >= 16) keep every tile class exercised by small tests
        bm, bn = 16, 16
        warps, stages = 1, 1
    else:
        bm = min(max(16, next_pow2(rows)), 128 if dtype != torch.float32 and bd <= 128 else 64)
        bn = 64 if dtype != torch.float32 and bd <= 128 else 32
        warps = 8 if bm >= 128 else 4
        stages = 2 if bd > 64 or dtype == torch.float32 else 3
    return bm, bn, warps, stages


def paged_attention_triton(q_normal, q_scaled, k_cache, ks_cache, v_cache, block_table, seq_lens,
                           query_start_loc, window: int, softmax_scale: float, max_seqlen_q: int,
                           max_seqlen_k: int, out: torch.Tensor, lse: torch.Tensor, return_lse: bool,
                           num_splits: Optional[int] = None) -> None:
    """Launch the paged kernel (inputs validated by dpe_paged_attention):
    writes ``out [T_q, H_q, Dv]`` and, with ``return_lse``, ``lse [T_q, H_q]``
    (float32, natural log). ``num_splits``: key ranges per query tile (None:
    :func:`num_kv_splits`); every split is ``keys_per_split`` keys, a multiple
    of BLOCK_N."""
    t_q, hq, d = q_normal.shape
    nb, page, hk, _ = k_cache.shape
    hks, dv = ks_cache.shape[2], v_cache.shape[3]
    batch = block_table.shape[0]
    if t_q == 0 or hq == 0:
        return
    if batch == 0 or max_seqlen_q == 0 or nb == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        return
    n_rep = hq // hk
    ks_div = hq // hks
    group = n_rep if ks_div == n_rep else 1  # pack GQA when the n_rep heads share k_scaled too
    n_groups = hq // group
    block_d, block_dv = max(16, next_pow2(d)), max(16, next_pow2(dv))
    rows = max_seqlen_q * group
    bm, bn, warps, stages = _block_config(q_normal.dtype, max(block_d, block_dv), rows)
    tile_in_page = page % bn == 0
    for name, t in (("k_cache", k_cache), ("ks_cache", ks_cache), ("v_cache", v_cache)):
        # in-tile offsets are int32: BLOCK_N tokens of one page, one head
        if t.stride(1) * (bn + 1) + max(block_d, block_dv) >= 2 ** 31:
            raise ValueError(f"{name} has a token stride ({t.stride(1)}) too large for the Triton kernel's "
                             "32-bit in-tile offsets")
    m_tiles = triton.cdiv(rows, bm)
    if num_splits is None:
        num_splits = num_kv_splits(m_tiles * n_groups * batch, max_seqlen_k, q_normal.device)
    keys_per_split = triton.cdiv(triton.cdiv(max(max_seqlen_k, 1), num_splits), bn) * bn
    num_splits = triton.cdiv(max(max_seqlen_k, 1), keys_per_split)
    split = num_splits > 1
    if split:
        # float32 partials [T_q, H_q, num_splits, Dv] and their lse
        po = torch.empty((t_q, hq, num_splits, dv), dtype=torch.float32, device=q_normal.device)
        pl = torch.empty((t_q, hq, num_splits), dtype=torch.float32, device=q_normal.device)
    else:
        po = pl = out                                      # never read (SPLIT=False)
    bf16_bits = INTERPRETED and q_normal.dtype == torch.bfloat16
    lse_t = lse if return_lse else out
    l_strides = (lse.stride(0), lse.stride(1)) if return_lse else (0, 0)
    guard = contextlib.nullcontext()
    if q_normal.is_cuda and q_normal.device.index not in (None, torch.cuda.current_device()):
        guard = torch.cuda.device(q_normal.device)
    with guard:
        _paged_fwd_kernel[(m_tiles * num_splits, n_groups, batch)](
            q_normal, q_scaled, k_cache, ks_cache, v_cache, out, lse_t, po, pl,
            block_table, seq_lens, query_start_loc,
            n_rep, ks_div, int(window), float(softmax_scale) * _LOG2E, num_splits, keys_per_split,
            q_normal.stride(0), q_normal.stride(1), q_scaled.stride(0), q_scaled.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            ks_cache.stride(0), ks_cache.stride(1), ks_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            out.stride(0), out.stride(1), l_strides[0], l_strides[1], block_table.stride(0),
            G=group, HEAD_DIM=d, HEAD_DIM_V=dv, PAGE_SIZE=page, TILE_IN_PAGE=tile_in_page,
            SPLIT=split, RETURN_LSE=bool(return_lse),
            BF16_BY_BITS=bf16_bits,
            DOT_PRECISION="ieee" if q_normal.dtype == torch.float32 else "tf32",
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, BLOCK_DV=block_dv,
            num_warps=warps, num_stages=stages,
        )
        if split:
            combine_splits_kernel[(t_q, hq)](
                po, pl, out, lse_t, num_splits, hq,
                out.stride(0), out.stride(1), l_strides[0], l_strides[1],
                HEAD_DIM_V=dv, RETURN_LSE=bool(return_lse), BF16_BY_BITS=bf16_bits,
                BLOCK_S=max(2, next_pow2(num_splits)), BLOCK_DV=block_dv,
                num_warps=1 if INTERPRETED else 4,
            )
