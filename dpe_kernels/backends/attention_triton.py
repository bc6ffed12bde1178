"""The ``triton`` attention backend: DPE attention (docs/method.md, "Attention") as one
fused Triton kernel, registered as ``torch.ops.dpe_kernels.attention_triton``.

One kernel walks each query tile's key tiles once and classifies each tile by the
distances it covers: scaled logits only (wholly beyond the window, no causal mask),
both logits selected per element (straddling the window edge), or normal logits only
(inside the window; masked on the causal diagonal). One online softmax
(``triton_common.online_softmax_step``: float32, ``exp2`` with ``log2(e)`` folded into
the scale) spans both kinds of logits, so there is no merge step. GQA packs the query
heads of a KV head into one program's rows when ``k_scaled`` has ``H_k`` heads.
Decode grids split each query tile's keys over programs (split-KV), merged by
``triton_common.combine_splits_kernel``.

Layouts as :func:`dpe_kernels.dpe_attention` (batched with left padding, or packed
with ``cu_seqlens``; any strides with stride 1 on head_dim). It does not validate:
its caller has. A row without keys gets ``out = 0``, ``lse = -inf``.
"""
import contextlib
import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from .triton_common import (INTERPRETED, bf16_bits_to_f32, classify_key_tiles, combine_splits_kernel, next_pow2,
                           num_kv_splits, online_softmax_step, register_triton_op, round_out)

__all__ = ["attention_triton"]

_LOG2E = 1.4426950408889634

# Tile kinds of the key loop (constexpr MODE of _attn_tiles).
_NORMAL = tl.constexpr(0)
_SCALED = tl.constexpr(1)
_BOTH = tl.constexpr(2)


