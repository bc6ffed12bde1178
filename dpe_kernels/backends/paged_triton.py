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
  ``max_seqlen_q`` (never read back from the device);
* ``ROTARY`` (``paged_rotary_triton``, for ``dpe_paged_attention_rotary``): the same kernel over
  a cache of UNROTATED keys. Each program loads its sequence's configuration
  (``seq_config[b]``: window, pair scales, and with ``HAS_MASK`` the key dims of its query
  head), rotates its queries once (normal and scaled) and rotates each key tile as it is
  loaded, from the float32 cos/sin table: at the normal rows in tiles inside the window, at
  the scaled rows in tiles beyond it, both in the tiles at its edge (the same tile classes).
  Without a mask the ``n_rep`` query heads of a KV head share the rotated keys (GQA packed);
  with one, one query head per program.

``cache_write_triton`` writes new unrotated k / v into the paged caches at a slot mapping.

Addressing: 64-bit scalar bases for block / token / head, 32-bit offsets inside a tile;
table offsets (position x row stride) in 64 bits, positions (< 2^24) in 32.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .triton_common import (INTERPRETED, bf16_bits_to_f32, classify_key_tiles, combine_splits_kernel, next_pow2,
                           num_kv_splits, online_softmax_step, round_bf16_bits, round_out)

__all__ = ["paged_attention_triton", "paged_rotary_triton", "cache_write_triton", "num_kv_splits"]

_LOG2E = 1.4426950408889634

# Tile kinds of the key loop (constexpr MODE of _paged_tiles).
_NORMAL = tl.constexpr(0)
_SCALED = tl.constexpr(1)
_BOTH = tl.constexpr(2)


