"""Every op of the package in one place: loads the compiled extension
(dpe_kernels._C, a pybind11 module whose C++ registers kernels per device) and
holds each op's fake (meta) implementation next to it. If the extension is
missing or fails to load, the package still imports, warns once, and the
`reference` (and, on a GPU, `triton`) backends remain.

Ops (torch.ops.dpe_kernels.*):
    rope(q, k, positions, inv_freq, pair_scale, mask, window, rotary_dim, is_neox)
        -> (q_normal, k_normal, q_scaled, k_scaled)
    rope_out(..., q_normal, k_normal, q_scaled, k_scaled) -> ()   (writes the given outputs)
The Triton ops are registered in dpe_kernels/backends/triton_utils.py's one
pattern (triton_op + eager twin + fake) by the modules that define them.
"""
from __future__ import annotations

import warnings

import torch

from .utils import scaled_key_heads

__all__ = ["HAS_EXT", "EXT_ERROR", "has_kernel"]

try:
    from . import _C  # noqa: F401  (loading it registers torch.ops.dpe_kernels.*)

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
    (op, key): HAS_EXT and torch._C._dispatch_has_kernel_for_dispatch_key(f"dpe_kernels::{op}", key)
    for op in ("rope",)
    for key in ("CPU", "CUDA")
}


def has_kernel(op: str, dispatch_key: str) -> bool:
    """True when torch.ops.dpe_kernels.<op> has a compiled kernel for the key ('CPU', 'CUDA')."""
    return _KERNELS.get((op, dispatch_key), False)


if HAS_EXT:

    @torch.library.register_fake("dpe_kernels::rope")
    def _rope_fake(q, k, positions, inv_freq, pair_scale, mask, window, rotary_dim, is_neox):
        k_scaled_shape = (*k.shape[:-2], scaled_key_heads(k.shape[-2], mask), k.shape[-1])
        return (q.new_empty(q.shape), k.new_empty(k.shape), q.new_empty(q.shape),
                k.new_empty(k_scaled_shape))

    @torch.library.register_fake("dpe_kernels::rope_out")
    def _rope_out_fake(q, k, positions, inv_freq, pair_scale, mask, window, rotary_dim, is_neox,
                       q_normal, k_normal, q_scaled, k_scaled):
        return None