# --------------------------------------------------------------------------- kernel
# bfloat16 under the interpreter (BF16_BY_BITS): the interpreter computes
# bfloat16 tl.dot wrongly and converts float32 <-> bfloat16 wrongly (see
# triton_common), so there bfloat16 data is widened exactly by its bits and
# multiplied in float32 (the same products, float32 accumulation), and
# probabilities are rounded to bfloat16 on the bits. Compiled Triton never
# takes these paths.
@triton.jit
def _attn_tiles(
    acc, l_i, m_i,
    q_n, q_s,
    kn_base, ks_base, v_base, kn_ss, ks_ss, v_ss,
    k_off, ks_off, v_off, kd_ok, vd_ok,
    pos_m, lo, j_lo, j_hi, seqlen_k, window, qk_scale, offs_n,
    MODE: tl.constexpr,          # _NORMAL / _SCALED / _BOTH logits in these tiles
    MASKED: tl.constexpr,        # tiles may cross the causal diagonal or the end of the keys
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BF16_BY_BITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Key tiles j_lo .. j_hi-1 (keys lo + j * BLOCK_N + [0, BLOCK_N)) of one query tile."""
    # Load masks only where needed, so full causal-safe tiles with a
    # power-of-two head dim load unpredicated (vectorised).
    if EVEN_D:
        kd_mask = None
        kd_other = None
    else:
        kd_mask = kd_ok
        kd_other = 0.0
    if EVEN_DV:
        vd_mask = None
        vd_other = None
    else:
        vd_mask = vd_ok
        vd_other = 0.0
    for j in range(j_lo, j_hi):
        n0 = lo + j * BLOCK_N                          # first key of the tile
        # Pointers: 64-bit scalar tile base + 32-bit in-tile offsets (k_off,
        # ks_off: K^T tiles [BD, BN]; v_off: V tile [BN, BDV]).
        n0_64 = n0.to(tl.int64)
        if MASKED or MODE == _BOTH:
            n = n0 + offs_n                            # [BN] key index
        if MASKED:
            n_ok = n < seqlen_k
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
            k_mask = kd_mask
            k_other = kd_other
            v_mask = vd_mask
            v_other = vd_other
        if MODE != _SCALED:
            kn = tl.load(kn_base + n0_64 * kn_ss + k_off, mask=k_mask, other=k_other)
            if BF16_BY_BITS:
                kn = bf16_bits_to_f32(kn)
            qk = tl.dot(q_n, kn, input_precision=DOT_PRECISION)
        if MODE != _NORMAL:
            ks = tl.load(ks_base + n0_64 * ks_ss + ks_off, mask=k_mask, other=k_other)
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
            # causal (n <= m) also excludes keys past the end for every real
            # row, and every key of a padding row (m < first real key)
            qk = tl.where(n[None, :] <= pos_m[:, None], qk, float("-inf"))
        vt = tl.load(v_base + n0_64 * v_ss + v_off, mask=v_mask, other=v_other)
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, qk, vt, MASKED, BF16_BY_BITS, DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _dpe_attn_fwd_kernel(
    qn_ptr, qs_ptr, kn_ptr, ks_ptr, v_ptr, out_ptr, lse_ptr, po_ptr, pl_ptr,
    cu_q_ptr, cu_k_ptr, kv_start_ptr,
    S_q, S_k,                    # batched lengths (VARLEN: read from cu_seqlens instead)
    num_splits, keys_per_split,  # split-KV: key ranges per query tile, keys per range (a multiple of BLOCK_N)
    n_rep, ks_div,               # H_q // H_k; query heads per k_scaled head (n_rep or 1)
    window, qk_scale,            # qk_scale = softmax_scale * log2(e)
    qn_sb, qn_ss, qn_sh, qs_sb, qs_ss, qs_sh,
    kn_sb, kn_ss, kn_sh, ks_sb, ks_ss, ks_sh, v_sb, v_ss, v_sh,
    o_sb, o_ss, o_sh, l_sb, l_ss, l_sh,
    G: tl.constexpr,             # query heads packed into the rows of one program (pack GQA)
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    HAS_PADDING: tl.constexpr,   # kv_start_ptr: first real key of each sequence (left padding)
    VARLEN: tl.constexpr,        # packed layout, offsets from cu_seqlens
    RETURN_LSE: tl.constexpr,
    SPLIT: tl.constexpr,         # write float32 partials (po/pl) for combine_splits_kernel
    BF16_BY_BITS: tl.constexpr,  # interpreter with bfloat16 data (see triton_common.bf16_bits_to_f32)
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs (no TF32), else the default
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # Grid: (query-row tiles x key splits, head groups, batch); grid axes 1
    # and 2 are limited to 65535 each, axis 0 (long sequences) is not. Rows of
    # a program are (query position, packed head) pairs, row = s * G + r: with
    # G > 1 the G query heads of one KV head share every K/V tile load. With
    # num_splits > 1 (decode: few query tiles) each program walks one range of
    # keys_per_split keys (flash-decoding), so a decode step launches enough
    # programs to fill the GPU.
    start_m = tl.program_id(0) // num_splits
    split = tl.program_id(0) % num_splits
    hg = tl.program_id(1)
    b = tl.program_id(2)

    if VARLEN:
        q_start = tl.load(cu_q_ptr + b).to(tl.int64)
        seqlen_q = (tl.load(cu_q_ptr + b + 1).to(tl.int64) - q_start).to(tl.int32)
        k_start = tl.load(cu_k_ptr + b).to(tl.int64)
        seqlen_k = (tl.load(cu_k_ptr + b + 1).to(tl.int64) - k_start).to(tl.int32)
        if start_m * BLOCK_M >= seqlen_q * G:
            return  # the grid covers the longest sequence; this one is shorter
    else:
        q_start = 0
        k_start = 0
        seqlen_q = S_q
        seqlen_k = S_k
    if HAS_PADDING:
        lo = tl.load(kv_start_ptr + b)       # first real key (left padding)
    else:
        lo = 0
    off = seqlen_k - seqlen_q                # query row s sits at key index s + off
    rows = seqlen_q * G

    # --- rows of this program -------------------------------------------------
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < rows
    s_idx = offs_m // G                      # query row in the sequence (constexpr G: shifts / no-op)
    h_q = hg * G + (offs_m - s_idx * G)      # query head of each row
    pos_m = s_idx + off                      # key-index position (== position distance basis)
    h_kv = (hg * G) // n_rep                 # one KV head and one k_scaled head per program
    h_ks = (hg * G) // ks_div
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    # Addressing: 64-bit scalar bases (b * stride_b and position * stride_s
    # overflow int32 for long contexts / large batches) plus 32-bit offsets
    # inside a tile (the launcher guarantees they fit: see _fits_int32).
    s0 = (start_m * BLOCK_M) // G            # first query row of the tile
    h0 = hg * G                              # first query head of the group
    ds = s_idx - s0                          # in-tile row / head offsets (int32)
    dh = h_q - h0
    b64 = b.to(tl.int64)
    q_row0 = q_start + s0.to(tl.int64)
    h0_64 = h0.to(tl.int64)
    qn_ptrs = (qn_ptr + (b64 * qn_sb + q_row0 * qn_ss + h0_64 * qn_sh)
               + (ds * qn_ss + dh * qn_sh)[:, None] + offs_d[None, :])
    qs_ptrs = (qs_ptr + (b64 * qs_sb + q_row0 * qs_ss + h0_64 * qs_sh)
               + (ds * qs_ss + dh * qs_sh)[:, None] + offs_d[None, :])
    if HEAD_DIM == BLOCK_D:
        q_mask = row_ok[:, None]
    else:
        q_mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    # Both query tiles are loaded once and stay in registers: cheaper than
    # keeping their (64-bit) pointer tensors live to reload them per stage.
    q_n = tl.load(qn_ptrs, mask=q_mask, other=0.0)
    q_s = tl.load(qs_ptrs, mask=q_mask, other=0.0)
    if BF16_BY_BITS:
        q_n = bf16_bits_to_f32(q_n)
        q_s = bf16_bits_to_f32(q_s)
    kn_base = kn_ptr + (b64 * kn_sb + k_start * kn_ss + h_kv.to(tl.int64) * kn_sh)
    ks_base = ks_ptr + (b64 * ks_sb + k_start * ks_ss + h_ks.to(tl.int64) * ks_sh)
    v_base = v_ptr + (b64 * v_sb + k_start * v_ss + h_kv.to(tl.int64) * v_sh)
    # in-tile offsets and head-dim masks of the K^T / V tiles, loop-invariant
    k_off = offs_n[None, :] * kn_ss + offs_d[:, None]     # [BD, BN]
    ks_off = offs_n[None, :] * ks_ss + offs_d[:, None]
    v_off = offs_n[:, None] * v_ss + offs_dv[None, :]     # [BN, BDV]
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    EVEN_DV: tl.constexpr = HEAD_DIM_V == BLOCK_DV
    kd_ok = (offs_d < HEAD_DIM)[:, None]
    vd_ok = (offs_dv < HEAD_DIM_V)[None, :]

    # --- key-tile ranges ------------------------------------------------------
    # Positions of the first and last real row of the tile; keys run from lo
    # (first real key) to the diagonal of the last row. Tile j holds keys
    # lo + j * BLOCK_N + [0, BLOCK_N); distances in it range over
    # [m0 - (n0 + BLOCK_N - 1), m1 - n0].
    m0 = (start_m * BLOCK_M) // G + off
    m1 = (tl.minimum(start_m * BLOCK_M + BLOCK_M, rows) - 1) // G + off
    k_lo = lo + split * keys_per_split       # this split's keys: [k_lo, k_hi)
    k_hi = tl.minimum(k_lo + keys_per_split, m1 + 1)
    n_tiles, j_s, j_n, j_d = classify_key_tiles(m0, m1, k_lo, k_hi, window, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    # Scaled-only tiles first (the bulk of a long context), then the window.
    # Each stage is a separate loop specialised at compile time, so the inner
    # loops of the common tiles carry no select and no mask.
    acc, l_i, m_i = _attn_tiles(
        acc, l_i, m_i, q_n, q_s, kn_base, ks_base, v_base, kn_ss, ks_ss, v_ss,
        k_off, ks_off, v_off, kd_ok, vd_ok, pos_m, k_lo, 0, j_s, seqlen_k, window, qk_scale, offs_n,
        _SCALED, False, EVEN_D, EVEN_DV, BLOCK_N, BF16_BY_BITS, DOT_PRECISION)
    acc, l_i, m_i = _attn_tiles(
        acc, l_i, m_i, q_n, q_s, kn_base, ks_base, v_base, kn_ss, ks_ss, v_ss,
        k_off, ks_off, v_off, kd_ok, vd_ok, pos_m, k_lo, j_s, j_n, seqlen_k, window, qk_scale, offs_n,
        _BOTH, True, EVEN_D, EVEN_DV, BLOCK_N, BF16_BY_BITS, DOT_PRECISION)
    acc, l_i, m_i = _attn_tiles(
        acc, l_i, m_i, q_n, q_s, kn_base, ks_base, v_base, kn_ss, ks_ss, v_ss,
        k_off, ks_off, v_off, kd_ok, vd_ok, pos_m, k_lo, j_n, j_d, seqlen_k, window, qk_scale, offs_n,
        _NORMAL, False, EVEN_D, EVEN_DV, BLOCK_N, BF16_BY_BITS, DOT_PRECISION)
    acc, l_i, m_i = _attn_tiles(
        acc, l_i, m_i, q_n, q_s, kn_base, ks_base, v_base, kn_ss, ks_ss, v_ss,
        k_off, ks_off, v_off, kd_ok, vd_ok, pos_m, k_lo, j_d, n_tiles, seqlen_k, window, qk_scale, offs_n,
        _NORMAL, True, EVEN_D, EVEN_DV, BLOCK_N, BF16_BY_BITS, DOT_PRECISION)

    # --- epilogue: normalise; rows without a key -> out 0, lse -inf ------------
    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    out = acc / l_safe[:, None]
    # back to natural log: lse = ln(2) * (m + log2(l))
    lse = tl.where(has_key, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    if HEAD_DIM_V == BLOCK_DV:
        o_mask = row_ok[:, None]
    else:
        o_mask = row_ok[:, None] & (offs_dv < HEAD_DIM_V)[None, :]
    if SPLIT:
        # workspace [T_q, H_q, num_splits, (Dv)], float32, contiguous; T_q
        # counts the batch's query rows (b * S_q + s, or the packed token)
        if VARLEN:
            tok0 = q_start
        else:
            tok0 = b64 * S_q
        prow = ((tok0 + s_idx.to(tl.int64)) * (tl.num_programs(1) * G) + h_q) * num_splits + split
        tl.store(po_ptr + prow[:, None] * HEAD_DIM_V + offs_dv[None, :], out, mask=o_mask)
        tl.store(pl_ptr + prow, lse, mask=row_ok)
    else:
        o_ptrs = (out_ptr + (b64 * o_sb + q_row0 * o_ss + h0_64 * o_sh)
                  + (ds * o_ss + dh * o_sh)[:, None] + offs_dv[None, :])
        tl.store(o_ptrs, round_out(out, out_ptr.dtype.element_ty, BF16_BY_BITS), mask=o_mask)
        if RETURN_LSE:
            l_ptrs = lse_ptr + (b64 * l_sb + q_row0 * l_ss + h0_64 * l_sh) + (ds * l_ss + dh * l_sh)
            tl.store(l_ptrs, lse, mask=row_ok)


# --------------------------------------------------------------------------- launcher
def _smem_estimate(bm: int, bn: int, stages: int, block_d: int, block_dv: int, elem: int) -> int:
    """Upper estimate of a config's shared memory in bytes: ``stages`` buffers of
    the three K/V tiles, both query tiles and one probability tile (checked
    against what Triton 3.9 allocates for sm_80 and sm_90 on every default
    config below: it always allocates less)."""
    return elem * (stages * bn * (2 * block_d + block_dv) + 2 * bm * block_d + bm * bn)


def _block_config(dtype: torch.dtype, block_d: int, block_dv: int, rows: int,
                  smem_limit: int) -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a launch.

    ``block_d`` / ``block_dv``: padded head dims of q/k and v; ``rows``: the
    most query rows (positions x packed heads) of one sequence;
    ``smem_limit``: the device's shared memory per block (opt-in).

    The preferred GPU configs were checked by compiling them for sm_90
    (Triton 3.9, 16-byte aligned pointers and strides) and reading ptxas's
    report: none spills registers. They have not been timed on a GPU (none
    was available): a starting point, not a tuned table. The first candidate
    whose estimated shared memory fits the device is taken (A100: 163 KiB,
    H100: 227 KiB, consumer Ampere / Ada: 99 KiB).
    """
    if INTERPRETED:
        # The interpreter pays per program and per op, not per element, and
        # tl.dot needs tiles >= 16 on a GPU: the smallest legal tiles keep the
        # tile classification exercised by small test shapes.
        return 16, 16, 1, 1
    bd = max(block_d, block_dv)
    # Few rows (decode, short chunks, GQA-packed decode): a smaller BLOCK_M
    # wastes fewer masked rows (tl.dot needs >= 16).
    bm = max(16, next_pow2(rows))
    if dtype == torch.float32:
        # IEEE fp32 dot (no TF32, to stay within float32 tolerances) runs on
        # FMA units with both operands in registers: small tiles.
        if bd <= 64:
            cands = [(min(64, bm), 32, 8 if bm >= 64 else 4, 2)]
        else:
            cands = [(min(32, bm), 16, 8 if bm >= 32 else 4, 2)]
    elif bd <= 64:
        if bm >= 128:
            cands = [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 2)]
        else:  # wide key tiles: fewer iterations, more bytes in flight
            cands = [(bm, 128, 4, 3), (bm, 64, 4, 3), (bm, 64, 4, 2)]
    elif bd <= 128:
        if bm >= 128:
            # a straddling tile holds q_normal, q_scaled, two score tiles and
            # the accumulator: 8 warps and 2 stages keep that in registers
            cands = [(128, 64, 8, 2), (64, 64, 4, 2)]
        elif bm == 64:
            cands = [(64, 64, 4, 3), (64, 64, 4, 2)]
        else:
            cands = [(bm, 128, 4, 3), (bm, 64, 4, 3), (bm, 64, 4, 2)]
    else:
        cands = [(min(128, bm), 32, 8 if bm >= 128 else 4, 2), (min(64, bm), 32, 4, 2)]
    # small-shared-memory fallbacks (consumer GPUs)
    cands += [(min(64, bm), 32, 4, 2), (min(32, bm), 16, 4, 2)]
    elem = dtype.itemsize
    for bm_, bn, warps, stages in cands:
        if _smem_estimate(bm_, bn, stages, block_d, block_dv, elem) <= smem_limit:
            return bm_, bn, warps, stages
    return 16, 16, 4, 1


