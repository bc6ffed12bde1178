"""The methods compared by the evaluation and their parameters at a given length.

The extension factor at an evaluated length ``L`` is ``f = max(1, target / T)`` with ``T`` the
model's pre-training length and ``target = L`` (default: every length gets the factor it needs)
or a fixed ``--target-length``.

    rope         plain RoPE (the unpatched model)
    pi           position interpolation, factor f
    ntk          NTK-aware base scaling, factor f
    yarn         YaRN (HF formulas, beta_fast 32, beta_slow 1, original length T), factor f
    self_extend  Self-Extend: window 1024, one group of scale G = 2 * ceil(f)
    dpe          DPE, window 1024, 8 equal groups, per-group scales from :func:`dpe_auto_scales`
                 (or a preset / JSON config), no key-dimension mask unless the config has one

DPE's starting configuration (calibration is a later step): SPEC's detection step 2 keeps every
group it is not sweeping at ``2 * target / train``; that is the scale here for the groups whose
longest wavelength ``2 pi / inv_freq`` exceeds the pre-training length (they have never seen a
full period). Groups that complete a period inside the window keep scale 2, the paper's smallest,
and groups that complete one inside the pre-training length get half the large scale (at least
2). For SmolLM2 (theta 1e5, 32 pairs): [2, 2, 2, 4, 4, 8, 8, 8] at 32K, [2, 2, 2, 2, 2, 4, 4, 4]
at 16K, all 2 up to 8K.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..config import DPEConfig

__all__ = ["METHODS", "DPE_PRESETS", "CALIBRATED_PRESETS", "preset_names", "load_preset", "extension_factor", "dpe_auto_scales", "dpe_config_for",
           "method_kwargs", "apply", "describe"]

METHODS = ("rope", "pi", "ntk", "yarn", "self_extend", "dpe")
WINDOW = 1024
NUM_GROUPS = 8

# Published settings (SPEC), for 64-pair models; "auto" is computed from the model's frequencies.
DPE_PRESETS: Dict[str, Tuple[int, ...]] = {
    "llama3-8b": (4, 4, 2, 16, 32, 32, 16, 128),
    "llama3-8b-config": (2, 8, 2, 8, 32, 32, 32, 4),
    "llama3.1-8b": (2, 32, 32, 2, 2, 2, 2, 1),
    "qwen2.5-7b": (2, 16, 8, 8, 32, 8, 2, 4),
    "mistral-7b-v0.2": (4, 16, 2, 16, 32, 16, 16, 2),
}


# Calibrated configurations shipped with the package (dpe_kernels/presets/NAME.json, written by
# `dpe detect`; window, groups, scales and the key-dimension mask of every layer). How each was
# made is in its README section and bench/results/calibration_smollm2.md.
_PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"


def _calibrated() -> Dict[str, Path]:
    return {p.stem: p for p in sorted(_PRESET_DIR.glob("*.json"))} if _PRESET_DIR.is_dir() else {}


CALIBRATED_PRESETS = tuple(_calibrated())


def preset_names() -> List[str]:
    """Every name --preset accepts."""
    return ["auto", "uniform", *DPE_PRESETS, *_calibrated()]


def load_preset(name: str) -> DPEConfig:
    """A shipped calibrated preset as a :class:`DPEConfig` (with its mask)."""
    found = _calibrated()
    if name not in found:
        raise ValueError(f"unknown calibrated preset {name!r}; shipped: {sorted(found)}")
    return DPEConfig.from_json(found[name])


def extension_factor(length: int, train_len: int, target_length: Optional[int] = None) -> float:
    target = target_length or length
    return max(1.0, target / float(train_len))


def model_inv_freq(model) -> torch.Tensor:
    from ..hf import find_rotary_embedding

    _, rotary = find_rotary_embedding(model)
    return rotary.inv_freq.detach().float().cpu()


def dpe_auto_scales(inv_freq: torch.Tensor, factor: float, train_len: int, window: int = WINDOW,
                    num_groups: int = NUM_GROUPS) -> List[int]:
    """Per-group scales of the starting configuration (see the module docstring)."""
    p = inv_freq.shape[-1]
    if p % num_groups:
        raise ValueError(f"{p} pairs do not split into {num_groups} equal groups")
    big = 2 * math.ceil(factor)
    wavelength = 2 * math.pi / inv_freq.double()
    scales = []
    for g in range(num_groups):
        longest = float(wavelength[(g + 1) * (p // num_groups) - 1])
        if longest <= window:
            scales.append(2)
        elif longest <= train_len:
            scales.append(max(2, big // 2))
        else:
            scales.append(big)
    return scales


def dpe_config_for(model, length: int, train_len: int, *, target_length: Optional[int] = None,
                   preset: str = "auto", config: Optional[DPEConfig] = None, window: int = WINDOW) -> DPEConfig:
    """The DPE configuration used at ``length``: ``config`` when given, else ``preset``
    ("auto", "uniform" = every group ``2 * ceil(f)``, or a published preset name)."""
    if config is not None:
        return config
    inv = model_inv_freq(model)
    p = inv.shape[-1]
    f = extension_factor(length, train_len, target_length)
    if preset == "auto":
        scales = dpe_auto_scales(inv, f, train_len, window)
    elif preset == "uniform":
        scales = [2 * math.ceil(f)] * NUM_GROUPS
    elif preset in DPE_PRESETS:
        scales = list(DPE_PRESETS[preset])
    elif preset in _calibrated():
        cfg = load_preset(preset)
        if cfg.num_pairs != p:
            raise ValueError(f"preset {preset!r} covers {cfg.num_pairs} pairs, the model rotates {p}")
        return cfg
    else:
        raise ValueError(f"unknown DPE preset {preset!r}: choose one of {preset_names()}")
    return DPEConfig.uniform(window=window, scales=scales, num_pairs=p)


def method_kwargs(model, name: str, length: int, train_len: int, *, target_length: Optional[int] = None,
                  dpe_preset: str = "auto", dpe_config: Optional[DPEConfig] = None,
                  dpe_mask: Optional[torch.Tensor] = None,
                  window: int = WINDOW) -> dict:
    """Keyword arguments of :func:`dpe_kernels.baselines.apply_method` for ``name`` at ``length``."""
    f = extension_factor(length, train_len, target_length)
    if name == "rope":
        return {}
    if name in ("pi", "ntk"):
        return {"factor": f}
    if name == "yarn":
        return {"factor": f, "original_max_position_embeddings": int(train_len)}
    if name == "self_extend":
        return {"group_size": 2 * math.ceil(f), "window": window}
    if name == "dpe":
        cfg = dpe_config_for(model, length, train_len, target_length=target_length, preset=dpe_preset,
                             config=dpe_config, window=window)
        if dpe_mask is not None:
            cfg = cfg.with_mask(dpe_mask)
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
        from ..baselines import apply_method
    except ImportError as e:  # transformers missing: plain RoPE still runs
        if name == "rope":
            return _NoopHandle()
        raise RuntimeError(f"method {name!r} needs dpe_kernels.baselines: {e}") from e
    return apply_method(model, name, **kw)
