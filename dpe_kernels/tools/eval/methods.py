"""The methods compared by the evaluation and their parameters at a given length.

The extension factor at an evaluated length ``L`` is ``f = max(1, target / T)`` with ``T`` the
model's pre-training length and ``target = L`` (default: every length gets the factor it needs)
or a fixed ``--target-length``.

    rope         plain RoPE (the unpatched model)
    pi           position interpolation, factor f
    ntk          NTK-aware base scaling, factor f
    yarn         YaRN (HF formulas, beta_fast 32, beta_slow 1, original length T), factor f
    self_extend  Self-Extend: window 1024, one group of scale G = 2 * ceil(f)
    dpe          DPE, window 1024, 8 equal groups, per-group scales from ``DPEConfig.from_preset``
                 (or a preset / JSON config), no key-dimension mask unless the config has one

DPE's starting configuration (preset ``auto``) is :func:`dpe_kernels.config.starting_scales`.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from ...config import (PAPER_PRESETS, WINDOW, DPEConfig, PresetLengthWarning, calibrated_presets,
                       extension_factor, preset_names, starting_scales, uniform_scale)

__all__ = ["METHODS", "DPE_PRESETS", "CALIBRATED_PRESETS", "preset_names", "load_preset", "extension_factor", "dpe_auto_scales", "dpe_config_for",
           "method_kwargs", "apply", "describe"]

METHODS = ("rope", "pi", "ntk", "yarn", "self_extend", "dpe")
# The presets and the starting scales live with DPEConfig (dpe_kernels.config); these names
# are the evaluation's view of them.
DPE_PRESETS = PAPER_PRESETS
CALIBRATED_PRESETS = tuple(calibrated_presets())
dpe_auto_scales = starting_scales


def load_preset(name: str) -> DPEConfig:
    """A shipped calibrated preset as a :class:`DPEConfig` (with its mask)."""
    found = calibrated_presets()
    if name not in found:
        raise ValueError(f"unknown calibrated preset {name!r}; shipped: {sorted(found)}")
    return DPEConfig.from_preset(name)


def model_inv_freq(model) -> torch.Tensor:
    from ...integrations.hf import find_rotary_embedding

    _, rotary = find_rotary_embedding(model)
    return rotary.inv_freq.detach().float().cpu()


def dpe_config_for(model, length: int, train_len: int, *, target_length: Optional[int] = None,
                   preset: str = "auto", config: Optional[DPEConfig] = None, window: int = WINDOW) -> DPEConfig:
    """The DPE configuration used at ``length``: ``config`` when given, else ``preset``
    (:meth:`DPEConfig.from_preset`) for the target ``target_length or length``."""
    if config is not None:
        return config
    with warnings.catch_warnings():  # method_kwargs warns once, for the length the config is applied at
        warnings.simplefilter("ignore", PresetLengthWarning)
        return DPEConfig.from_preset(preset, inv_freq=model_inv_freq(model), train_length=int(train_len),
                                     target_length=int(target_length or length), window=window)


def method_kwargs(model, name: str, length: int, train_len: int, *, target_length: Optional[int] = None,
                  dpe_preset: str = "auto", dpe_config: Optional[DPEConfig] = None,
                  dpe_mask: Optional[torch.Tensor] = None,
                  window: int = WINDOW) -> dict:
    """Keyword arguments of :func:`dpe_kernels.integrations.baselines.apply_method` for ``name`` at ``length``."""
    f = extension_factor(length, train_len, target_length)
    if name == "rope":
        return {}
    if name in ("pi", "ntk"):
        return {"factor": f}
    if name == "yarn":
        return {"factor": f, "original_max_position_embeddings": int(train_len)}
    if name == "self_extend":
        return {"group_size": uniform_scale(f), "window": window}
    if name == "dpe":
        cfg = dpe_config_for(model, length, train_len, target_length=target_length, preset=dpe_preset,
                             config=dpe_config, window=window)
        if dpe_mask is not None:
            cfg = cfg.with_mask(dpe_mask)
        what = "the DPE config" if dpe_config is not None else f"DPE preset {dpe_preset!r}"
        cfg.check_length(int(length), name=what, stacklevel=3)  # used past its calibration: never silent
        return {"config": cfg}  # a key-dimension mask travels inside the config
    raise ValueError(f"unknown method {name!r}; choose from {METHODS}")


def describe(name: str, kw: dict) -> str:
    """A short human-readable parameter string for tables and records."""
    if name == "rope":
        return "-"
    if name in ("pi", "ntk", "yarn"):
        return f"factor {kw['factor']:.3g}"
    if name == "self_extend":
        return f"G {kw['group_size']}, w {kw['window']}"
    cfg = kw["config"]
    mask = ", mask" if cfg.mask is not None else ""
    return f"w {cfg.window}, scales {list(cfg.scales)}{mask}"


class _NoopHandle:
    def remove(self):
        pass


def apply(model, name: str, kw: dict):
    """Apply ``name`` with ``kw`` to the model instance; returns a handle with ``remove()``."""
    try:
        from ...integrations.baselines import apply_method
    except ImportError as e:  # transformers missing: plain RoPE still runs
        if name == "rope":
            return _NoopHandle()
        raise RuntimeError(f"method {name!r} needs dpe_kernels.integrations.baselines: {e}") from e
    return apply_method(model, name, **kw)