@functools.lru_cache(maxsize=None)
def _smem_limit(device_index: int) -> int:
    props = torch.cuda.get_device_properties(device_index)
    # opt-in maximum per block (what Triton may request); 99 KiB if unknown
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 101376)


def _fits_int32(t: torch.Tensor, rows: int, block_d: int) -> bool:
    """In-tile element offsets of ``t`` (``rows`` tokens or packed heads of a
    tile, ``block_d`` columns) fit the kernel's 32-bit in-tile arithmetic."""
    return max(t.stride(-3), t.stride(-2), 1) * (rows + 1) + block_d < 2 ** 31


def _empty_outputs(q_normal, v, return_lse):
    lead = q_normal.shape[:-1]  # [B, S_q, H_q] or [T_q, H_q]
    out = q_normal.new_empty((*lead, v.shape[-1]))
    lse = q_normal.new_empty(lead if return_lse else (0,), dtype=torch.float32)
    return out, lse


def _launch(q_normal, q_scaled, k_normal, k_scaled, v, window, softmax_scale, key_padding_mask,
            cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, num_splits, return_lse, out, lse):
    varlen = cu_seqlens_q is not None
    hq, d = q_normal.shape[-2], q_normal.shape[-1]
    hk, hks, dv = k_normal.shape[-2], k_scaled.shape[-2], v.shape[-1]
    n_rep = hq // hk
    ks_div = hq // hks                       # n_rep (k_scaled per KV head) or 1 (per query head)
    # Pack the n_rep query heads of a KV head into one program when they also
    # share their k_scaled head (else each query head has its own scaled keys).
    group = n_rep if ks_div == n_rep else 1
    n_groups = hq // group
    if varlen:
        batch = cu_seqlens_q.shape[0] - 1
        s_q, s_k = 0, 0
        cu_q, cu_k = cu_seqlens_q, cu_seqlens_k
    else:
        batch, s_q, s_k = q_normal.shape[0], q_normal.shape[1], k_normal.shape[1]
        max_seqlen_q, max_seqlen_k = s_q, s_k
        cu_q = cu_k = out                    # never read (VARLEN=False)
    if batch == 0 or max_seqlen_q == 0 or hq == 0 or out.numel() == 0:
        return
    if key_padding_mask is not None:
        # left padding: the real keys of row b are [S_k - count_b, S_k)
        kv_start = (s_k - key_padding_mask.sum(dim=1)).to(torch.int32)
    else:
        kv_start = out                       # never read (HAS_PADDING=False)

    block_d, block_dv = next_pow2(max(d, 1)), next_pow2(max(dv, 1))
    block_d, block_dv = max(block_d, 16), max(block_dv, 16)  # tl.dot: K and N >= 16
    rows = max_seqlen_q * group
    smem = _smem_limit(q_normal.device.index if q_normal.device.index is not None
                       else torch.cuda.current_device()) if q_normal.is_cuda else 0
    bm, bn, warps, stages = _block_config(q_normal.dtype, block_d, block_dv, rows, smem)
    m_tiles = triton.cdiv(rows, bm)
    # Split-KV (flash-decoding): few query tiles (decode) would leave most of
    # the GPU idle with one program per (tile, head group, sequence); each
    # key range of a tile becomes a program, merged by combine_splits_kernel.
    if num_splits <= 0:
        num_splits = num_kv_splits(m_tiles * n_groups * batch, max_seqlen_k, q_normal.device)
    keys_per_split = triton.cdiv(triton.cdiv(max(max_seqlen_k, 1), num_splits), bn) * bn
    num_splits = triton.cdiv(max(max_seqlen_k, 1), keys_per_split)
    split = num_splits > 1
    t_q = out.numel() // max(hq * dv, 1)     # query rows of the batch (out is contiguous)
    if split:
        po = torch.empty((t_q, hq, num_splits, dv), dtype=torch.float32, device=q_normal.device)
        pl = torch.empty((t_q, hq, num_splits), dtype=torch.float32, device=q_normal.device)
    else:
        po = pl = out                        # never read (SPLIT=False)
    grid = (m_tiles * num_splits, n_groups, batch)
    # A view with an enormous token stride (> 2^31 / tile rows elements) is
    # copied once rather than giving every kernel 64-bit tile offsets.
    span = max(bm, bn) + group
    fix = lambda t: t if _fits_int32(t, span, max(block_d, block_dv)) else t.contiguous()
    q_normal, q_scaled, k_normal, k_scaled, v = map(fix, (q_normal, q_scaled, k_normal, k_scaled, v))
    if varlen:
        sb = (0, 0, 0, 0, 0, 0, 0)
    else:
        sb = (q_normal.stride(0), q_scaled.stride(0), k_normal.stride(0), k_scaled.stride(0),
              v.stride(0), out.stride(0), lse.stride(0) if return_lse else 0)
    lse_strides = (lse.stride(-2), lse.stride(-1)) if return_lse else (0, 0)

    # Triton launches on the current CUDA device: switch to the inputs' one
    # when it differs (multi-GPU); a no-op otherwise (and on the interpreter).
    guard = contextlib.nullcontext()
    if q_normal.is_cuda and q_normal.device.index not in (None, torch.cuda.current_device()):
        guard = torch.cuda.device(q_normal.device)
    with guard:
        torch.library.wrap_triton(_dpe_attn_fwd_kernel)[grid](
            q_normal, q_scaled, k_normal, k_scaled, v, out, lse, po, pl,
            cu_q, cu_k, kv_start,
            s_q, s_k, num_splits, keys_per_split, n_rep, ks_div,
            int(window), float(softmax_scale) * _LOG2E,
            sb[0], q_normal.stride(-3), q_normal.stride(-2),
            sb[1], q_scaled.stride(-3), q_scaled.stride(-2),
            sb[2], k_normal.stride(-3), k_normal.stride(-2),
            sb[3], k_scaled.stride(-3), k_scaled.stride(-2),
            sb[4], v.stride(-3), v.stride(-2),
            sb[5], out.stride(-3), out.stride(-2),
            sb[6], lse_strides[0], lse_strides[1],
            G=group,
            HEAD_DIM=d, HEAD_DIM_V=dv,
            HAS_PADDING=key_padding_mask is not None,
            VARLEN=varlen,
            RETURN_LSE=bool(return_lse),
            SPLIT=split,
            BF16_BY_BITS=INTERPRETED and q_normal.dtype == torch.bfloat16,
            DOT_PRECISION="ieee" if q_normal.dtype == torch.float32 else "tf32",
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, BLOCK_DV=block_dv,
            num_warps=warps, num_stages=stages,
        )
        if split:
            torch.library.wrap_triton(combine_splits_kernel)[(t_q, hq)](
                po, pl, out, lse if return_lse else out, num_splits, hq,
                out.stride(-3), out.stride(-2), *((lse.stride(-2), lse.stride(-1)) if return_lse else (0, 0)),
                HEAD_DIM_V=dv, RETURN_LSE=bool(return_lse),
                BF16_BY_BITS=INTERPRETED and q_normal.dtype == torch.bfloat16,
                BLOCK_S=max(2, next_pow2(num_splits)), BLOCK_DV=block_dv,
                num_warps=1 if INTERPRETED else 4,
            )


