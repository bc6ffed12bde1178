"""Small rules shared by the core modules and the backends, one home each: dtype sets,
the int predicate, the heads of ``k_scaled``, whether Triton can run, host reads.
Argument checks are :mod:`dpe_kernels.checks`."""
from __future__ import annotations

import importlib.util
import os
from typing import Optional, Tuple

import torch

__all__ = [
    "FLOAT_DTYPES", "REFERENCE_DTYPES", "is_int", "scaled_key_heads", "HAS_TRITON", "triton_usable",
    "dtype_by_name", "DTYPE_NAMES", "host_ints",
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


def scaled_key_heads(heads_k: int, mask: Optional[torch.Tensor]) -> int:
    """Heads of ``k_scaled``: the mask's rows (``H_q`` for a per-query-head
    mask, ``H_k`` per KV head), or ``H_k`` without a mask (docs/method.md: with a
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
