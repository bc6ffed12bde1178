"""Every op of the package in one place: each compiled op's schema next to its
fake (meta) implementation, then the compiled extension (dpe_kernels._C, a
pybind11 module whose C++ only registers kernels per device with
TORCH_LIBRARY_IMPL) is loaded. The schemas are defined here *before* the
library loads, so its implementations attach to them. If the extension is
missing or fails to load, the package still imports, warns once, and the
`reference` (and, on a GPU, `triton`) backends remain.

Ops (torch.ops.dpe_kernels.*):
    rope(q, k, positions, inv_freq, pair_scale, mask, window, rotary_dim, is_neox)
        -> (q_normal, k_normal, q_scaled, k_scaled)
    rope_out(..., q_normal, k_normal, q_scaled, k_scaled) -> ()
        writes the given outputs (any strides, stride 1 on head_dim; q_normal
        may be q and k_normal may be k: in place)
    rope_and_cache(q, k, v, positions, inv_freq, pair_scale, mask, window, rotary_dim,
                   is_neox, slot_mapping, k_cache, ks_cache, v_cache, q_normal, q_scaled) -> ()
        rotates, writes k_normal / k_scaled / v into paged caches
        [num_blocks, block_size, H, D] at slot_mapping[t] (negative: skipped)
        and q_normal / q_scaled into the outputs (q_normal may be q)
    paged_decode(q_normal, q_scaled, k_cache, ks_cache, v_cache, block_table, seq_lens, window,
                 scale, max_seqlen_k) -> (out float32 [B, H_q, Dv], lse float32 [B, H_q])
        DPE decode attention (one query per sequence, CPU) read in place from the paged caches
        through the block table (csrc/paged_decode.cpp)
    paged_decode_rotary(q, k_cache, v_cache, block_table, seq_lens, cos_sin, pair_scale, window, seq_config,
                        mask, rotary_dim, is_neox, scale, max_seqlen_k)
        -> (out float32 [B, H_q, Dv], lse float32 [B, H_q])
        the same decode (CPU) over a cache of UNROTATED keys, each rotated as it is read from the
        float32 table cos_sin [N, rotary_dim]; one configuration per sequence (seq_config [B], dtype
        of block_table, indexes pair_scale int64 [C, P], window int64 [C], mask bool [C, H_q, P])
        (csrc/paged_decode.cpp, kernel csrc/include/dpe/paged_decode_rotary_cpu.h)
The kernels: csrc/include/dpe/ (torch-free), launchers csrc/rope.cpp,
csrc/paged_decode.cpp and csrc/rope_cuda.cu. The Triton ops are registered in
dpe_kernels/backends/triton_common.py's one pattern (triton_op + eager twin +
fake) by the modules that define them.
"""
from __future__ import annotations

import warnings

import torch

from .utils import scaled_key_heads

__all__ = ["HAS_EXT", "EXT_ERROR", "has_kernel", "COMPILED_OPS"]

_NS = "dpe_kernels"
_ROPE_ARGS = ("Tensor q, Tensor k, Tensor positions, Tensor inv_freq, Tensor pair_scale, Tensor? mask, "
              "int window, int rotary_dim, bool is_neox")


def _define(name: str, schema: str):
    """Define ``dpe_kernels::<name>`` once (a re-import must not define it twice)."""
    if not _has_schema(name):
        torch.library.define(f"{_NS}::{name}", schema)


def _has_schema(name: str) -> bool:
    try:
        torch._C._get_schema(f"{_NS}::{name}", "")
        return True
    except RuntimeError:
        return False


# --------------------------------------------------------------------------- rope
_define("rope", f"({_ROPE_ARGS}) -> (Tensor, Tensor, Tensor, Tensor)")


@torch.library.register_fake(f"{_NS}::rope")
def _rope_fake(q, k, positions, inv_freq, pair_scale, mask, window, rotary_dim, is_neox):
    k_scaled_shape = (*k.shape[:-2], scaled_key_heads(k.shape[-2], mask), k.shape[-1])
    return (q.new_empty(q.shape), k.new_empty(k.shape), q.new_empty(q.shape),
            k.new_empty(k_scaled_shape))


# --------------------------------------------------------------------------- rope_out
_define("rope_out", f"({_ROPE_ARGS}, Tensor(a!) q_normal, Tensor(b!) k_normal, Tensor(c!) q_scaled, "
                    "Tensor(d!) k_scaled) -> ()")


@torch.library.register_fake(f"{_NS}::rope_out")
def _rope_out_fake(q, k, positions, inv_freq, pair_scale, mask, window, rotary_dim, is_neox,
                   q_normal, k_normal, q_scaled, k_scaled):
    return None


