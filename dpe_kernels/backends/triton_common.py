"""What the Triton kernels share: the interpreter flag, the bfloat16 helpers the
interpreter needs, ``next_pow2``, the key-tile classification, split-KV (how
many splits, and the kernel that merges them), and the one registration
pattern of a Triton op (a ``torch.library.triton_op``, its opaque eager twin
and the twin's fake), written once here for every kernel module."""
import functools
from typing import Callable, Tuple

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

__all__ = ["INTERPRETED", "next_pow2", "classify_key_tiles", "load_f32", "round_out", "bf16_bits_to_f32", "round_bf16_bits",
           "register_triton_op", "num_kv_splits", "combine_splits_kernel",
           "online_softmax_step"]


@triton.jit
def _probe():
    pass


# True when TRITON_INTERPRET=1 was set when Triton kernels were defined: triton.jit
# then returns an InterpretedFunction that runs on CPU tensors with numpy.
INTERPRETED = not isinstance(_probe, JITFunction)


def next_pow2(n: int) -> int:
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


# The Triton interpreter (TRITON_INTERPRET=1) converts between float32 and
# bfloat16 wrongly: float32 -> bfloat16 truncates instead of rounding to
# nearest even, and bfloat16 subnormals come out wrong in both directions.
# With BF16_BY_BITS (interpreter and bfloat16 only) both conversions are done
# on the bits, exactly as compiled Triton and torch do them; compiled Triton
# takes the plain casts (round to nearest even, exact widening).
@triton.jit
def load_f32(ptrs, mask, BF16_BY_BITS: tl.constexpr):
    x = tl.load(ptrs, mask=mask, other=0.0)
    if BF16_BY_BITS:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def round_out(x, out_dtype: tl.constexpr, BF16_BY_BITS: tl.constexpr):
    # float32 -> output dtype, one rounding to nearest even (as the CPU and
    # CUDA backends do).
    if BF16_BY_BITS:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        bits = tl.where(x != x, 0x7FC0, bits)  # NaN stays a (quiet) NaN
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(out_dtype)


# (Separate functions because every call of a jit function costs the
# interpreter a few milliseconds: hot loops call none on the other paths.)
@triton.jit
def bf16_bits_to_f32(x):
    return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def round_bf16_bits(p):
    return bf16_bits_to_f32(round_out(p, tl.bfloat16, True))


