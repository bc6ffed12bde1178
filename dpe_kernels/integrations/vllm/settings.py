"""The ``dpe`` switch of vLLM's ``additional_config``: parsing, engine-start checks, and the
resolved :class:`~dpe_kernels.DPEConfig` for the served model.

    additional_config={"dpe": {"preset": "smollm2-135m"}}                 # shipped calibrated preset
    additional_config={"dpe": {"config": "cfg.json"}}                     # DPEConfig JSON (with its mask)
    additional_config={"dpe": {"preset": "auto", "target_length": 16384}} # starting scales for 16K

Keys (any other key is refused):

* ``preset`` or ``config`` (exactly one): a :meth:`DPEConfig.from_preset` name or a DPEConfig JSON
  file path;
* ``target_length``: the length ``auto`` / ``uniform`` are configured for (default: the engine's
  ``max_model_len``); it must not exceed ``max_model_len``, which is the model's
  ``max_position_embeddings`` unless ``hf_overrides`` raises it;
* ``train_length``: the pre-training length (default: the model's ``config.json`` on disk, i.e.
  before ``hf_overrides``: ``original_max_position_embeddings`` of a rope scaling, else
  ``max_position_embeddings``);
* ``window``: the window of ``auto`` / ``uniform`` / paper presets (default 1024).

Everything here reads only configuration (no tensor); :func:`engine_settings` is what the plugin
calls in every engine process, once per ``VllmConfig``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from ...config import DPEConfig, preset_names
from ...utils import is_int

__all__ = ["BACKEND_NAME", "CPU_BACKEND_PATH", "check_selection", "DPE_KEY", "DPEOptions", "EngineSettings", "parse_options", "options_from_vllm_config",
           "engine_settings", "check_engine", "SUPPORTED_ROPE_TYPES"]

DPE_KEY = "dpe"
_KEYS = ("preset", "config", "target_length", "train_length", "window")
# Rotary schemes whose frequencies the plugin's identity rotary reproduces (vLLM's
# RotaryEmbedding / Llama3RotaryEmbedding); every other rope_type is refused at start.
SUPPORTED_ROPE_TYPES = ("default", "llama3")
_PREFIX = "dpe (additional_config['dpe'])"


@dataclass(frozen=True)
class DPEOptions:
    """The parsed ``dpe`` dict (validated without the model)."""

    preset: Optional[str] = None
    config_path: Optional[str] = None
    target_length: Optional[int] = None
    train_length: Optional[int] = None
    window: int = 1024
    file_config: Optional[DPEConfig] = None  # loaded from config_path

    def key(self) -> str:
        return json.dumps({"preset": self.preset, "config": self.config_path, "target": self.target_length,
                           "train": self.train_length, "window": self.window}, sort_keys=True)


def _err(msg: str) -> ValueError:
    return ValueError(f"{_PREFIX}: {msg}")


def parse_options(raw: Any) -> DPEOptions:
    """Validate the ``dpe`` value; ValueError / TypeError naming the bad key otherwise."""
    if not isinstance(raw, dict):
        raise TypeError(f"{_PREFIX} must be a JSON object such as {{\"preset\": \"auto\"}}, "
                        f"got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        raise _err(f"unknown key(s) {unknown}; allowed: {list(_KEYS)}")
    has_preset, has_config = raw.get("preset") is not None, raw.get("config") is not None
    if has_preset == has_config:
        raise _err("give exactly one of 'preset' (a name) or 'config' (a DPEConfig JSON file)")
    for k in ("target_length", "train_length", "window"):
        v = raw.get(k)
        if v is not None and (not is_int(v) or v < 1):
            raise _err(f"{k!r} must be a positive int, got {v!r}")
    window = raw.get("window", 1024)
    if has_preset:
        name = raw["preset"]
        if not isinstance(name, str) or name not in preset_names():
            raise _err(f"unknown preset {name!r}; choose one of {preset_names()}")
        return DPEOptions(preset=name, target_length=raw.get("target_length"),
                          train_length=raw.get("train_length"), window=window)
    path = raw["config"]
    if not isinstance(path, (str, os.PathLike)):
        raise _err(f"'config' must be a path to a DPEConfig JSON file, got {type(path).__name__}")
    p = Path(path).expanduser()
    if not p.is_file():
        raise _err(f"config file {str(path)!r} does not exist")
    try:
        cfg = DPEConfig.from_json(p)
    except (ValueError, TypeError) as e:
        raise _err(f"config file {str(path)!r} is not a valid DPEConfig: {e}") from None
    if raw.get("window") is not None:
        raise _err("'window' applies to presets; a config file carries its own window")
    return DPEOptions(config_path=str(p), target_length=raw.get("target_length"),
                      train_length=raw.get("train_length"), window=cfg.window, file_config=cfg)


def options_from_vllm_config(vllm_config) -> Optional[DPEOptions]:
    """The parsed options, or None when ``additional_config`` has no ``dpe`` key (plugin inert)."""
    extra = getattr(vllm_config, "additional_config", None)
    if not isinstance(extra, dict) or DPE_KEY not in extra:
        return None
    return parse_options(extra[DPE_KEY])


# --------------------------------------------------------------------------- model facts
def _rope_parameters(hf_cfg) -> dict:
    for attr in ("rope_parameters", "rope_scaling"):
        rp = getattr(hf_cfg, attr, None)
        if isinstance(rp, dict):
            return rp
    return {}


def _disk_train_length(model_path: str) -> Optional[int]:
    """The pre-training length from ``config.json`` on disk (before ``hf_overrides``)."""
    p = Path(model_path) / "config.json"
    if not p.is_file():
        return None
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    d = d.get("text_config", d)
    for attr in ("rope_parameters", "rope_scaling"):
        rp = d.get(attr)
        if isinstance(rp, dict) and rp.get("original_max_position_embeddings"):
            return int(rp["original_max_position_embeddings"])
    v = d.get("max_position_embeddings")
    return int(v) if v else None


@dataclass(frozen=True)
class EngineSettings:
    """What every DPE layer of one engine shares (model facts + options)."""

    options: DPEOptions
    num_layers: int
    num_heads: int  # H_q of the whole model (all ranks)
    num_kv_heads: int  # H_k of the whole model
    head_size: int
    max_model_len: int
    train_length: int
    target_length: int

    @property
    def per_query_head_mask(self) -> bool:
        """True when the scaled keys have H_q heads (a per-query-head mask with GQA)."""
        cfg = self.options.file_config
        if cfg is None and self.options.preset is not None:
            cfg = _calibrated_or_none(self.options.preset)
        return (cfg is not None and cfg.mask is not None and cfg.mask.shape[1] == self.num_heads
                and self.num_heads != self.num_kv_heads)

    def dpe_config(self, inv_freq: torch.Tensor) -> DPEConfig:
        """The DPEConfig for the model's frequencies ``inv_freq`` (float32 ``[P]``), checked
        against the model's pairs, layers and heads."""
        o = self.options
        p = int(inv_freq.shape[0])
        if o.file_config is not None:
            cfg = o.file_config
            cfg.check_length(self.max_model_len, name=f"the DPE config {o.config_path}", stacklevel=3)
        else:
            try:
                cfg = DPEConfig.from_preset(o.preset, inv_freq=inv_freq.float().cpu(),
                                            train_length=self.train_length,
                                            target_length=self.target_length, window=o.window)
            except ValueError as e:
                raise _err(str(e)) from None
            if self.target_length < self.max_model_len:  # from_preset checked target_length
                cfg.check_length(self.max_model_len, name=f"preset {o.preset!r}", stacklevel=3)
        if cfg.num_pairs != p:
            raise _err(f"the config covers {cfg.num_pairs} rotary pairs, the model rotates {p} "
                       f"(rotary_dim {2 * p})")
        if cfg.mask is not None:
            m = cfg.mask
            if m.shape[0] != self.num_layers or m.shape[1] not in (self.num_heads, self.num_kv_heads):
                raise _err(f"the mask must be [num_layers={self.num_layers}, H_q={self.num_heads} or "
                           f"H_k={self.num_kv_heads}, P={p}] for this model, got {list(m.shape)}")
        return cfg


