"""Helpers shared by the core modules and the backends: one home for each rule
that more than one module applies (dtype sets, the int check, the
inference-only check, the heads of ``k_scaled``, whether Triton can run)."""
from __future__ import annotations

import importlib.util
import math
import numbers
import os
from typing import Iterable, Optional, Tuple

import torch

__all__ = [
    "FLOAT_DTYPES", "REFERENCE_DTYPES", "is_int", "check_inference_only", "scaled_key_heads",
    "HAS_TRITON", "triton_usable", "dtype_by_name", "DTYPE_NAMES", "host_ints", "check_window_and_scale",
]

# The dtypes every compiled / Triton kernel takes; the float64 oracle adds float64.
FLOAT_DTYPES: Tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
REFERENCE_DTYPES: Tuple[torch.dtype, ...] = FLOAT_DTYPES + (torch.float64,)
# Names the command-line tools accept for a model dtype.
DTYPE_NAMES: Tuple[str, ...] = ("float32", "bfloat16", "float16")


def dtype_by_name(name: str) -> torch.dtype:
    """``"float32"`` / ``"bfloat16"`` / ``"float16"`` -> the torch dtype."""
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {DTYPE_NAMES}, got {name!r}")
    return getattr(torch, name)


def is_int(x) -> bool:
    """A Python int that is not a bool."""
    return isinstance(x, int) and not isinstance(x, bool)


def check_inference_only(op: str, named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> None:
    """The package has no autograd formulas: with grad mode on, an input that
    requires grad raises ValueError naming it (under no_grad / inference_mode
    such inputs are accepted and the outputs do not require grad)."""
    if torch.is_grad_enabled():
        for name, t in named_tensors:
            if t.requires_grad:
                raise ValueError(
                    f"{op} is inference-only (no autograd) and {name} requires grad: call it under "
                    "torch.no_grad() or torch.inference_mode(), or pass detached tensors")


def scaled_key_heads(heads_k: int, mask: Optional[torch.Tensor]) -> int:
    """Heads of ``k_scaled``: the mask's rows (``H_q`` for a per-query-head
    mask, ``H_k`` per KV head), or ``H_k`` without a mask (SPEC: with a
    per-query-head mask and GQA the scaled key depends on the query head)."""
    return mask.shape[0] if mask is not None else heads_k


HAS_TRITON = importlib.util.find_spec("triton") is not None


def triton_usable(device: torch.device) -> bool:
    """Triton kernels run on CUDA tensors, and on CPU tensors under the
    interpreter (``TRITON_INTERPRET=1``)."""
    if not HAS_TRITON:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


def host_ints(t: torch.Tensor) -> list:
    """An int tensor as a list of Python ints (reads it on the host: a sync on CUDA)."""
    return [int(x) for x in t.tolist()]


def check_window_and_scale(window, softmax_scale) -> None:
    """The attention ops' ``window`` (an int >= 1) and ``softmax_scale`` (None or a finite
    float): TypeError / ValueError naming the argument."""
    if isinstance(window, bool) or not isinstance(window, numbers.Integral):
        raise TypeError(f"window must be an int, got {type(window).__name__}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if softmax_scale is not None:
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
            raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
        if not math.isfinite(float(softmax_scale)):
            raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
