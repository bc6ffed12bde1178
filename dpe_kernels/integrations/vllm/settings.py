"""The ``dpe`` switch: parsing, engine-start checks, and the resolved
:class:`~dpe_kernels.DPEConfig` for the served model.

Where the switch comes from (:func:`dpe_request`): ``additional_config["dpe"]`` when the engine
has that key (``None`` there turns DPE off), else a ``"dpe"`` block in the model's own
``config.json`` (written by ``dpe export-hf --dpe`` / ``dpe detect --ship-to``; vLLM pickles the
model's config to every process, so no file path has to exist on the workers).

    additional_config={"dpe": {"preset": "smollm2-135m"}}                 # shipped calibrated preset
    additional_config={"dpe": {"config": "cfg.json"}}                     # DPEConfig JSON (with its mask)
    additional_config={"dpe": {"config": {"window": 1024, ...}}}          # the same, inline
    additional_config={"dpe": {"preset": "auto", "target_length": 16384}} # starting scales for 16K

Keys (any other key is refused):

* ``preset`` or ``config`` (exactly one): a :meth:`DPEConfig.from_preset` name, or a DPEConfig
  as a JSON file path or an inline dict (:meth:`DPEConfig.to_dict`);
* ``target_length``: the length ``auto`` / ``uniform`` are configured for (default: the engine's
  ``max_model_len``); it must not exceed ``max_model_len``, which is the model's
  ``max_position_embeddings`` unless ``hf_overrides`` raises it;
* ``train_length``: the pre-training length (default: the model's own configuration before
  ``hf_overrides``, read through ``transformers`` (local directory or hub id; the offline cache and
  ``HF_HUB_OFFLINE`` respected) by the package's one rule,
  :func:`dpe_kernels.integrations.lengths.pretraining_length`);
* ``window``: the window of ``auto`` / ``uniform`` / paper presets (default 1024);
* ``by_length``: ``true`` chooses each request's configuration from its own length
  (:mod:`.requests`);
* ``backend``: the attention kernels' backend (``auto``: the compiled CPU kernels on the CPU,
  Triton on CUDA; ``triton`` on the CPU runs them under ``TRITON_INTERPRET=1``, for tests).

Refused at start, each by the option that asks for it: speculative decoding, KV connectors
(``kv_transfer_config``), a quantized KV cache or a ``kv_cache_dtype`` other than the model's
dtype, devices other than CPU and CUDA, hybrid / attention-free models, sliding-window and
soft-capped attention, context parallelism, rope fusion passes, rope types other than default /
llama3, and architectures outside :data:`SUPPORTED_ARCHITECTURES` (the ones whose rotary runs
through ``rotary_emb.forward``, which the plugin replaces).

Everything here reads only configuration (no tensor); :func:`engine_settings` is what the plugin
calls in every engine process, once per ``VllmConfig``.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from ...config import DPEConfig, preset_names
from ...utils import is_int

__all__ = ["DPE_KEY", "DPEOptions", "EngineSettings", "parse_options", "options_from_vllm_config",
           "dpe_request", "engine_settings", "check_engine", "resolve_train_length", "SUPPORTED_ROPE_TYPES",
           "SUPPORTED_ARCHITECTURES", "SUPPORTED_DEVICES"]

DPE_KEY = "dpe"
_KEYS = ("preset", "config", "target_length", "train_length", "window", "by_length", "backend")
# Rotary schemes whose frequencies the plugin's identity rotary reproduces (vLLM's
# RotaryEmbedding / Llama3RotaryEmbedding); every other rope_type is refused at start.
SUPPORTED_ROPE_TYPES = ("default", "llama3")
# Architectures whose attention rotates q / k only through ``self.rotary_emb(positions, q, k)``
# (vLLM's get_rope object, which the plugin replaces); LlamaForCausalLM is tested end to end.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_DEVICES = ("cpu", "cuda")
_PREFIX = "dpe"
logger = logging.getLogger("vllm.dpe_kernels")


@dataclass(frozen=True)
class DPEOptions:
    """The parsed ``dpe`` dict (validated without the model)."""

    preset: Optional[str] = None
    config_path: Optional[str] = None
    target_length: Optional[int] = None
    train_length: Optional[int] = None
    window: int = 1024
    file_config: Optional[DPEConfig] = None  # loaded from config_path
    by_length: bool = False  # per request: plain within the pre-training length, else preset auto for its length
    backend: str = "auto"  # the attention kernels: dpe_paged_attention_rotary's backend=

    def key(self) -> str:
        cfg = self.config_path
        if cfg is None and self.file_config is not None:
            cfg = self.file_config.to_dict()
        return json.dumps({"preset": self.preset, "config": cfg, "target": self.target_length,
                           "train": self.train_length, "window": self.window, "by_length": self.by_length, "backend": self.backend},
                          sort_keys=True)


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
    backend = raw.get("backend", "auto")
    from ...backends import PAGED_BACKENDS

    if backend not in PAGED_BACKENDS:
        raise _err(f"'backend' must be one of {list(PAGED_BACKENDS)}, got {backend!r}")
    by_length = raw.get("by_length", False)
    if not isinstance(by_length, bool):
        raise TypeError(f"{_PREFIX}: 'by_length' must be true or false, got {type(by_length).__name__}")
    if by_length:
        if raw.get("config") is not None or raw.get("preset") not in (None, "auto") or raw.get("target_length"):
            raise _err("'by_length' chooses each request's configuration from its own length (preset 'auto'); "
                       "it takes no 'config', other 'preset' or 'target_length'")
        raw = {**raw, "preset": "auto"}
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
                          train_length=raw.get("train_length"), window=window, by_length=by_length,
                          backend=backend)
    src = raw["config"]
    if isinstance(src, dict):  # inline DPEConfig (DPEConfig.to_dict): no file on any worker
        try:
            cfg = DPEConfig.from_dict(src)
        except (ValueError, TypeError, KeyError) as e:
            raise _err(f"the inline 'config' is not a valid DPEConfig: {e}") from None
        path = None
    elif isinstance(src, (str, os.PathLike)):
        p = Path(src).expanduser()
        if not p.is_file():
            raise _err(f"config file {str(src)!r} does not exist")
        try:
            cfg = DPEConfig.from_json(p)
        except (ValueError, TypeError) as e:
            raise _err(f"config file {str(src)!r} is not a valid DPEConfig: {e}") from None
        path = str(p)
    else:
        raise _err(f"'config' must be a DPEConfig JSON file path or an inline DPEConfig dict, "
                   f"got {type(src).__name__}")
    if raw.get("window") is not None:
        raise _err("'window' applies to presets; a config carries its own window")
    return DPEOptions(config_path=path, target_length=raw.get("target_length"),
                      train_length=raw.get("train_length"), window=cfg.window, file_config=cfg, backend=backend)


def _model_dpe_block(vllm_config):
    mc = getattr(vllm_config, "model_config", None)
    hf = getattr(mc, "hf_config", None) if mc is not None else None
    if hf is None:
        return None
    block = getattr(hf, DPE_KEY, None)
    if block is None:
        block = getattr(getattr(hf, "text_config", None), DPE_KEY, None)
    return block


def dpe_request(vllm_config) -> Optional[Tuple[Any, str]]:
    """``(raw dpe value, where it came from)``, or None when the engine is not asked for DPE.
    ``additional_config["dpe"]`` wins over the model's ``config.json`` block (``None`` there
    turns DPE off)."""
    extra = getattr(vllm_config, "additional_config", None)
    if isinstance(extra, dict) and DPE_KEY in extra:
        return None if extra[DPE_KEY] is None else (extra[DPE_KEY], "additional_config['dpe']")
    block = _model_dpe_block(vllm_config)
    if block is None:
        return None
    if isinstance(block, dict):  # train_length there is the model's (read by the length rule)
        block = {k: v for k, v in block.items() if k != "train_length"}
    return block, "the model's config.json 'dpe' block"


def options_from_vllm_config(vllm_config) -> Optional[DPEOptions]:
    """The parsed options, or None when the engine is not asked for DPE (plugin inert)."""
    req = dpe_request(vllm_config)
    if req is None:
        return None
    raw, where = req
    try:
        return parse_options(raw)
    except (ValueError, TypeError) as e:
        raise type(e)(f"{e} (from {where})") from None


# --------------------------------------------------------------------------- model facts
def _rope_parameters(hf_cfg) -> dict:
    from ..lengths import rope_parameters_of

    return rope_parameters_of(hf_cfg)


def _original_config_dict(model_config) -> Tuple[Optional[dict], str]:
    """The model's own ``config.json`` as a dict, before vLLM's ``hf_overrides`` (through
    ``transformers``' config loading: a local directory, or a hub id from the cache / the hub;
    ``HF_HUB_OFFLINE`` respected), with where it came from; ``(None, why)`` if it cannot be read."""
    src = getattr(model_config, "hf_config_path", None) or getattr(model_config, "model", None)
    if not src:
        return None, "the model has no path"
    try:
        from transformers import PretrainedConfig

        kw = {}
        rev = getattr(model_config, "_hf_config_revision", None) or getattr(model_config, "revision", None)
        if rev:
            kw["revision"] = rev
        token = getattr(model_config, "hf_token", None)
        if isinstance(token, str):
            kw["token"] = token
        d, _ = PretrainedConfig.get_config_dict(str(src), **kw)
    except Exception as e:  # noqa: BLE001 - any loader failure means "not readable": say why
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return (d, f"{src} config.json") if isinstance(d, dict) else (None, "not a JSON object")


def _overrides_touch_length(model_config) -> bool:
    ov = getattr(model_config, "hf_overrides", None)
    if callable(ov):
        return True  # cannot tell what a function changes
    if not isinstance(ov, dict):
        return False
    keys = {"max_position_embeddings", "rope_parameters", "rope_scaling", "text_config", DPE_KEY}
    return bool(keys & set(ov))


def resolve_train_length(model_config, options: "DPEOptions") -> Tuple[int, str]:
    """``(pre-training length, where it came from)`` by :func:`~dpe_kernels.integrations.lengths.
    pretraining_length` on the model's own configuration; ValueError naming ``train_length`` when
    it cannot be known (the overridden config would give the target itself)."""
    from ..lengths import pretraining_length

    if options.train_length:
        return int(options.train_length), "dpe.train_length option"
    raw, where = _original_config_dict(model_config)
    if raw is not None:
        n, field_ = pretraining_length(raw)
        if n:
            return n, f"{field_} of {where}"
    if not _overrides_touch_length(model_config):  # the loaded config IS the model's own
        n, field_ = pretraining_length(model_config.hf_config)
        if n:
            return n, f"{field_} of the model's config (as loaded by vLLM)"
    raise _err(f"the model's pre-training length is unknown (its own config could not be read: {where}; "
               "hf_overrides change its lengths): give 'train_length'")


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
    train_source: str = "?"
    target_source: str = "?"

    def within_pretraining_warning(self) -> Optional[str]:
        """The warning for a target length within the pre-training length (None when beyond)."""
        if self.target_length > self.train_length:
            return None
        cfg = self.options.file_config or (_calibrated_or_none(self.options.preset) if self.options.preset else None)
        window = cfg.window if cfg is not None else self.options.window
        return (f"dpe: the target length {self.target_length} ({self.target_source}) is within the model's "
                f"pre-training length {self.train_length} ({self.train_source}): no extension is needed, yet "
                f"DPE still changes the attention of every request longer than its window ({window} tokens)")

    def summary(self, cfg: DPEConfig) -> str:
        """The start-up log line of an engine serving ``cfg`` by default."""
        mask = "none" if cfg.mask is None else ("per-query-head" if cfg.mask.shape[1] == self.num_heads
                                                and self.num_heads != self.num_kv_heads else "per-KV-head")
        default = ("by length: plain RoPE up to the pre-training length, else preset 'auto' for the request's "
                   "prompt + max_tokens" if self.options.by_length else
                   f"window {cfg.window}, scales {[float(x) for x in cfg.scales]} over pair groups "
                   f"{list(cfg.group_boundaries)}, mask {mask}")
        return (f"DPE: pre-training length {self.train_length} (from {self.train_source}), target "
                f"{self.target_length} (from {self.target_source}), max_model_len {self.max_model_len}, "
                f"extension x{self.target_length / self.train_length:.2f}, default {default}; per request: "
                "SamplingParams.extra_args['dpe']; KV cache: vLLM's own layout and size (keys cached unrotated, "
                "rotated as attention loads them), 1.00x plain")

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


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_engine(vllm_config, options: DPEOptions) -> EngineSettings:
    """Refuse, by option name, what the DPE attention path cannot serve; return the settings."""
    model_config = vllm_config.model_config
    if model_config is None:
        raise _err("no model_config in the vLLM config")
    hf = model_config.hf_text_config
    # Features DPE cannot combine with.
    if getattr(vllm_config, "speculative_config", None) is not None:
        raise _err("speculative decoding (speculative_config) is not supported with DPE; remove it")
    if getattr(vllm_config, "kv_transfer_config", None) is not None:
        raise _err("KV connectors / disaggregated prefill / KV offloading (kv_transfer_config="
                   f"{getattr(vllm_config.kv_transfer_config, 'kv_connector', None)!r}) are not supported with "
                   "DPE: they move pages in the layout of vLLM's own attention backends, which DPE's backend "
                   "has not been tested against; remove kv_transfer_config (and kv_offloading_size)")
    device = str(getattr(getattr(vllm_config, "device_config", None), "device_type", "") or "")
    if device not in SUPPORTED_DEVICES:
        raise _err(f"device {device!r} (device_config.device_type) is not supported; DPE runs on "
                   f"{list(SUPPORTED_DEVICES)}")
    model_dtype = _dtype_name(getattr(model_config, "dtype", ""))
    cache_dtype = str(vllm_config.cache_config.cache_dtype)
    if cache_dtype not in ("auto", model_dtype):
        raise _err(f"kv_cache_dtype={cache_dtype!r} is not supported with DPE (the model runs in "
                   f"{model_dtype}; DPE's cache holds the model's dtype); use kv_cache_dtype='auto'")
    archs = list(getattr(model_config, "architectures", None) or getattr(hf, "architectures", None) or [])
    bad = [a for a in archs if a not in SUPPORTED_ARCHITECTURES] or ([] if archs else ["<none>"])
    if bad:
        raise _err(f"architecture {bad} (the model's config.json 'architectures') is not supported: DPE "
                   f"replaces the rotary of {list(SUPPORTED_ARCHITECTURES)}, whose attention rotates q/k only "
                   "through rotary_emb")
    for flag in ("is_hybrid", "is_attention_free"):
        try:
            on = bool(getattr(model_config, flag, False))
        except Exception:  # noqa: BLE001 - a property that needs the model registry
            on = False
        if on:
            raise _err(f"hybrid / attention-free models (model_config.{flag}) are not supported with DPE")
    sliding = getattr(hf, "sliding_window", None)
    if (sliding is not None and getattr(hf, "use_sliding_window", True)) or \
            getattr(hf, "layer_types", None) and any(t != "full_attention" for t in hf.layer_types):
        raise _err(f"sliding-window / non-attention layers are not supported (sliding_window={sliding!r}, "
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
    train, train_src = resolve_train_length(model_config, options)
    target = options.target_length or max_len
    target_src = "dpe.target_length" if options.target_length else "max_model_len"
    if target > max_len:
        raise _err(f"target_length={target} exceeds the engine's max_model_len={max_len}: raise the model's "
                   f"limit with hf_overrides={{'max_position_embeddings': {target}}} "
                   f"(--hf-overrides '{{\"max_position_embeddings\": {target}}}') and max_model_len")
    settings = EngineSettings(
        options=options, num_layers=int(hf.num_hidden_layers),
        num_heads=int(hf.num_attention_heads),
        num_kv_heads=int(getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads),
        head_size=int(model_config.get_head_size()), max_model_len=max_len, train_length=int(train),
        target_length=int(target), train_source=train_src, target_source=target_src)
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