@triton.jit
def classify_key_tiles(m0, m1, lo, hi, window, BLOCK_N: tl.constexpr):
    """Split the key tiles of a query tile by the kind of logit they need.

    Queries sit at positions ``m0 .. m1``; tile ``j`` holds keys
    ``lo + j * BLOCK_N + [0, BLOCK_N)`` for keys in ``[lo, hi)``. Returns
    ``(n_tiles, j_s, j_n, j_d)``: tiles ``[0, j_s)`` have every distance >= window
    (scaled only, unmasked), ``[j_s, j_n)`` straddle the window edge (both,
    per-element select), ``[j_n, j_d)`` have every distance < window and every
    key <= m0 (normal, unmasked), ``[j_d, n_tiles)`` lie on the causal diagonal
    (normal, masked). A tile thus costs one ``q k^T`` product except the few
    straddling ones (at most about ``BLOCK_M / BLOCK_N + 1`` per query tile).
    """
    n_tiles = (tl.maximum(hi - lo, 0) + BLOCK_N - 1) // BLOCK_N
    j_s = tl.minimum(tl.maximum(m0 - window + 1 - lo, 0) // BLOCK_N, n_tiles)
    j_n = tl.maximum(m1 - window + 1 - lo, 0)
    j_n = tl.minimum(tl.maximum((j_n + BLOCK_N - 1) // BLOCK_N, j_s), n_tiles)
    j_d = tl.minimum(tl.maximum(tl.maximum(m0 + 1 - lo, 0) // BLOCK_N, j_n), n_tiles)
    return n_tiles, j_s, j_n, j_d


@triton.jit
def online_softmax_step(acc, l_i, m_i, qk, vt, MASKED: tl.constexpr, BF16_BY_BITS: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    """One key tile of the online softmax shared by the attention kernels: logits ``qk``
    [BM, BN] (float32, log2 units, masked entries -inf) and the tile's values ``vt``
    [BN, BDV] update the running max ``m_i``, sum ``l_i`` and output ``acc``. With
    ``MASKED`` a row may have no key yet (max -inf): 0 is subtracted instead, so exp2
    gives 0, not NaN. ``p`` is rounded to v's dtype for the ``p @ v`` product, as
    FlashAttention does. Returns ``(acc, l_i, m_i)``."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    if MASKED:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    p = tl.math.exp2(qk - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    if BF16_BY_BITS:
        vt = bf16_bits_to_f32(vt)
        p_op = round_bf16_bits(p)
    else:
        p_op = p.to(vt.dtype)
    acc = tl.dot(p_op, vt, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, l_i, m_new


def register_triton_op(name: str, impl: Callable, fake: Callable, mutates_args: Tuple[str, ...] = ()):
    """Register ``impl`` (type-annotated, launching its kernel through
    ``torch.library.wrap_triton``) as ``torch.ops.dpe_kernels.<name>``;
    ``mutates_args`` names the arguments it writes (an out-variant op).

    On a GPU the op is a ``torch.library.triton_op``, so ``torch.compile``
    traces into the kernel. Under TRITON_INTERPRET=1, ``wrap_triton`` hands
    back the raw interpreted function, which cannot be captured into a graph
    nor run on fake or functional tensors; so while the op is traced there
    (fake-tensor propagation, AOTDispatcher / torch.compile) it goes through an
    opaque twin, ``torch.ops.dpe_kernels._<name>_eager`` (the same ``impl``,
    launched eagerly), whose shapes come from ``fake``. Returns the op.
    """
    eager = torch.library.custom_op(f"dpe_kernels::_{name}_eager", mutates_args=mutates_args)(impl)
    eager.register_fake(fake)

    @functools.wraps(impl)
    def op(*args, **kwargs):
        if INTERPRETED and any(isinstance(a, torch.Tensor) and type(a) is not torch.Tensor
                               for a in (*args, *kwargs.values())):
            return eager(*args, **kwargs)
        return impl(*args, **kwargs)

    return torch.library.triton_op(f"dpe_kernels::{name}", mutates_args=mutates_args)(op)


@triton.jit
def combine_splits_kernel(
    po_ptr, pl_ptr, out_ptr, lse_ptr, num_splits, H_q,
    o_ts, o_hs, l_ts, l_hs,
    HEAD_DIM_V: tl.constexpr, RETURN_LSE: tl.constexpr, BF16_BY_BITS: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Merge the num_splits partials of one (token, head) by their lse: the
    split-KV epilogue of every kernel here. Workspace ``po [T_q, H_q,
    num_splits, Dv]`` / ``pl [T_q, H_q, num_splits]``, float32, contiguous (a
    split with no key holds lse -inf); grid ``(T_q, H_q)``; ``out`` / ``lse``
    rows addressed by token and head strides."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    s_ok = offs_s < num_splits
    row = (t * H_q + h) * num_splits
    l = tl.load(pl_ptr + row + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(l, 0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(l - m_use)                                    # 0 for an empty split
    tot = tl.sum(w, 0)
    o_mask = s_ok[:, None] & (offs_dv < HEAD_DIM_V)[None, :]
    po = tl.load(po_ptr + (row + offs_s)[:, None] * HEAD_DIM_V + offs_dv[None, :], mask=o_mask, other=0.0)
    o = tl.sum(po * w[:, None], 0) / tl.where(tot > 0.0, tot, 1.0)
    tl.store(out_ptr + t * o_ts + h * o_hs + offs_dv, round_out(o, out_ptr.dtype.element_ty, BF16_BY_BITS),
             mask=offs_dv < HEAD_DIM_V)
    if RETURN_LSE:
        tl.store(lse_ptr + t * l_ts + h * l_hs, tl.where(tot > 0.0, m_use + tl.log(tot), float("-inf")))


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return int(torch.cuda.get_device_properties(device_index).multi_processor_count)


# Split-KV sizing. Each split should hold enough keys to amortise its
# partial write and the combine (flash-decoding uses splits of >= 256 keys);
# on a GPU the splits fill about two waves of programs. Under the
# interpreter (tests) a tiny split size and a small target exercise several
# splits on short contexts.
_MIN_KEYS_PER_SPLIT = 16 if INTERPRETED else 256
_MAX_SPLITS = 8 if INTERPRETED else 64


def num_kv_splits(programs: int, max_seqlen_k: int, device: torch.device) -> int:
    """How many key ranges to split each (query tile, head group) over:
    enough programs for about two per SM (4 under the interpreter),
    at least _MIN_KEYS_PER_SPLIT keys each, at most _MAX_SPLITS."""
    target = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 4
    if programs >= target or max_seqlen_k <= _MIN_KEYS_PER_SPLIT:
        return 1
    return max(1, min(triton.cdiv(target, programs), max_seqlen_k // _MIN_KEYS_PER_SPLIT, _MAX_SPLITS))
