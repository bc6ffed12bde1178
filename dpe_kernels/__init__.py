"""dpe-kernels: fused dimension-wise RoPE (DPE) and DPE attention for training-free long-context extension.

Layout:
    dpe_kernels/            core: config (DPEConfig, presets), the public ops (rope, attention,
                            paged_attention, cache), checks (every argument check), merge,
                            reference (the float64 oracles), ops (the compiled library and every op's fake)
    dpe_kernels/backends/   the backend registry (__init__) and the cpu / flash / Triton implementations behind backend=
    dpe_kernels/integrations/  Hugging Face (hf, baselines) and the vLLM plugin (vllm)
    dpe_kernels/tools/      the `dpe` CLI, evaluation, calibration, model loading, benchmarks

Public API:
    DPEConfig          window, groups of pairs, per-group scales, optional key-dimension mask;
                       DPEConfig.from_preset(name, ...) for the paper's, the calibrated and the starting presets
    dpe_rope           the fused DPE rotary step (ROPE_BACKENDS: reference, cpu, cuda, triton); out= views
                       of any strides, inplace=True
    dpe_rope_and_cache the rotary step fused with the write of k_normal, k_scaled and v into a paged
                       KV cache at slot_mapping (negative slots skipped), as an engine's layer does
    available_rope_backends  which rope backends run on a device in this process
    dpe_attention      causal DPE attention: normal logits inside the window, scaled beyond, one
                       softmax (ATTENTION_BACKENDS: reference, cpu, flash, triton)
    available_attention_backends  which attention backends run on a device in this process
    dpe_paged_attention  DPE attention of packed queries over a paged KV cache (block table, as vLLM
                       keeps it; PAGED_BACKENDS: reference, cpu, triton); available_paged_backends
    dpe_paged_attention_rotary  the same over a cache of UNROTATED keys (the engine's own layout and
                       size: no extra KV memory), each key rotated as it is loaded from a cos/sin
                       table (rotary_table); each sequence may use its own configuration
    merge_attention    merge two partial attentions by their natural-log lse
    lse_from_flash_attn2 / lse_from_flash_attn3 / lse_from_flashinfer
                       convert another library's lse to that convention
    DPEKVCache, dpe_attention_step   the rotate-once key/value cache and one decode step
    rope_reference, attention_reference, decode_rerotate_reference   the float64-capable oracles
    apply_dpe, remove_dpe, apply_method   the Hugging Face integration (imported on first use)
"""
from . import ops
from .attention import (
    ATTENTION_BACKENDS,
    available_attention_backends,
    dpe_attention,
    lse_from_flash_attn2,
    lse_from_flash_attn3,
    lse_from_flashinfer,
    merge_attention,
)
from .cache import DPEKVCache, dpe_attention_step
from .config import DPEConfig
from .paged_attention import PAGED_BACKENDS, available_paged_backends, dpe_paged_attention, dpe_paged_attention_rotary
from .reference import attention_reference, decode_rerotate_reference, rope_reference
from .rope import (MAX_EXACT_POSITION, ROPE_BACKENDS, RopeCacheOutput, RopeOutput, available_rope_backends, dpe_rope,
                   dpe_rope_and_cache, rotary_table)

__version__ = "0.2.0"
__all__ = [
    "DPEConfig", "dpe_rope", "RopeOutput", "ROPE_BACKENDS", "available_rope_backends", "MAX_EXACT_POSITION",
    "dpe_rope_and_cache", "RopeCacheOutput",
    "dpe_attention", "ATTENTION_BACKENDS", "available_attention_backends", "merge_attention",
    "lse_from_flash_attn2", "lse_from_flash_attn3", "lse_from_flashinfer",
    "DPEKVCache", "dpe_attention_step",
    "dpe_paged_attention", "PAGED_BACKENDS", "available_paged_backends", "dpe_paged_attention_rotary",
    "rotary_table",
    "rope_reference", "attention_reference", "decode_rerotate_reference",
    "has_extension", "extension_error",
]


def has_extension() -> bool:
    """True when the compiled extension (CPU kernels, and CUDA ones in a CUDA build) loaded."""
    return ops.HAS_EXT


def extension_error():
    """Why the compiled extension did not load (a string), or None when it did."""
    return ops.EXT_ERROR


# Hugging Face integration, imported on first use (it needs no transformers import itself, but
# stays out of `import dpe_kernels`).
_LAZY = {"apply_dpe": "integrations.hf", "remove_dpe": "integrations.hf", "apply_method": "integrations.baselines"}
__all__ += list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