def _calibrated_or_none(name: str) -> Optional[DPEConfig]:
    from ...config import calibrated_presets

    path = calibrated_presets().get(name)
    return DPEConfig.from_json(path) if path is not None else None


def check_engine(vllm_config, options: DPEOptions) -> EngineSettings:
    """Refuse, by option name, what the DPE attention path cannot serve; return the settings."""
    model_config = vllm_config.model_config
    if model_config is None:
        raise _err("no model_config in the vLLM config")
    hf = model_config.hf_text_config
    # Features DPE cannot combine with.
    if vllm_config.speculative_config is not None:
        raise _err("speculative decoding (speculative_config) is not supported with DPE; remove it")
    cache_dtype = str(vllm_config.cache_config.cache_dtype)
    if cache_dtype not in ("auto", "float32", "float16", "bfloat16"):
        raise _err(f"kv_cache_dtype={cache_dtype!r} is not supported with DPE (quantized KV cache); "
                   "use kv_cache_dtype='auto'")
    sliding = getattr(hf, "sliding_window", None)
    if (sliding is not None and getattr(hf, "use_sliding_window", True)) or \
            getattr(hf, "layer_types", None) and any(t != "full_attention" for t in hf.layer_types):
        raise _err(f"sliding-window attention models are not supported (sliding_window={sliding!r}, "
                   f"layer_types={getattr(hf, 'layer_types', None)!r})")
    for cap in ("attn_logit_softcapping", "logit_softcapping"):
        if getattr(hf, cap, None):
            raise _err(f"soft-capped attention ({cap}={getattr(hf, cap)}) is not supported")
    pc = vllm_config.parallel_config
    for name in ("decode_context_parallel_size", "prefill_context_parallel_size"):
        if getattr(pc, name, 1) > 1:
            raise _err(f"{name}={getattr(pc, name)} (context parallelism) is not supported")
    passes = vllm_config.compilation_config.pass_config
    for name in ("fuse_rope_kvcache", "fuse_qk_norm_rope_kvcache", "fuse_rope_kvcache_cat_mla"):
        if getattr(passes, name, False):
            raise _err(f"compilation_config.pass_config.{name}=True fuses vLLM's rotary with its KV-cache "
                       "write, which DPE replaces; set it to False")
    rp = _rope_parameters(hf)
    rope_type = rp.get("rope_type", rp.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES or "mrope_section" in rp:
        raise _err(f"rope_type={rope_type!r} is not supported (supported: {list(SUPPORTED_ROPE_TYPES)}, "
                   "no M-RoPE)")
    if getattr(hf, "dual_chunk_attention_config", None):
        raise _err("dual_chunk_attention_config models are not supported")
    # Lengths.
    max_len = int(model_config.max_model_len)
    train = options.train_length or _disk_train_length(model_config.model) or \
        int(getattr(hf, "max_position_embeddings", 0) or 0)
    if not train:
        raise _err("the model's pre-training length is unknown; give 'train_length'")
    target = options.target_length or max_len
    if target > max_len:
        raise _err(f"target_length={target} exceeds the engine's max_model_len={max_len}: raise the model's "
                   f"limit with hf_overrides={{'max_position_embeddings': {target}}} "
                   f"(--hf-overrides '{{\"max_position_embeddings\": {target}}}') and max_model_len")
    settings = EngineSettings(
        options=options, num_layers=int(hf.num_hidden_layers),
        num_heads=int(hf.num_attention_heads),
        num_kv_heads=int(getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads),
        head_size=int(model_config.get_head_size()), max_model_len=max_len, train_length=int(train),
        target_length=int(target))
    # A file config / calibrated preset is checked against layers and heads now (pairs need the
    # rotary, checked when the first layer resolves its config).
    cfg = options.file_config or (_calibrated_or_none(options.preset) if options.preset else None)
    if cfg is not None and cfg.mask is not None:
        m = cfg.mask
        if m.shape[0] != settings.num_layers or m.shape[1] not in (settings.num_heads, settings.num_kv_heads):
            raise _err(f"the mask must be [num_layers={settings.num_layers}, H_q={settings.num_heads} or "
                       f"H_k={settings.num_kv_heads}, P] for this model, got {list(m.shape)}")
    if cfg is not None and 2 * cfg.num_pairs > settings.head_size:
        raise _err(f"the config covers {cfg.num_pairs} rotary pairs, more than head_size "
                   f"{settings.head_size} holds")
    return settings


# One engine configuration per process: settings cached by the VllmConfig object.
_CACHE: Dict[int, Tuple[Any, Optional[EngineSettings]]] = {}


def engine_settings(vllm_config) -> Optional[EngineSettings]:
    """The checked settings of ``vllm_config`` (cached), or None when DPE is not configured."""
    if vllm_config is None:
        return None
    hit = _CACHE.get(id(vllm_config))
    if hit is not None and hit[0] is vllm_config:
        return hit[1]
    options = options_from_vllm_config(vllm_config)
    settings = None if options is None else check_engine(vllm_config, options)
    _CACHE[id(vllm_config)] = (vllm_config, settings)
    return settings


# The attention backend DPE layers must reach (the package registers both paths).
BACKEND_NAME = "DPE"
CPU_BACKEND_PATH = "dpe_kernels.integrations.vllm.CPUAttentionBackendSelected"


def check_selection(vllm_config) -> None:
    """With DPE configured, the layers must reach the DPE backend: on the CPU through the
    ``CPU_ATTN`` override, elsewhere through ``attention_backend="DPE"``. ValueError otherwise
    (the identity rotary would hand unrotated keys to another backend)."""
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    if current_platform.is_cpu():
        path = AttentionBackendEnum.CPU_ATTN.get_path()
        if path != CPU_BACKEND_PATH:
            raise ValueError(f"dpe: the CPU_ATTN attention backend is overridden by another plugin ({path}); "
                             "DPE cannot select its backend")
        return
    backend = vllm_config.attention_config.backend
    if backend is None or getattr(backend, "name", str(backend)) != BACKEND_NAME:
        raise ValueError(f"dpe: on {current_platform.device_name} select the DPE attention backend "
                         f"(attention_config={{'backend': '{BACKEND_NAME}'}} / --attention-backend "
                         f"{BACKEND_NAME}); got {backend!r}")