def _run(q_normal, q_scaled, k_normal, k_scaled, v, window, softmax_scale, key_padding_mask,
         cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, num_splits, return_lse):
    out, lse = _empty_outputs(q_normal, v, return_lse)
    _launch(q_normal, q_scaled, k_normal, k_scaled, v, window, softmax_scale, key_padding_mask,
            cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, num_splits, return_lse, out, lse)
    return out, lse


def _attention_triton_impl(
    q_normal: torch.Tensor,
    q_scaled: torch.Tensor,
    k_normal: torch.Tensor,
    k_scaled: torch.Tensor,
    v: torch.Tensor,
    window: int,
    softmax_scale: float,
    key_padding_mask: Optional[torch.Tensor],
    cu_seqlens_q: Optional[torch.Tensor],
    cu_seqlens_k: Optional[torch.Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    num_splits: int,
    return_lse: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused DPE attention on Triton: ``(out, lse)``; ``lse`` is empty
    (shape ``[0]``) unless ``return_lse``. Arguments as
    :func:`attention_triton`, plus ``max_seqlen_q`` / ``max_seqlen_k``
    (packed layout: the longest query / key length, size the grid and the
    key splits; ignored when batched) and ``num_splits`` (0: chosen by
    num_kv_splits)."""
    return _run(q_normal, q_scaled, k_normal, k_scaled, v, window, softmax_scale, key_padding_mask,
                cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, num_splits, return_lse)


def _attention_triton_fake(q_normal, q_scaled, k_normal, k_scaled, v, window, softmax_scale, key_padding_mask,
                           cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, num_splits, return_lse):
    return _empty_outputs(q_normal, v, return_lse)


_attention_triton_op = register_triton_op("attention_triton", _attention_triton_impl, _attention_triton_fake)


def attention_triton(
    q_normal: torch.Tensor,
    q_scaled: torch.Tensor,
    k_normal: torch.Tensor,
    k_scaled: torch.Tensor,
    v: torch.Tensor,
    window: int,
    softmax_scale: float,
    *,
    key_padding_mask: Optional[torch.Tensor] = None,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    num_splits: Optional[int] = None,
):
    """DPE attention in one fused Triton kernel: ``out`` or ``(out, lse)``.

    Inputs as :func:`dpe_kernels.attention.dpe_attention` (already validated
    there): batched ``[B, S, H, D]`` (optional left-padded
    ``key_padding_mask [B, S_k]``) or packed ``[T, H, D]`` with
    ``cu_seqlens_q`` / ``cu_seqlens_k``; queries are the last positions of
    the keys; ``softmax_scale`` a float. ``out`` has q's dtype and v's head
    dim; ``lse`` is float32, natural log, ``[B, S_q, H_q]`` / ``[T_q, H_q]``,
    ``-inf`` (and ``out`` 0) for rows with no key.

    Packed layout: ``max_seqlen_q`` / ``max_seqlen_k``, the longest query /
    key length, size the grid and the key splits; pass them (as flash-attn
    takes them) to avoid a host synchronisation, else they are read from
    ``cu_seqlens_*`` (one). ``num_splits``: key ranges per query tile
    (split-KV, merged by log-sum-exp); None chooses by the grid's size
    (decode splits, prefill does not), 1 never splits.
    """
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int)
                                   or num_splits < 1):
        raise ValueError(f"num_splits must be None or an int >= 1, got {num_splits!r}")
    if cu_seqlens_q is not None and (max_seqlen_q is None or max_seqlen_k is None):
        # one host sync for both (flash-attn takes them as arguments)
        if cu_seqlens_q.numel() > 1:
            lens = torch.stack([(cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max(),
                                (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max()]).tolist()
        else:
            lens = [0, 0]
        max_seqlen_q = lens[0] if max_seqlen_q is None else max_seqlen_q
        max_seqlen_k = lens[1] if max_seqlen_k is None else max_seqlen_k
    out, lse = torch.ops.dpe_kernels.attention_triton(
        q_normal, q_scaled, k_normal, k_scaled, v, int(window), float(softmax_scale),
        key_padding_mask, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q or 0), int(max_seqlen_k or 0),
        int(num_splits or 0), bool(return_lse))
    return (out, lse) if return_lse else out
