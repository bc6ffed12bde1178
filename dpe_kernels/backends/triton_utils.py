"""What the Triton kernels share: the interpreter flag, the bfloat16 helpers the
interpreter needs, ``next_pow2``, and the one registration pattern of a Triton
op (a ``torch.library.triton_op``, its opaque eager twin and the twin's fake),
written once here for every kernel module."""
import functools
from typing import Callable, Tuple

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

__all__ = ["INTERPRETED", "next_pow2", "classify_key_tiles", "load_f32", "round_out", "bf16_bits_to_f32", "round_bf16_bits",
           "register_triton_op"]


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
