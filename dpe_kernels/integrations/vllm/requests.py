"""DPE chosen per request: ``SamplingParams(extra_args={"dpe": ...})`` and the by-length mode.

The value of ``extra_args["dpe"]`` (the OpenAI server: ``"vllm_xargs": {"dpe": ...}`` in the request
body, or ``extra_args``):

* ``"off"``: plain RoPE for this request;
* a preset name (``"auto"``, ``"smollm2-135m"``, ...), or a dict with the engine option keys
  ``preset`` / ``config`` (an inline DPEConfig dict) / ``target_length`` / ``window`` (not
  ``train_length``: that is the model's);
* absent: the engine's default (``additional_config["dpe"]``), or with the engine option
  ``"by_length": true`` plain RoPE when the prompt plus ``max_tokens`` fits in the pre-training
  length and the starting scales (preset ``auto``) for that length otherwise.

How it travels: the plugin adds :class:`DPERequestConfigs` to a DPE engine's logits processors
(and to no other engine's). vLLM calls its ``validate_params`` in the front end for every request,
so a bad value fails that request alone (the OpenAI server answers 400) before anything reaches the
engine; in the worker its ``update_state`` sees each request join, leave and move within the
persistent batch, so it knows every row's configuration in the order vLLM builds the attention
metadata. It never changes a logit (``apply`` returns them unchanged, ``is_argmax_invariant``).

Prefix caching: the cache holds unrotated keys, but only layer 0's keys and values are the same
under every configuration; a deeper layer's depend on the attention of the layers before it, which
the configuration changes for every token past the window. So a cached prefix is reused only by
requests of the same configuration: :func:`cache_salt` gives every non-default configuration its
own salt of vLLM's block hashes (added to the request's own ``cache_salt``, if any), in the front
end, before the request reaches the scheduler.
"""
from __future__ import annotations

import threading
from typing import Any, Dict, Hashable, List, Optional, Tuple

import torch

from ...config import DPEConfig, preset_names
from ...utils import is_int
from .settings import DPE_KEY, EngineSettings, parse_options

__all__ = ["DPERequestConfigs", "REQUEST_PROCESSOR_PATH", "request_key", "check_request", "ConfigTable",
           "row_keys", "DEFAULT", "OFF", "cache_salt"]

REQUEST_PROCESSOR_PATH = "dpe_kernels.integrations.vllm.requests:DPERequestConfigs"
DEFAULT: Tuple = ("default",)
OFF: Tuple = ("off",)
_REQUEST_KEYS = ("preset", "config", "target_length", "window")  # not by_length / backend: engine-wide

# The front end's engine settings (set by the plugin when it configures a DPE engine): what
# validate_params checks a request against.
_FRONT: Dict[str, Optional[EngineSettings]] = {"settings": None}
# Worker side: the live processor of each engine in this process, by id(vllm_config).
_LIVE: Dict[int, "DPERequestConfigs"] = {}
_LOCK = threading.Lock()


def set_front_settings(settings: Optional[EngineSettings]) -> None:
    _FRONT["settings"] = settings


def _err(field: str, msg: str) -> ValueError:
    return ValueError(f"extra_args['dpe']{field}: {msg}")


