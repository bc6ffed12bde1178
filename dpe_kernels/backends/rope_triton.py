"""The ``triton`` rotary backend: the DPE rotary step (docs/method.md, "Position
remapping") as one Triton kernel, computing exactly what the C++ / CUDA kernels
compute (``csrc/include/dpe/rope.h``): angle ``float32(index) * inv_freq``, full-range
sin/cos, math in float32, one rounding to the output dtype.

Inputs are addressed by strides (views of a packed qkv tensor are read in place);
outputs may be any views with stride 1 on head_dim, and ``q_normal`` / ``k_normal``
may be ``q`` / ``k`` themselves (every element is loaded before it is stored, by the
program that owns it). Cache mode (``IS_CACHE``) writes the key outputs and ``v``
into paged caches at ``slot_mapping[t]`` (a negative slot skips the token).

Registered with :func:`torch.library.triton_op` as ``torch.ops.dpe_kernels.{rope_triton,
rope_out_triton, rope_and_cache_triton}`` so ``torch.compile`` traces into the kernel.
It does not validate: its caller has.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from ..utils import scaled_key_heads
from .triton_common import INTERPRETED, load_f32, next_pow2, register_triton_op, round_out

__all__ = ["rope_triton", "rope_out_triton", "rope_and_cache_triton"]


# --------------------------------------------------------------------------- kernel
@triton.jit
def _accurate_sincos(x, USE_LIBDEVICE: tl.constexpr):
    # Angles reach 2^24 rad and more for long contexts, so sin/cos must be
    # full-range accurate. libdevice's sinf / cosf are, by contract (Payne-Hanek
    # reduction for large arguments, like sincosf in the CUDA backend); what
    # tl.sin / tl.cos lower to is up to the Triton version and backend (older
    # NVIDIA lowerings used the approximate sin.approx.f32, which is useless
    # far from [-pi, pi]; Triton 3.9 for sm_90 emits the same full-range code).
    # The Triton interpreter (TRITON_INTERPRET=1) cannot call libdevice (its
    # functions are extern stubs there), but its tl.sin / tl.cos are numpy's
    # float32 sin / cos, which are full-range accurate (<= 1 ulp).
    if USE_LIBDEVICE:
        s = libdevice.sin(x)
        c = libdevice.cos(x)
    else:
        s = tl.sin(x)
        c = tl.cos(x)
    return s, c


@triton.jit
def _dpe_rope_kernel(
    q_ptr, k_ptr, pos_ptr, inv_freq_ptr, scale_ptr, mask_ptr,
    qn_ptr, kn_ptr, qs_ptr, ks_ptr,          # kn / ks: the k and k_scaled caches in cache mode
    slot_ptr, v_ptr, vc_ptr,                 # cache mode only
    T, S, H_q, H_k, D, P, window, q_mask_div,
    q_sb, q_ss, q_sh, k_sb, k_ss, k_sh, pos_sb, pos_ss,
    qn_sb, qn_ss, qn_sh, qs_sb, qs_ss, qs_sh,
    kn_so, kn_si, kn_sh, ks_so, ks_si, ks_sh,  # (batch, token) or (block, slot) strides, head
    slot_ss, block_size, num_slots, Dv, v_ss, v_sh, vc_so, vc_si, vc_sh,
    IS_NEOX: tl.constexpr,       # pairs (i, i + P) if True, else (2i, 2i + 1)
    HAS_MASK: tl.constexpr,      # mask_ptr holds a [H_m, P] uint8 mask
    HAS_PASS: tl.constexpr,      # rotary_dim < D: dims [2P, D) pass through
    KS_REP: tl.constexpr,        # scaled key heads per KV head (H_ks // H_k)
    IS_CACHE: tl.constexpr,      # rope_and_cache: key rows by slot, v copied, slot < 0 skipped
    USE_LIBDEVICE: tl.constexpr,
    BF16_BY_BITS: tl.constexpr,  # interpreter with bfloat16 data (see triton_common.load_f32)
    BLOCK_T: tl.constexpr,       # tokens per program
    BLOCK_HQ: tl.constexpr,      # query heads per inner-loop step
    BLOCK_HK: tl.constexpr,      # KV heads per inner-loop step
    BLOCK_P: tl.constexpr,       # next_power_of_2(P)
    BLOCK_PASS: tl.constexpr,    # next_power_of_2(D - 2P) (1 when HAS_PASS is False)
    BLOCK_DV: tl.constexpr,      # next_power_of_2(Dv) in cache mode, else 1
):
    # Grid: one program per BLOCK_T consecutive tokens of the flattened B * S
    # axis. A program holds every pair of its tokens and walks all heads, so
    # the three sin/cos pairs of a (token, pair) are computed once and reused
    # by every query and key head: trigonometry costs O(T * P), not
    # O(T * (H_q + H_k) * P), as in the CPU and CUDA backends.
    pid = tl.program_id(0).to(tl.int64)  # int64 before any multiplication by a stride
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)  # [BT] flattened token
    t_ok = t < T
    b = t // S
    s = t - b * S

    # --- per (token, pair): the three angles, once --------------------------------
    m = tl.load(pos_ptr + b * pos_sb + s * pos_ss, mask=t_ok, other=0).to(tl.int64)
    i = tl.arange(0, BLOCK_P).to(tl.int64)  # pair index
    p_ok = i < P
    inv = tl.load(inv_freq_ptr + i, mask=p_ok, other=0.0)
    sc = tl.load(scale_ptr + i, mask=p_ok, other=1).to(tl.int64)
    m2 = m[:, None]                                  # [BT, 1]
    sc2 = sc[None, :]                                # [1, BP]
    idx_ks = m2 // sc2                               # scaled key index (int64; m >= 0, s >= 1)
    idx_qs = idx_ks + (window - window // sc2)       # scaled query index
    inv2 = inv[None, :]
    # angle = float32(index) * inv_freq, rounded to float32 once (as HF does)
    sin_n, cos_n = _accurate_sincos(m2.to(tl.float32) * inv2, USE_LIBDEVICE)
    sin_qs, cos_qs = _accurate_sincos(idx_qs.to(tl.float32) * inv2, USE_LIBDEVICE)
    sin_ks, cos_ks = _accurate_sincos(idx_ks.to(tl.float32) * inv2, USE_LIBDEVICE)
    # broadcast over the head axis: [BT, 1, BP]
    cos_n = cos_n[:, None, :]
    sin_n = sin_n[:, None, :]
    cos_qs = cos_qs[:, None, :]
    sin_qs = sin_qs[:, None, :]
    cos_ks = cos_ks[:, None, :]
    sin_ks = sin_ks[:, None, :]

    # Element offsets of the two members of each pair inside a head vector.
    # neox: two contiguous half-vectors. gptj: two stride-2 accesses over the
    # same cache lines (the second is served from L1), so DRAM still reads
    # each element once.
    if IS_NEOX:
        off1 = i
        off2 = i + P
    else:
        off1 = 2 * i
        off2 = 2 * i + 1
    off1 = off1[None, None, :]
    off2 = off2[None, None, :]
    p_ok3 = p_ok[None, None, :]
    if HAS_PASS:
        jd = 2 * P + tl.arange(0, BLOCK_PASS).to(tl.int64)  # pass-through dims
        jd_ok3 = (jd < D)[None, None, :]
        jd3 = jd[None, None, :]

    out_dtype = qn_ptr.dtype.element_ty
    q_tok = b * q_sb + s * q_ss                      # [BT] input offset of the token
    k_tok = b * k_sb + s * k_ss
    qn_tok = b * qn_sb + s * qn_ss                   # [BT] output offsets (any strides)
    qs_tok = b * qs_sb + s * qs_ss
    # Where the key outputs of each token go: (b, s) of k_normal / k_scaled,
    # or (slot // block_size, slot % block_size) of the caches; k_ok is False
    # for a negative (padding) slot, which skips the token's cache writes.
    if IS_CACHE:
        slot = tl.load(slot_ptr + s * slot_ss, mask=t_ok, other=-1).to(tl.int64)
        k_ok = t_ok & (slot >= 0) & (slot < num_slots)
        slot = tl.where(k_ok, slot, 0)
        k_outer = slot // block_size
        k_inner = slot - k_outer * block_size
    else:
        k_ok = t_ok
        k_outer = b
        k_inner = s
    kn_tok = k_outer * kn_so + k_inner * kn_si
    ks_tok = k_outer * ks_so + k_inner * ks_si

    # --- query heads ------------------------------------------------------------
    # Each q element is loaded once (x1 and x2 of a pair are disjoint) and feeds
    # both q_normal and q_scaled.
    for h0 in range(0, H_q, BLOCK_HQ):
        h = h0 + tl.arange(0, BLOCK_HQ).to(tl.int64)
        h_ok = h < H_q
        ok2 = t_ok[:, None] & h_ok[None, :]                       # [BT, BH]
        ok3 = ok2[:, :, None] & p_ok3
        src = (q_tok[:, None] + h[None, :] * q_sh)[:, :, None]    # [BT, BH, 1]
        dst_n = (qn_tok[:, None] + h[None, :] * qn_sh)[:, :, None]
        dst_s = (qs_tok[:, None] + h[None, :] * qs_sh)[:, :, None]
        # Both halves of every pair are loaded before any store: exact in place (q_normal is q).
        x1 = load_f32(q_ptr + src + off1, ok3, BF16_BY_BITS)
        x2 = load_f32(q_ptr + src + off2, ok3, BF16_BY_BITS)
        # rotate_pair of rope.h. (Compiled Triton may contract these into FMAs,
        # as nvcc does for the CUDA backend: rounding-level differences only.)
        n1 = x1 * cos_n - x2 * sin_n
        n2 = x1 * sin_n + x2 * cos_n
        tl.store(qn_ptr + dst_n + off1, round_out(n1, out_dtype, BF16_BY_BITS), mask=ok3)
        tl.store(qn_ptr + dst_n + off2, round_out(n2, out_dtype, BF16_BY_BITS), mask=ok3)
        s1 = x1 * cos_qs - x2 * sin_qs
        s2 = x1 * sin_qs + x2 * cos_qs
        if HAS_MASK:
            # Non-key-dimension pairs keep the normal angle. Selecting between
            # the two rotated values equals rotating by the selected angle
            # (same arithmetic per element), as the CPU kernel does.
            mrow = h // q_mask_div
            kd = tl.load(mask_ptr + mrow[:, None] * P + i[None, :],
                         mask=h_ok[:, None] & p_ok[None, :], other=0) != 0  # [BH, BP]
            kd = kd[None, :, :]
            s1 = tl.where(kd, s1, n1)
            s2 = tl.where(kd, s2, n2)
        tl.store(qs_ptr + dst_s + off1, round_out(s1, out_dtype, BF16_BY_BITS), mask=ok3)
        tl.store(qs_ptr + dst_s + off2, round_out(s2, out_dtype, BF16_BY_BITS), mask=ok3)
        if HAS_PASS:
            okp = ok2[:, :, None] & jd_ok3
            x = tl.load(q_ptr + src + jd3, mask=okp, other=0.0)
            tl.store(qn_ptr + dst_n + jd3, x, mask=okp)  # exact copy, same dtype
            tl.store(qs_ptr + dst_s + jd3, x, mask=okp)

    # --- key heads --------------------------------------------------------------
    # Each KV head is loaded once and rotated once at the normal and once at the
    # scaled-key angle; with a per-query-head mask it then feeds its KS_REP
    # scaled key heads (only a select and a store each), never re-read.
    for h0 in range(0, H_k, BLOCK_HK):
        hk = h0 + tl.arange(0, BLOCK_HK).to(tl.int64)
        hk_ok = hk < H_k
        ok2 = k_ok[:, None] & hk_ok[None, :]
        ok3 = ok2[:, :, None] & p_ok3
        src = (k_tok[:, None] + hk[None, :] * k_sh)[:, :, None]
        dst = (kn_tok[:, None] + hk[None, :] * kn_sh)[:, :, None]
        x1 = load_f32(k_ptr + src + off1, ok3, BF16_BY_BITS)
        x2 = load_f32(k_ptr + src + off2, ok3, BF16_BY_BITS)
        n1 = x1 * cos_n - x2 * sin_n
        n2 = x1 * sin_n + x2 * cos_n
        tl.store(kn_ptr + dst + off1, round_out(n1, out_dtype, BF16_BY_BITS), mask=ok3)
        tl.store(kn_ptr + dst + off2, round_out(n2, out_dtype, BF16_BY_BITS), mask=ok3)
        s1 = x1 * cos_ks - x2 * sin_ks
        s2 = x1 * sin_ks + x2 * cos_ks
        if HAS_PASS:
            okp = ok2[:, :, None] & jd_ok3
            x = tl.load(k_ptr + src + jd3, mask=okp, other=0.0)
            tl.store(kn_ptr + dst + jd3, x, mask=okp)
        if IS_CACHE:  # v rows of these KV heads to the v cache, unchanged
            dv = tl.arange(0, BLOCK_DV).to(tl.int64)
            okv = ok2[:, :, None] & (dv < Dv)[None, None, :]
            vrow = (s[:, None] * v_ss + hk[None, :] * v_sh)[:, :, None]
            vcrow = (k_outer[:, None] * vc_so + k_inner[:, None] * vc_si + hk[None, :] * vc_sh)[:, :, None]
            val = tl.load(v_ptr + vrow + dv[None, None, :], mask=okv, other=0.0)
            tl.store(vc_ptr + vcrow + dv[None, None, :], val, mask=okv)
        for r in range(KS_REP):  # a loop, not unrolled: KS_REP reaches H_q for MQA
            j = hk * KS_REP + r                                       # scaled key head
            dst_s = (ks_tok[:, None] + j[None, :] * ks_sh)[:, :, None]
            if HAS_MASK:
                kd = tl.load(mask_ptr + j[:, None] * P + i[None, :],
                             mask=hk_ok[:, None] & p_ok[None, :], other=0) != 0
                kd = kd[None, :, :]
                y1 = tl.where(kd, s1, n1)
                y2 = tl.where(kd, s2, n2)
            else:
                y1 = s1
                y2 = s2
            tl.store(ks_ptr + dst_s + off1, round_out(y1, out_dtype, BF16_BY_BITS), mask=ok3)
            tl.store(ks_ptr + dst_s + off2, round_out(y2, out_dtype, BF16_BY_BITS), mask=ok3)
            if HAS_PASS:
                tl.store(ks_ptr + dst_s + jd3, x, mask=okp)


# --------------------------------------------------------------------------- launcher
# Elements of one [BLOCK_T, BLOCK_H, BLOCK_P] tile (per operand: x1, x2 and the
# rotated values each hold this many float32).
# GPU: one token per program (BLOCK_T = 1) and up to 2048 (head, pair)
# elements per step, with one warp per 256 elements (8 values per thread per
# operand). Compiled for sm_90, a 32-head x 64-pair step needs 124 registers
# per thread with 8 warps and no spills (227 with 4 warps, halving occupancy);
# the only stack is libdevice's 32-byte Payne-Hanek buffer.
# Interpreter: its cost is per program and per op (numpy calls), not per
# element, so it packs many tokens into one large tile: small test shapes run
# as a single program.
_TILE_GPU = 2048
_TILE_INTERPRET = 1 << 16
_ELEMS_PER_WARP = 256
_MAX_WARPS = 8


def _check(q, k, rotary_dim):
    if q.dim() not in (3, 4) or k.dim() != q.dim():
        raise ValueError("q and k must both be [T, H, D] or [B, S, H, D]")
    if rotary_dim < 2 or rotary_dim % 2 or rotary_dim > q.shape[-1]:
        raise ValueError("rotary_dim must be even and in [2, head_dim]")


def _empty_outputs(q, k, mask):
    """Contiguous outputs with the leading shape of q and the dtype of q;
    k_scaled has H_m heads with a mask, else H_k."""
    hq, hk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    hks = scaled_key_heads(hk, mask)
    lead = q.shape[:-2]
    return (q.new_empty((*lead, hq, d)), q.new_empty((*lead, hk, d)),
            q.new_empty((*lead, hq, d)), q.new_empty((*lead, hks, d)))


def _row_strides(t):
    """(batch, token, head) strides of a [T, H, D] (batch 0) or [B, S, H, D] tensor."""
    return (0, t.stride(0), t.stride(1)) if t.dim() == 3 else (t.stride(0), t.stride(1), t.stride(2))


def _launch(q, k, positions, inv_freq, pair_scale, mask, window, rotary_dim, is_neox, outs, cache=None):
    """outs = (q_normal, k_normal, q_scaled, k_scaled), any strides (stride 1 on
    head_dim). cache = (slot_mapping, v, v_cache) switches to cache mode, where
    outs[1] and outs[3] are the k and k_scaled caches [num_blocks, block_size, H, D]."""
    q_normal, k_normal, q_scaled, k_scaled = outs
    hq, hk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    npairs = rotary_dim // 2
    if q.dim() == 3:  # packed [T, H, D]: one sequence of T tokens
        batch, seqlen = 1, q.shape[0]
        pos_sb, pos_ss = 0, positions.stride(0)
    else:
        batch, seqlen = q.shape[0], q.shape[1]
        pos_sb = 0 if positions.shape[0] == 1 else positions.stride(0)  # [1, S]: shared positions
        pos_ss = positions.stride(1)
    ntok = batch * seqlen
    if ntok == 0:  # nothing to rotate: no launch (a zero-size grid is invalid)
        return

    inv_freq = inv_freq.contiguous()
    pair_scale = pair_scale.contiguous()
    if mask is not None:
        hm = mask.shape[0]
        # bool is stored as one byte: read it as uint8 (1 = key dimension)
        mask_arg = mask.contiguous().view(torch.uint8)
        q_mask_div = hq // hm
        ks_rep = hm // hk  # 1 for a per-KV-head mask
    else:
        mask_arg = pair_scale  # never read (HAS_MASK=False)
        q_mask_div = 1
        ks_rep = 1
    if cache is not None:
        slot_mapping, v, v_cache = cache
        block_size = k_normal.shape[1]
        num_slots = k_normal.shape[0] * block_size
        dv = v.shape[-1]
        kn_strides = k_normal.stride()[:3]
        ks_strides = k_scaled.stride()[:3]
        cache_args = (slot_mapping.stride(0), block_size, num_slots, dv, v.stride(0), v.stride(1),
                      *v_cache.stride()[:3])
        slot_arg, v_arg, vc_arg = slot_mapping, v, v_cache
    else:
        dv = 1
        kn_strides = _row_strides(k_normal)
        ks_strides = _row_strides(k_scaled)
        cache_args = (0, 1, 0, 1, 0, 0, 0, 0, 0)
        slot_arg, v_arg, vc_arg = pair_scale, q, q_normal  # never read (IS_CACHE=False)

    tile = _TILE_INTERPRET if INTERPRETED else _TILE_GPU
    block_p = next_pow2(npairs)  # P need not be a power of two (masked lanes)
    npass = d - rotary_dim
    block_pass = next_pow2(npass) if npass > 0 else 1
    # Heads per step: all of them when they fit in the tile, else a loop over
    # head blocks inside the program (sin/cos stay computed once per token).
    head_cap = max(1, tile // max(block_p, next_pow2(dv)))
    block_hq = min(next_pow2(hq), head_cap)
    block_hk = min(next_pow2(hk), head_cap)
    # Tokens per program: one on a GPU (the grid is the token count, which
    # fills the machine for prefill and batched decode); as many as fit in
    # the tile under the interpreter.
    if INTERPRETED:
        block_t = max(1, min(next_pow2(ntok), tile // (block_hq * block_p)))
    else:
        block_t = 1
    num_warps = min(_MAX_WARPS, max(1, block_t * block_hq * block_p // _ELEMS_PER_WARP))
    grid = (triton.cdiv(ntok, block_t),)
    q_sb, k_sb = _row_strides(q)[0], _row_strides(k)[0]

    torch.library.wrap_triton(_dpe_rope_kernel)[grid](
        q, k, positions, inv_freq, pair_scale, mask_arg,
        q_normal, k_normal, q_scaled, k_scaled,
        slot_arg, v_arg, vc_arg,
        ntok, seqlen, hq, hk, d, npairs, window, q_mask_div,
        q_sb, q.stride(-3), q.stride(-2), k_sb, k.stride(-3), k.stride(-2), pos_sb, pos_ss,
        *_row_strides(q_normal), *_row_strides(q_scaled),
        *kn_strides, *ks_strides,
        *cache_args,
        IS_NEOX=bool(is_neox),
        HAS_MASK=mask is not None,
        HAS_PASS=npass > 0,
        KS_REP=ks_rep,
        IS_CACHE=cache is not None,
        USE_LIBDEVICE=not INTERPRETED,
        BF16_BY_BITS=INTERPRETED and q.dtype == torch.bfloat16,
        BLOCK_T=block_t,
        BLOCK_HQ=block_hq,
        BLOCK_HK=block_hk,
        BLOCK_P=block_p,
        BLOCK_PASS=block_pass,
        BLOCK_DV=next_pow2(dv) if cache is not None else 1,
        num_warps=num_warps,
    )


def _rope_triton_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    pair_scale: torch.Tensor,
    mask: Optional[torch.Tensor],
    window: int,
    rotary_dim: int,
    is_neox: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPE rotary step on Triton: ``(q_normal, k_normal, q_scaled, k_scaled)``.

    Same contract as ``torch.ops.dpe_kernels.rope`` (see
    ``csrc/rope_launch.h``); :func:`dpe_kernels.dpe_rope` validates the
    arguments before calling it.
    """
    _check(q, k, rotary_dim)
    outs = _empty_outputs(q, k, mask)
    _launch(q, k, positions, inv_freq, pair_scale, mask, window, rotary_dim, is_neox, outs)
    return outs