# --------------------------------------------------------------------------- rope_and_cache
_define("rope_and_cache",
        "(Tensor q, Tensor k, Tensor v, Tensor positions, Tensor inv_freq, Tensor pair_scale, Tensor? mask, "
        "int window, int rotary_dim, bool is_neox, Tensor slot_mapping, Tensor(a!) k_cache, "
        "Tensor(b!) ks_cache, Tensor(c!) v_cache, Tensor(d!) q_normal, Tensor(e!) q_scaled) -> ()")


@torch.library.register_fake(f"{_NS}::rope_and_cache")
def _rope_and_cache_fake(q, k, v, positions, inv_freq, pair_scale, mask, window, rotary_dim, is_neox,
                         slot_mapping, k_cache, ks_cache, v_cache, q_normal, q_scaled):
    return None


# --------------------------------------------------------------------------- paged_decode
_define("paged_decode",
        "(Tensor q_normal, Tensor q_scaled, Tensor k_cache, Tensor ks_cache, Tensor v_cache, "
        "Tensor block_table, Tensor seq_lens, int window, float scale, int max_seqlen_k) -> (Tensor, Tensor)")


@torch.library.register_fake(f"{_NS}::paged_decode")
def _paged_decode_fake(q_normal, q_scaled, k_cache, ks_cache, v_cache, block_table, seq_lens, window, scale,
                       max_seqlen_k):
    b, h = q_normal.shape[:2]
    return (q_normal.new_empty((b, h, v_cache.shape[-1]), dtype=torch.float32),
            q_normal.new_empty((b, h), dtype=torch.float32))


# --------------------------------------------------------------------------- paged_decode_rotary
_define("paged_decode_rotary",
        "(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor seq_lens, Tensor cos_sin, "
        "Tensor pair_scale, Tensor window, Tensor seq_config, Tensor? mask, int rotary_dim, bool is_neox, "
        "float scale, int max_seqlen_k) -> (Tensor, Tensor)")


@torch.library.register_fake(f"{_NS}::paged_decode_rotary")
def _paged_decode_rotary_fake(q, k_cache, v_cache, block_table, seq_lens, cos_sin, pair_scale, window, seq_config,
                              mask, rotary_dim, is_neox, scale, max_seqlen_k):
    b, h = q.shape[:2]
    return (q.new_empty((b, h, v_cache.shape[-1]), dtype=torch.float32),
            q.new_empty((b, h), dtype=torch.float32))


COMPILED_OPS = ("rope", "rope_out", "rope_and_cache", "paged_decode", "paged_decode_rotary")

# --------------------------------------------------------------------------- the library
try:
    from . import _C  # noqa: F401  (loading it registers the CPU / CUDA kernels of the ops above)

    HAS_EXT = True
    EXT_ERROR = None
except Exception as e:  # ImportError, or OSError from an ABI mismatch
    import os as _os

    HAS_EXT = False
    EXT_ERROR = f"{type(e).__name__}: {e}"
    _here = _os.path.dirname(_os.path.abspath(__file__))
    if isinstance(e, ImportError) and _os.path.isfile(_os.path.join(_here, "..", "setup.py")) and not any(
            f.startswith("_C.") for f in _os.listdir(_here)):
        # The usual cause: Python found the source checkout (the current directory) before the
        # installed package, and a non-editable install builds _C only into site-packages.
        EXT_ERROR = (f"dpe_kernels was imported from the source tree {_here}, which holds no built "
                     "extension (dpe_kernels/_C*.so); run from another directory to use the installed "
                     "package, or install in place with `pip install --no-build-isolation -e .`")
    elif "dpe_kernels" in str(e) and ("multiple times" in str(e) or "TORCH_LIBRARY" in str(e)):
        # An extension that defines the schemas itself (built from older sources).
        EXT_ERROR += " (the extension is older than this package's sources: rebuild it)"
    warnings.warn(
        "dpe_kernels: the compiled extension could not be loaded "
        f"({EXT_ERROR}); falling back to the PyTorch reference (and Triton on CUDA). "
        "Reinstall with `pip install --no-build-isolation .` to build it.",
        RuntimeWarning,
        stacklevel=2,
    )


# Which compiled kernels exist, read once at import: a plain dict lookup that
# torch.compile can trace (the dispatcher query itself cannot be traced).
_KERNELS = {
    (op, key): HAS_EXT and torch._C._dispatch_has_kernel_for_dispatch_key(f"{_NS}::{op}", key)
    for op in COMPILED_OPS
    for key in ("CPU", "CUDA")
}


def has_kernel(op: str, dispatch_key: str) -> bool:
    """True when torch.ops.dpe_kernels.<op> has a compiled kernel for the key ('CPU', 'CUDA')."""
    return _KERNELS.get((op, dispatch_key), False)