def check_request(raw: Any, settings: Optional[EngineSettings]) -> Tuple:
    """The hashable key of a request's ``extra_args["dpe"]`` value; ValueError / TypeError naming
    the field when it is not one this engine can serve."""
    if isinstance(raw, str):
        if raw == "off":
            return OFF
        raw = {"preset": raw}
    if not isinstance(raw, dict):
        raise TypeError(f"extra_args['dpe'] must be \"off\", a preset name or an object such as "
                        f"{{\"preset\": \"auto\"}}, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_REQUEST_KEYS))
    if unknown:
        raise _err("", f"unknown key(s) {unknown}; allowed per request: {list(_REQUEST_KEYS)}")
    for k in ("target_length", "window"):
        v = raw.get(k)
        if v is not None and (not is_int(v) or v < 1):
            raise _err(f"['{k}']", f"must be a positive int, got {v!r}")
    if raw.get("preset") is not None and not isinstance(raw["preset"], str):
        raise _err("['preset']", f"must be a preset name (a string), got {type(raw['preset']).__name__}")
    if raw.get("preset") is not None and raw["preset"] not in preset_names():
        raise _err("['preset']", f"unknown preset {raw['preset']!r}; choose one of {preset_names()}")
    if raw.get("config") is not None and not isinstance(raw["config"], dict):
        raise _err("['config']", "must be an inline DPEConfig object (no file paths per request)")
    try:
        options = parse_options(dict(raw))
    except (ValueError, TypeError) as e:
        raise type(e)(f"extra_args['dpe']: {str(e).removeprefix('dpe: ')}") from None
    if settings is not None:
        target = options.target_length
        if target is not None and target > settings.max_model_len:
            raise _err("['target_length']", f"{target} exceeds the engine's max_model_len {settings.max_model_len}")
        cfg = options.file_config
        if cfg is not None:
            if 2 * cfg.num_pairs > settings.head_size:
                raise _err("['config']", f"covers {cfg.num_pairs} rotary pairs, more than head_size "
                                         f"{settings.head_size} holds")
            if cfg.mask is not None and (cfg.mask.shape[0] != settings.num_layers
                                         or cfg.mask.shape[1] not in (settings.num_heads, settings.num_kv_heads)):
                raise _err("['config']['mask']", f"must be [num_layers={settings.num_layers}, H_q="
                                                 f"{settings.num_heads} or H_k={settings.num_kv_heads}, P], got "
                                                 f"{list(cfg.mask.shape)}")
    return ("options", options.key(), options)


def request_key(params, prompt_len: int, settings: EngineSettings) -> Tuple:
    """The configuration key of one request (validated in the front end already)."""
    extra = getattr(params, "extra_args", None) or {}
    if DPE_KEY in extra and extra[DPE_KEY] is not None:
        return check_request(extra[DPE_KEY], settings)
    if settings.options.by_length:
        max_tokens = getattr(params, "max_tokens", None) or 0
        length = min(int(prompt_len) + int(max_tokens), settings.max_model_len)
        return OFF if length <= settings.train_length else ("length", length)
    return DEFAULT


def cache_salt(key: Tuple) -> Optional[str]:
    """The prefix-cache salt of a request's configuration key (None: the engine default, which
    keeps vLLM's own hashes). Keys of different configurations never share a salt; requests
    with equal keys share cached prefixes."""
    if key[0] == "default":
        return None
    if key[0] == "options":
        return "dpe:" + key[1]
    return "dpe:" + ":".join(str(x) for x in key)


try:
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality
except ImportError:  # vLLM absent: the module still imports for the checks above
    LogitsProcessor = object  # type: ignore[assignment,misc]
    BatchUpdate = MoveDirectionality = None  # type: ignore[assignment,misc]


class DPERequestConfigs(LogitsProcessor):  # type: ignore[misc,valid-type]
    """Carries each request's DPE configuration to the attention backend (changes no logit)."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        extra = getattr(sampling_params, "extra_args", None) or {}
        if DPE_KEY in extra and extra[DPE_KEY] is not None:
            try:
                check_request(extra[DPE_KEY], _FRONT["settings"])
            except TypeError as e:  # vLLM turns ValueError (only) into a validation error: HTTP 400
                raise ValueError(str(e)) from None

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        from .settings import engine_settings

        self.settings = engine_settings(vllm_config)
        self.rows: Dict[int, Tuple] = {}
        with _LOCK:
            _LIVE[id(vllm_config)] = self

    def is_argmax_invariant(self) -> bool:
        return True

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def update_state(self, batch_update) -> None:
        if batch_update is None or self.settings is None:
            return
        for i in batch_update.removed:
            self.rows.pop(i, None)
        for i, params, prompt, _ in batch_update.added:
            self.rows[i] = request_key(params, len(prompt) if prompt is not None else 0, self.settings)
        for a, b, how in batch_update.moved:
            ka, kb = self.rows.pop(a, DEFAULT), self.rows.pop(b, DEFAULT)
            self.rows[b] = ka
            if how == MoveDirectionality.SWAP:
                self.rows[a] = kb


def row_keys(vllm_config, num_reqs: int) -> Optional[List[Tuple]]:
    """Each batch row's configuration key (rows 0 .. num_reqs - 1, the attention metadata's order),
    or None when the engine carries no per-request state (every row the default)."""
    proc = _LIVE.get(id(vllm_config))
    if proc is None:
        return None
    rows = proc.rows
    return [rows.get(i, DEFAULT) for i in range(num_reqs)]


class ConfigTable:
    """The configurations one engine has served, indexed as the kernels take them: ``pair_scale
    [C, P]``, ``window [C]`` and per layer ``mask [C, H_q of this rank, P]`` (or None while no
    configuration has a mask). Index 0 is the engine default, 1 plain RoPE; a new configuration is
    appended the first step a request uses it (equal configurations share one index)."""

    def __init__(self, settings: EngineSettings, inv_freq: torch.Tensor, default: DPEConfig):
        self.settings = settings
        self.inv_freq = inv_freq.float().cpu()
        p = int(inv_freq.shape[0])
        plain = DPEConfig.uniform(1, [1], num_pairs=p)
        self.configs: List[DPEConfig] = []
        self._index: Dict[Hashable, int] = {}
        self._by_content: Dict[Hashable, int] = {}
        self.version = 0
        self._add(DEFAULT, default)
        self._add(OFF, plain)

    @staticmethod
    def _content(cfg: DPEConfig) -> Hashable:
        mask = None if cfg.mask is None else (tuple(cfg.mask.shape), tuple(cfg.mask.flatten().tolist()))
        return (cfg.window, cfg.group_boundaries, cfg.scales, mask)

    def _add(self, key: Hashable, cfg: DPEConfig) -> int:
        c = self._content(cfg)
        i = self._by_content.get(c)
        if i is None:
            i = len(self.configs)
            self.configs.append(cfg)
            self._by_content[c] = i
            self.version += 1
        self._index[key] = i
        return i

    def index(self, key: Tuple) -> int:
        i = self._index.get(key[:2])
        if i is not None:
            return i
        return self._add(key[:2], self._resolve(key))

    def _resolve(self, key: Tuple) -> DPEConfig:
        s = self.settings
        if key[0] == "length":
            return DPEConfig.from_preset("auto", inv_freq=self.inv_freq, train_length=s.train_length,
                                         target_length=key[1], window=s.options.window)
        options = key[2]
        if options.file_config is not None:
            cfg = options.file_config
        else:
            target = options.target_length or s.target_length
            cfg = DPEConfig.from_preset(options.preset, inv_freq=self.inv_freq, train_length=s.train_length,
                                        target_length=target, window=options.window)
        if cfg.num_pairs != self.inv_freq.shape[0]:  # validated in the front end against head_size
            raise ValueError(f"dpe: a request's config covers {cfg.num_pairs} pairs, the model rotates "
                             f"{self.inv_freq.shape[0]}")
        return cfg

    def pair_scale(self, device) -> torch.Tensor:
        return torch.stack([c.pair_scales() for c in self.configs]).to(device)

    def window(self, device) -> torch.Tensor:
        return torch.tensor([c.window for c in self.configs], dtype=torch.int64, device=device)

    def layer_mask(self, layer: int, q_slice: slice, device) -> Optional[torch.Tensor]:
        """``[C, H_q of this rank, P]`` bool, per query head (a per-KV-head mask expanded)."""
        if all(c.mask is None for c in self.configs):
            return None
        s = self.settings
        n_rep = s.num_heads // s.num_kv_heads
        rows = []
        for c in self.configs:
            p = c.num_pairs
            if c.mask is None:
                full = torch.ones(s.num_heads, p, dtype=torch.bool)
            else:
                m = c.layer_mask(layer)
                full = m if m.shape[0] == s.num_heads else m.repeat_interleave(n_rep, 0)
            rows.append(full[q_slice])
        return torch.stack(rows).to(device)