def _rope_triton_fake(q, k, positions, inv_freq, pair_scale, mask, window, rotary_dim, is_neox):
    _check(q, k, rotary_dim)
    return _empty_outputs(q, k, mask)


rope_triton = register_triton_op("rope_triton", _rope_triton_impl, _rope_triton_fake)


def _rope_out_triton_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    pair_scale: torch.Tensor,
    mask: Optional[torch.Tensor],
    window: int,
    rotary_dim: int,
    is_neox: bool,
    q_normal: torch.Tensor,
    k_normal: torch.Tensor,
    q_scaled: torch.Tensor,
    k_scaled: torch.Tensor,
) -> None:
    """As ``torch.ops.dpe_kernels.rope_out``: writes the four given outputs
    (any strides, stride 1 on head_dim; q_normal may be q, k_normal may be k)."""
    _check(q, k, rotary_dim)
    _launch(q, k, positions, inv_freq, pair_scale, mask, window, rotary_dim, is_neox,
            (q_normal, k_normal, q_scaled, k_scaled))


def _rope_out_triton_fake(q, k, positions, inv_freq, pair_scale, mask, window, rotary_dim, is_neox,
                          q_normal, k_normal, q_scaled, k_scaled):
    return None


rope_out_triton = register_triton_op(
    "rope_out_triton", _rope_out_triton_impl, _rope_out_triton_fake,
    mutates_args=("q_normal", "k_normal", "q_scaled", "k_scaled"))


