"""dpe-kernels: fused dimension-wise RoPE (DPE) and DPE attention for training-free long-context extension.

Public API:
    DPEConfig          window, groups of pairs, per-group scales, optional key-dimension mask
    dpe_rope           the fused DPE rotary step (backends: reference, cpu, cuda, triton)
    available_backends which backends run on a device in this process

    dpe_attention      causal DPE attention: normal logits inside the window, scaled beyond, one
                       softmax (backends: reference, cpu, flash, triton)
    merge_attention    merge two partial attentions by their natural-log lse
    lse_from_flash_attn2 / lse_from_flash_attn3 / lse_from_flashinfer
                       convert another library's lse to that convention
    available_attention_backends  which attention backends run on a device in this process
"""
from . import _ext
from .config import DPEConfig
from .attention import (
    available_attention_backends,
    dpe_attention,
    lse_from_flash_attn2,
    lse_from_flash_attn3,
    lse_from_flashinfer,
    merge_attention,
)
from .rope import BACKENDS, RopeOutput, available_backends, dpe_rope, rope_reference

__version__ = "0.1.0"
__all__ = [
    "DPEConfig", "dpe_rope", "RopeOutput", "available_backends", "rope_reference", "BACKENDS",
    "dpe_attention", "merge_attention", "lse_from_flash_attn2", "lse_from_flash_attn3",
    "lse_from_flashinfer", "available_attention_backends",
]

# Hugging Face integration, imported on first use (dpe_kernels.hf / dpe_kernels.baselines; they need no
# transformers import themselves, but stay out of `import dpe_kernels`).
_LAZY = {"apply_dpe": "hf", "remove_dpe": "hf", "apply_method": "baselines"}
__all__ += list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
