"""dpe-kernels: fused dimension-wise RoPE (DPE) for training-free long-context extension.

Public API:
    DPEConfig          window, groups of pairs, per-group scales, optional key-dimension mask
    dpe_rope           the fused DPE rotary step (backends: reference, cpu, cuda, triton)
    available_backends which backends run on a device in this process
"""
from . import _ext
from .config import DPEConfig
from .rope import BACKENDS, RopeOutput, available_backends, dpe_rope, rope_reference

__version__ = "0.1.0"
__all__ = ["DPEConfig", "dpe_rope", "RopeOutput", "available_backends", "rope_reference", "BACKENDS"]