def _rope_and_cache_triton_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    pair_scale: torch.Tensor,
    mask: Optional[torch.Tensor],
    window: int,
    rotary_dim: int,
    is_neox: bool,
    slot_mapping: torch.Tensor,
    k_cache: torch.Tensor,
    ks_cache: torch.Tensor,
    v_cache: torch.Tensor,
    q_normal: torch.Tensor,
    q_scaled: torch.Tensor,
) -> None:
    """As ``torch.ops.dpe_kernels.rope_and_cache``: q [T, H_q, D], k [T, H_k, D],
    v [T, H_k, D_v]; k_normal / k_scaled / v to the caches at slot_mapping[t]
    (negative: skipped), q_normal (may be q) and q_scaled to the outputs.
    :func:`dpe_kernels.dpe_rope_and_cache` validates the arguments first."""
    if q.dim() != 3:
        raise ValueError("q must be [T, H_q, D]")
    _check(q, k, rotary_dim)
    _launch(q, k, positions, inv_freq, pair_scale, mask, window, rotary_dim, is_neox,
            (q_normal, k_cache, q_scaled, ks_cache), cache=(slot_mapping, v, v_cache))


def _rope_and_cache_triton_fake(q, k, v, positions, inv_freq, pair_scale, mask, window, rotary_dim,
                                is_neox, slot_mapping, k_cache, ks_cache, v_cache, q_normal, q_scaled):
    return None


rope_and_cache_triton = register_triton_op(
    "rope_and_cache_triton", _rope_and_cache_triton_impl, _rope_and_cache_triton_fake,
    mutates_args=("k_cache", "ks_cache", "v_cache", "q_normal", "q_scaled"))
