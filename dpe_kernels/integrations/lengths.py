"""The one rule for a model's pre-training context length, shared by the Hugging Face integration
(:func:`dpe_kernels.integrations.hf.train_length`) and the vLLM plugin
(:mod:`dpe_kernels.integrations.vllm.settings`).

Read from the model's OWN configuration (``config.json`` as written, before any override such as
vLLM's ``hf_overrides``), a ``dict`` or a ``transformers`` config object (``text_config`` of a
multimodal config when there is one), in this order:

1. a ``"dpe"`` block with ``train_length`` (written by ``dpe export-hf --dpe`` / ``dpe detect
   --ship-to``, which raise ``max_position_embeddings`` to the DPE target length and record the
   length the model was trained for here);
2. ``rope_type: "llama3"`` (Llama-3.1 / 3.2 / 3.3): ``max_position_embeddings`` (131072 for
   Llama-3.1): the llama3 frequency scaling is part of the model's training (its long-context
   stage), so the model is trained for ``max_position_embeddings``; the ``original_max_position_
   embeddings`` inside the scaling (8192) is the length BEFORE that stage and is not the length
   DPE extends from;
3. any other rope scaling that names ``original_max_position_embeddings`` (YaRN, dynamic, linear,
   longrope: an extension applied on top of a model trained for that length): that value;
4. ``max_position_embeddings``.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

__all__ = ["pretraining_length", "rope_parameters_of", "text_config_of"]


def _get(cfg: Any, key: str, default=None):
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def text_config_of(cfg: Any) -> Any:
    """The text model's part of a (multimodal) config; the config itself otherwise."""
    tc = _get(cfg, "text_config")
    return tc if tc is not None and not isinstance(tc, (str, int, float)) else cfg


def rope_parameters_of(cfg: Any) -> dict:
    """``rope_parameters`` (transformers >= 5) or ``rope_scaling`` (older configs) as a dict ({} if none)."""
    for attr in ("rope_parameters", "rope_scaling"):
        rp = _get(cfg, attr)
        if isinstance(rp, dict) and rp:
            return rp
    return {}


def _positive_int(v) -> Optional[int]:
    try:
        n = int(v)
    except (TypeError, ValueError):
        return None
    return n if n > 0 and n == v else None


def pretraining_length(cfg: Any) -> Tuple[Optional[int], str]:
    """``(length, which_field)`` from a model config (dict or config object) by the rule above;
    ``(None, reason)`` when the config names no length."""
    top_dpe = _get(cfg, "dpe")
    cfg = text_config_of(cfg)
    dpe = _get(cfg, "dpe", top_dpe)
    if isinstance(dpe, dict) and dpe.get("train_length") is not None:
        n = _positive_int(dpe["train_length"])
        if n is not None:
            return n, "dpe.train_length"
    mpe = _positive_int(_get(cfg, "max_position_embeddings"))
    rp = rope_parameters_of(cfg)
    rope_type = rp.get("rope_type", rp.get("type")) or "default"
    if rope_type == "llama3" and mpe is not None:
        return mpe, "max_position_embeddings (rope_type llama3: the trained length)"
    orig = _positive_int(rp.get("original_max_position_embeddings"))
    if orig is not None:
        return orig, f"original_max_position_embeddings (rope_type {rope_type})"
    if mpe is not None:
        return mpe, "max_position_embeddings"
    return None, "the config has no max_position_embeddings"