# --------------------------------------------------------------------------- kernels
# Rotating on load reads cos / sin from a float32 table (rotary_table: row t = cos | sin of
# float32(t) * inv_freq) instead of computing them. A DPE index is a position, up to 2^24, so the
# angles are far outside [-pi, pi]: an accurate sin / cos there needs a full-range argument
# reduction (Payne-Hanek / a multi-word Cody-Waite), tens of instructions per element, and fast
# hardware sin / cos (MUFU) loses every digit there. Doing that for every key element, twice at
# the window edge, on every pass over the cache would cost more than the attention's two dots;
# a table entry is one gathered float32 load per element, shared by every head, sequence and
# configuration (a remapped index is just another row), and mostly served from L2.
@triton.jit
def _rotate(x, x_par, cs_ptr, row_off, pair, sgn, ok, ROT_DIM: tl.constexpr):
    """``x`` (float32) rotated pair by pair: ``x * cos + sgn * partner * sin`` (``sgn`` -1 for
    a pair's first element, +1 for its second, as ``(a cos - b sin, a sin + b cos)``), cos / sin
    read at the int64 table offsets ``row_off + pair`` (cos) and ``+ ROT_DIM / 2`` (sin). Where
    ``ok`` is False (dims past the rotary ones, keys past the range): cos 1, sin 0, ``x`` as is."""
    c = tl.load(cs_ptr + row_off + pair, mask=ok, other=1.0)
    s = tl.load(cs_ptr + row_off + (ROT_DIM // 2 + pair), mask=ok, other=0.0)
    return x * c + (x_par * sgn) * s


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
    cs_ptr, cs_s, pair_d, part_d, sgn_d, rot_d, sk_d,
    MODE: tl.constexpr,          # _NORMAL / _SCALED / _BOTH logits in these tiles
    MASKED: tl.constexpr,        # tiles may cross the causal diagonal or the end of the range
    PAGE_SIZE: tl.constexpr, TILE_IN_PAGE: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BF16_BY_BITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ROTARY: tl.constexpr,        # unrotated keys (kn_head), rotated here from the cos/sin table
    ROT_DIM: tl.constexpr,
):
    """Key tiles j_lo .. j_hi-1 (keys k_lo + j * BLOCK_N + [0, BLOCK_N)) of one query tile.
    With ROTARY, ``kn_head`` points at the unrotated keys: each tile is loaded once (and its
    pair partners, ``part_d``) and rotated at the normal rows ``n`` and / or the scaled rows
    ``n // sk_d`` (``sk_d``: the pair's scale for a key dimension, else 1) as MODE needs;
    ``ks_head`` is not read."""
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
        if ROTARY:
            # one load of the tile and one of its pair partners (the same cache lines)
            kp = _key_ptrs(kn_head, blk, in_page, offs_n, kn_bs, kn_ts, TILE_IN_PAGE)
            k_raw = tl.load(kp[None, :] + offs_d[:, None], mask=k_mask, other=k_other)
            k_par = tl.load(kp[None, :] + part_d[:, None], mask=k_mask, other=k_other)
            if BF16_BY_BITS:
                k_raw = bf16_bits_to_f32(k_raw)
                k_par = bf16_bits_to_f32(k_par)
            else:
                k_raw = k_raw.to(tl.float32)
                k_par = k_par.to(tl.float32)
            if MASKED:
                cs_ok = rot_d[:, None] & n_ok[None, :]   # keys past k_hi may lie past the table
            else:
                cs_ok = rot_d[:, None]
            if MODE != _SCALED:
                kn = _rotate(k_raw, k_par, cs_ptr, n.to(tl.int64)[None, :] * cs_s, pair_d[:, None],
                             sgn_d[:, None], cs_ok, ROT_DIM)
                if BF16_BY_BITS:
                    kn = round_bf16_bits(kn)
                else:
                    kn = kn.to(q_n.dtype)
                qk = tl.dot(q_n, kn, input_precision=DOT_PRECISION)
            if MODE != _NORMAL:
                ks = _rotate(k_raw, k_par, cs_ptr, (n[None, :] // sk_d[:, None]).to(tl.int64) * cs_s,
                             pair_d[:, None], sgn_d[:, None], cs_ok, ROT_DIM)
                if BF16_BY_BITS:
                    ks = round_bf16_bits(ks)
                else:
                    ks = ks.to(q_s.dtype)
                qk_s = tl.dot(q_s, ks, input_precision=DOT_PRECISION)
        else:
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
        if MODE != _NORMAL:
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
    cs_ptr, cfg_ptr, ps_ptr, win_ptr, mask_ptr,   # ROTARY: table, seq_config, pair_scale, window, mask
    n_rep, ks_div, window, qk_scale, num_splits, keys_per_split,
    qn_ts, qn_hs, qs_ts, qs_hs,
    kn_bs, kn_ts, kn_hs, ks_bs, ks_ts, ks_hs, v_bs, v_ts, v_hs,
    o_ts, o_hs, l_ts, l_hs, bt_s,
    cs_s, ps_cs, ps_ps, mk_cs, mk_hs, mk_ps,
    G: tl.constexpr,             # query heads packed into the rows of one program (pack GQA)
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    PAGE_SIZE: tl.constexpr, TILE_IN_PAGE: tl.constexpr,
    SPLIT: tl.constexpr,         # write float32 partials (po/pl) for the combine kernel
    RETURN_LSE: tl.constexpr,
    BF16_BY_BITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ROTARY: tl.constexpr = False,  # q / k unrotated (qn_ptr / kn_ptr), rotated from cs_ptr here
    HAS_MASK: tl.constexpr = False,  # ROTARY: per-query-head key dims (G == 1: one head a program)
    IS_NEOX: tl.constexpr = True,    # ROTARY: pair i is (i, i + P), else (2i, 2i + 1)
    ROT_DIM: tl.constexpr = 2,       # ROTARY: rotated leading dims R = 2P
):
    # Grid: (query-row tiles x splits, head groups, sequences). Rows of a
    # program are (query, packed head) pairs, row = s * G + r.
    # ROTARY: q (qn_ptr) and the keys (kn_ptr) are unrotated; the sequence's configuration
    # c = seq_config[b] gives the window (the ``window`` argument is ignored), the pair scales
    # and, with HAS_MASK, the key dims of this program's query head. ks_ptr / qs_ptr are unused.
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
    if ROTARY:
        # --- this sequence's configuration, per head dim d: its pair, the pair partner, the
        # sign of the partner's sin term, and the scale of its scaled index (1 for a pair that
        # is not a key dim of this program's head). Indices are positions < 2^24 (the table's
        # limit), formed in int32 (cheap division); table offsets row * cs_s in int64.
        cfg = tl.load(cfg_ptr + b).to(tl.int64)
        window = tl.minimum(tl.load(win_ptr + cfg), 1 << 30).to(tl.int32)   # > any position: same
        HALF: tl.constexpr = ROT_DIM // 2
        rot_d = offs_d < ROT_DIM
        if IS_NEOX:
            first = offs_d < HALF
            pair_d = tl.where(rot_d, tl.where(first, offs_d, offs_d - HALF), 0)
            part_d = tl.where(rot_d, tl.where(first, offs_d + HALF, offs_d - HALF), offs_d)
        else:
            first = offs_d % 2 == 0
            pair_d = tl.where(rot_d, offs_d // 2, 0)
            part_d = tl.where(rot_d, offs_d ^ 1, offs_d)
        sgn_d = tl.where(rot_d, tl.where(first, -1.0, 1.0), 0.0)
        sk_d = tl.load(ps_ptr + cfg * ps_cs + pair_d * ps_ps, mask=rot_d, other=1)
        sk_d = tl.minimum(sk_d, 1 << 30).to(tl.int32)
        if HAS_MASK:
            kdm = tl.load(mask_ptr + cfg * mk_cs + h0_64 * mk_hs + pair_d * mk_ps, mask=rot_d, other=0)
            sk_d = tl.where(kdm != 0, sk_d, 1)
        # --- queries rotated once: normal at m, scaled at m // s + (w - w // s) past the window
        q_row = qn_ptr + (t0 * qn_ts + h0_64 * qn_hs) + (ds * qn_ts + dh * qn_hs)[:, None]
        q_raw = tl.load(q_row + offs_d[None, :], mask=q_mask, other=0.0)
        q_par = tl.load(q_row + part_d[None, :], mask=q_mask, other=0.0)
        if BF16_BY_BITS:
            q_raw = bf16_bits_to_f32(q_raw)
            q_par = bf16_bits_to_f32(q_par)
        else:
            q_raw = q_raw.to(tl.float32)
            q_par = q_par.to(tl.float32)
        cs_q = row_ok[:, None] & rot_d[None, :]
        pos_q = pos_m[:, None]
        sk_q = sk_d[None, :]
        pos_qs = tl.where(pos_q >= window, pos_q // sk_q + (window - window // sk_q), pos_q)
        q_n = _rotate(q_raw, q_par, cs_ptr, pos_q.to(tl.int64) * cs_s, pair_d[None, :], sgn_d[None, :], cs_q,
                      ROT_DIM)
        q_s = _rotate(q_raw, q_par, cs_ptr, pos_qs.to(tl.int64) * cs_s, pair_d[None, :], sgn_d[None, :], cs_q,
                      ROT_DIM)
        # dot operands in q's dtype, as a rotated cache would hold them (fp32: IEEE dot)
        if BF16_BY_BITS:
            q_n = round_bf16_bits(q_n)
            q_s = round_bf16_bits(q_s)
        else:
            q_n = q_n.to(qn_ptr.dtype.element_ty)
            q_s = q_s.to(qn_ptr.dtype.element_ty)
    else:
        pair_d = offs_d                      # unused without ROTARY
        part_d = offs_d
        sgn_d = offs_d.to(tl.float32)
        rot_d = offs_d < 0
        sk_d = offs_d
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
        pos_m, k_lo, k_hi, 0, j_s, window, qk_scale, cs_ptr, cs_s, pair_d, part_d, sgn_d, rot_d, sk_d,
        _SCALED, False, PAGE_SIZE, TILE_IN_PAGE, EVEN_D, EVEN_DV, BLOCK_N, BF16_BY_BITS, DOT_PRECISION, ROTARY, ROT_DIM)
    acc, l_i, m_i = _paged_tiles(
        acc, l_i, m_i, q_n, q_s, kn_head, ks_head, v_head, bt_row,
        kn_bs, kn_ts, ks_bs, ks_ts, v_bs, v_ts, offs_n, offs_d, offs_dv, kd_ok, vd_ok,
        pos_m, k_lo, k_hi, j_s, j_n, window, qk_scale, cs_ptr, cs_s, pair_d, part_d, sgn_d, rot_d, sk_d,
        _BOTH, True, PAGE_SIZE, TILE_IN_PAGE, EVEN_D, EVEN_DV, BLOCK_N, BF16_BY_BITS, DOT_PRECISION, ROTARY, ROT_DIM)
    acc, l_i, m_i = _paged_tiles(
        acc, l_i, m_i, q_n, q_s, kn_head, ks_head, v_head, bt_row,
        kn_bs, kn_ts, ks_bs, ks_ts, v_bs, v_ts, offs_n, offs_d, offs_dv, kd_ok, vd_ok,
        pos_m, k_lo, k_hi, j_n, j_d, window, qk_scale, cs_ptr, cs_s, pair_d, part_d, sgn_d, rot_d, sk_d,
        _NORMAL, False, PAGE_SIZE, TILE_IN_PAGE, EVEN_D, EVEN_DV, BLOCK_N, BF16_BY_BITS, DOT_PRECISION, ROTARY, ROT_DIM)
    acc, l_i, m_i = _paged_tiles(
        acc, l_i, m_i, q_n, q_s, kn_head, ks_head, v_head, bt_row,
        kn_bs, kn_ts, ks_bs, ks_ts, v_bs, v_ts, offs_n, offs_d, offs_dv, kd_ok, vd_ok,
        pos_m, k_lo, k_hi, j_d, n_tiles, window, qk_scale, cs_ptr, cs_s, pair_d, part_d, sgn_d, rot_d, sk_d,
        _NORMAL, True, PAGE_SIZE, TILE_IN_PAGE, EVEN_D, EVEN_DV, BLOCK_N, BF16_BY_BITS, DOT_PRECISION, ROTARY, ROT_DIM)

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
def _block_config(dtype: torch.dtype, bd: int, rows: int, max_seqlen_k: int = 0) -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). A power-of-two page of at
    least BLOCK_N keys holds whole tiles (TILE_IN_PAGE: one block-table load
    per tile). Smaller pages (vLLM's GPU default is 16) keep the wider tile
    and load each key's block id (each key's row is still contiguous), as
    vLLM's own Triton attention does, rather than shrinking the tile to the
    page. Not tuned on a GPU (none was available): a starting point."""
    if INTERPRETED:
        # the interpreter pays per program and per op: the smallest legal tiles
        # (tl.dot needs >= 16) keep every tile class exercised by small tests
        # (a context of more than 4096 keys, as a test of positions past 2^20, takes wider key
        # tiles: at most about 256 per sequence, or it would take hours)
        bm, bn = 16, max(16, next_pow2(max_seqlen_k // 256)) if max_seqlen_k > 4096 else 16
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
    hq = q_normal.shape[1]
    n_rep = hq // max(k_cache.shape[2], 1)
    ks_div = hq // max(ks_cache.shape[2], 1)
    group = n_rep if ks_div == n_rep else 1  # pack GQA when the n_rep heads share k_scaled too
    _launch(q_normal, q_scaled, k_cache, ks_cache, v_cache, block_table, seq_lens, query_start_loc, int(window),
            softmax_scale, max_seqlen_q, max_seqlen_k, out, lse, return_lse, num_splits, group, None)


def paged_rotary_triton(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, cos_sin, pair_scale, window,
                        seq_config, mask, rotary_dim: int, neox: bool, softmax_scale: float, max_seqlen_q: int,
                        max_seqlen_k: int, out: torch.Tensor, lse: torch.Tensor,
                        num_splits: Optional[int] = None) -> None:
    """:func:`dpe_kernels.dpe_paged_attention_rotary` (inputs validated): the paged kernel with
    ROTARY, over a cache of UNROTATED keys. ``cos_sin`` float32 ``[N, rotary_dim]`` (contiguous
    rows), ``pair_scale`` int ``[C, P]``, ``window`` int ``[C]``, ``seq_config`` int ``[B]``,
    ``mask`` bool ``[C, H_q, P]`` or None. Writes ``out`` and ``lse``; nothing is read on the host.
    Without a mask the ``n_rep`` query heads of a KV head share every rotated key and are packed
    into one program's rows; with one each query head has its own scaled keys: one head a
    program."""
    hq, hk = q.shape[1], max(k_cache.shape[2], 1)
    n_rep = hq // hk
    group = 1 if mask is not None else n_rep
    if mask is not None and mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)        # same bytes: a plain integer pointer for the kernel
    rot = dict(cs=cos_sin, cfg=seq_config, ps=pair_scale, win=window, mask=mask, rotary_dim=int(rotary_dim),
               neox=bool(neox))
    _launch(q, q, k_cache, k_cache, v_cache, block_table, seq_lens, query_start_loc, 1, softmax_scale,
            max_seqlen_q, max_seqlen_k, out, lse, True, num_splits, group, rot)


def _launch(q_normal, q_scaled, k_cache, ks_cache, v_cache, block_table, seq_lens, query_start_loc, window: int,
            softmax_scale: float, max_seqlen_q: int, max_seqlen_k: int, out, lse, return_lse: bool,
            num_splits: Optional[int], group: int, rot: Optional[dict]) -> None:
    """Grid, tiles and splits of the paged kernel (and the combine kernel when split); ``rot``:
    the ROTARY inputs, or None for the rotated caches."""
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
    n_groups = hq // group
    block_d, block_dv = max(16, next_pow2(d)), max(16, next_pow2(dv))
    rows = max_seqlen_q * group
    bm, bn, warps, stages = _block_config(q_normal.dtype, max(block_d, block_dv), rows, max_seqlen_k)
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
    if rot is None:
        cs = cfg = ps = win = mk = block_table              # never read (ROTARY=False)
        cs_s = ps_s = (0, 0)
        mk_s = (0, 0, 0)
        rot_flags = dict()
    else:
        cs, cfg, ps, win, mk = rot["cs"], rot["cfg"], rot["ps"], rot["win"], rot["mask"]
        cs_s, ps_s = (cs.stride(0), 0), (ps.stride(0), ps.stride(1))
        mk_s = (0, 0, 0) if mk is None else (mk.stride(0), mk.stride(1), mk.stride(2))
        rot_flags = dict(ROTARY=True, HAS_MASK=mk is not None, IS_NEOX=rot["neox"], ROT_DIM=rot["rotary_dim"])
        if mk is None:
            mk = ps                                        # never read (HAS_MASK=False)
    guard = contextlib.nullcontext()
    if q_normal.is_cuda and q_normal.device.index not in (None, torch.cuda.current_device()):
        guard = torch.cuda.device(q_normal.device)
    with guard:
        _paged_fwd_kernel[(m_tiles * num_splits, n_groups, batch)](
            q_normal, q_scaled, k_cache, ks_cache, v_cache, out, lse_t, po, pl,
            block_table, seq_lens, query_start_loc, cs, cfg, ps, win, mk,
            n_rep, ks_div, int(window), float(softmax_scale) * _LOG2E, num_splits, keys_per_split,
            q_normal.stride(0), q_normal.stride(1), q_scaled.stride(0), q_scaled.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            ks_cache.stride(0), ks_cache.stride(1), ks_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            out.stride(0), out.stride(1), l_strides[0], l_strides[1], block_table.stride(0),
            cs_s[0], ps_s[0], ps_s[1], mk_s[0], mk_s[1], mk_s[2],
            G=group, HEAD_DIM=d, HEAD_DIM_V=dv, PAGE_SIZE=page, TILE_IN_PAGE=tile_in_page,
            SPLIT=split, RETURN_LSE=bool(return_lse),
            BF16_BY_BITS=bf16_bits,
            DOT_PRECISION="ieee" if q_normal.dtype == torch.float32 else "tf32",
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, BLOCK_DV=block_dv,
            num_warps=warps, num_stages=stages, **rot_flags,
        )
        if split:
            combine_splits_kernel[(t_q, hq)](
                po, pl, out, lse_t, num_splits, hq,
                out.stride(0), out.stride(1), l_strides[0], l_strides[1],
                HEAD_DIM_V=dv, RETURN_LSE=bool(return_lse), BF16_BY_BITS=bf16_bits,
                BLOCK_S=max(2, next_pow2(num_splits)), BLOCK_DV=block_dv,
                num_warps=1 if INTERPRETED else 4,
            )


# --------------------------------------------------------------------------- cache write
@triton.jit
def _cache_write_kernel(
    k_ptr, v_ptr, slot_ptr, kc_ptr, vc_ptr,
    H, k_ts, k_hs, v_ts, v_hs, kc_bs, kc_ts, kc_hs, vc_bs, vc_ts, vc_hs,
    PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Token t (one program) of ``k [T, H, D]`` / ``v [T, H, Dv]`` stored unrotated at slot
    ``slot_mapping[t]`` (block slot // PAGE_SIZE, offset slot % PAGE_SIZE); a negative slot
    (padding) is skipped. 64-bit block / token / head offsets."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    blk = slot // PAGE_SIZE
    off = slot % PAGE_SIZE
    offs_h = tl.arange(0, BLOCK_H).to(tl.int64)
    h_ok = offs_h < H
    offs_d = tl.arange(0, BLOCK_D)
    kx = tl.load(k_ptr + t * k_ts + (offs_h * k_hs)[:, None] + offs_d[None, :],
                 mask=h_ok[:, None] & (offs_d < HEAD_DIM)[None, :])
    tl.store(kc_ptr + (blk * kc_bs + off * kc_ts) + (offs_h * kc_hs)[:, None] + offs_d[None, :],
             kx.to(kc_ptr.dtype.element_ty), mask=h_ok[:, None] & (offs_d < HEAD_DIM)[None, :])
    offs_dv = tl.arange(0, BLOCK_DV)
    vx = tl.load(v_ptr + t * v_ts + (offs_h * v_hs)[:, None] + offs_dv[None, :],
                 mask=h_ok[:, None] & (offs_dv < HEAD_DIM_V)[None, :])
    tl.store(vc_ptr + (blk * vc_bs + off * vc_ts) + (offs_h * vc_hs)[:, None] + offs_dv[None, :],
             vx.to(vc_ptr.dtype.element_ty), mask=h_ok[:, None] & (offs_dv < HEAD_DIM_V)[None, :])


def cache_write_triton(k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor) -> None:
    """Write the new tokens' UNROTATED ``k [T, H_k, D]`` and ``v [T, H_k, Dv]`` into the paged caches
    ``[num_blocks, block_size, H_k, D / Dv]`` (any strides, stride 1 on the last dim: head-major
    engine buffers viewed token-major are written in place) at ``slot_mapping [T]`` (int32 / int64,
    slot = block * block_size + offset); negative slots (padding) are skipped. No validation and
    no host read: the caller (an engine's cache update) owns the shapes. Caches of another dtype
    than ``k`` get a plain cast."""
    t, h, d = k.shape
    dv = v.shape[2]
    if t == 0 or h == 0:
        return
    page = k_cache.shape[1]
    bf16_interp = INTERPRETED and (k.dtype != k_cache.dtype or v.dtype != v_cache.dtype) and \
        torch.bfloat16 in (k.dtype, v.dtype, k_cache.dtype, v_cache.dtype)
    if bf16_interp:
        raise NotImplementedError("cache_write_triton: casts to or from bfloat16 are wrong under "
                                  "TRITON_INTERPRET=1; pass caches of k's dtype")
    _cache_write_kernel[(t,)](
        k, v, slot_mapping, k_cache, v_cache,
        h, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        PAGE_SIZE=page, HEAD_DIM=d, HEAD_DIM_V=dv,
        BLOCK_H=next_pow2(h), BLOCK_D=next_pow2(d), BLOCK_DV=next_pow2(dv),
        num_warps=1 if INTERPRETED else 4,
    )
