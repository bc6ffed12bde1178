"""DPEConfig: window, groups of frequency pairs with integer scales, optional
key-dimension mask (docs/method.md, "Configuration"), and every preset in one place:

* the paper's published scales (:data:`PAPER_PRESETS`, for 64-pair models);
* the calibrated configurations shipped as ``dpe_kernels/presets/NAME.json``
  (written by ``dpe detect``, with their key-dimension mask);
* the starting scales computed from a model's frequencies
  (:func:`starting_scales`, preset ``"auto"``) and ``"uniform"``.

:meth:`DPEConfig.from_preset` builds any of them, so an engine needs nothing
from the evaluation tools."""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from .utils import is_int

__all__ = ["DPEConfig", "PresetLengthWarning", "WINDOW", "NUM_GROUPS", "PAPER_PRESETS", "PRESET_DIR", "calibrated_presets",
           "preset_names", "extension_factor", "starting_scales", "uniform_scale"]

# The paper's setting: window 1024 and 8 equal groups of pairs.
WINDOW = 1024
NUM_GROUPS = 8

# Published settings (docs/method.md, "The key-dimension mask and the configuration search"), group 0 (high frequency) .. 7, for
# 64-pair models; other pair counts split into the same 8 groups.
PAPER_PRESETS: Dict[str, Tuple[int, ...]] = {
    "llama3-8b": (4, 4, 2, 16, 32, 32, 16, 128),
    "llama3-8b-config": (2, 8, 2, 8, 32, 32, 32, 4),
    "llama3.1-8b": (2, 32, 32, 2, 2, 2, 2, 1),
    "qwen2.5-7b": (2, 16, 8, 8, 32, 8, 2, 4),
    "mistral-7b-v0.2": (4, 16, 2, 16, 32, 16, 16, 2),
}

# Calibrated configurations shipped with the package (DPEConfig JSON with its mask and the
# context length it was calibrated for).
PRESET_DIR = Path(__file__).resolve().parent / "presets"


class PresetLengthWarning(UserWarning):
    """A calibrated configuration is used past the context length it was calibrated for."""


def calibrated_presets() -> Dict[str, Path]:
    """Name -> JSON file of every shipped calibrated preset."""
    return {p.stem: p for p in sorted(PRESET_DIR.glob("*.json"))} if PRESET_DIR.is_dir() else {}


def preset_names() -> List[str]:
    """Every name :meth:`DPEConfig.from_preset` (and the CLI's ``--preset``) accepts."""
    return ["auto", "uniform", *PAPER_PRESETS, *calibrated_presets()]


def extension_factor(length: int, train_length: int, target_length: Optional[int] = None) -> float:
    """``f = max(1, target / train)`` with ``target = target_length or length``."""
    target = target_length or length
    return max(1.0, target / float(train_length))


def uniform_scale(factor: float) -> int:
    """The one scale of Self-Extend and of the ``"uniform"`` preset: ``2 * ceil(f)``."""
    return 2 * math.ceil(factor)


def starting_scales(inv_freq: torch.Tensor, factor: float, train_length: int, window: int = WINDOW,
                    num_groups: int = NUM_GROUPS) -> List[int]:
    """Per-group scales of DPE's starting configuration (preset ``"auto"``).

    docs/method.md's search step 2 keeps every group it is not sweeping at ``2 * target / train``;
    that is the scale here for the groups whose longest wavelength ``2 pi / inv_freq`` exceeds
    the pre-training length (they have never seen a full period). Groups that complete a
    period inside the window keep scale 2, the paper's smallest, and groups that complete
    one inside the pre-training length get half the large scale (at least 2). For SmolLM2
    (theta 1e5, 32 pairs): [2, 2, 2, 4, 4, 8, 8, 8] at 32K, [2, 2, 2, 2, 2, 4, 4, 4] at 16K,
    all 2 up to 8K.
    """
    p = inv_freq.shape[-1]
    if p % num_groups:
        raise ValueError(f"{p} pairs do not split into {num_groups} equal groups")
    big = uniform_scale(factor)
    wavelength = 2 * math.pi / inv_freq.double()
    scales = []
    for g in range(num_groups):
        longest = float(wavelength[(g + 1) * (p // num_groups) - 1])
        if longest <= window:
            scales.append(2)
        elif longest <= train_length:
            scales.append(max(2, big // 2))
        else:
            scales.append(big)
    return scales


@dataclass(frozen=True)
class DPEConfig:
    """A DPE configuration; it validates itself on construction.

    Args:
        window: local window ``w >= 1`` that keeps original positions.
        group_boundaries: ``0 = b_0 < b_1 < ... < b_G = P`` over pair indices
            (``P = rotary_dim / 2``); group ``g`` holds pairs ``b_g .. b_{g+1}-1``.
        scales: one integer scale ``s_g >= 1`` per group.
        mask: optional bool tensor ``[num_layers, H_m, P]``; ``H_m`` is the
            number of query heads (per query head, as in the paper) or of KV
            heads. True marks a key dimension (scaled beyond the window).
        calibrated_length: optional context length (tokens) the scales were
            calibrated for (``dpe detect``'s target). Metadata: it changes no
            number, but :meth:`from_preset` and :meth:`check_length` warn
            (:class:`PresetLengthWarning`) when the config is used past it.

    Use :meth:`uniform` for ``G`` equal groups (the paper uses 8).
    """

    window: int
    group_boundaries: Tuple[int, ...]
    scales: Tuple[int, ...]
    mask: Optional[torch.Tensor] = field(default=None, compare=False, repr=False)
    calibrated_length: Optional[int] = field(default=None, compare=False)

    def __post_init__(self):
        if not is_int(self.window):
            raise TypeError(f"window must be an int, got {type(self.window).__name__}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        bounds, scales = self.group_boundaries, self.scales
        if not isinstance(bounds, (list, tuple)) or not all(is_int(b) for b in bounds):
            raise TypeError("group_boundaries must be a sequence of ints")
        if not isinstance(scales, (list, tuple)) or not all(is_int(s) for s in scales):
            raise TypeError("scales must be a sequence of ints")
        object.__setattr__(self, "group_boundaries", tuple(bounds))
        object.__setattr__(self, "scales", tuple(scales))
        if len(bounds) < 2 or bounds[0] != 0:
            raise ValueError(f"group_boundaries must start at 0 and hold at least two entries, got {bounds}")
        if any(b1 <= b0 for b0, b1 in zip(bounds, bounds[1:])):
            raise ValueError(f"group_boundaries must be strictly increasing, got {bounds}")
        if len(scales) != len(bounds) - 1:
            raise ValueError(
                f"scales must have one entry per group ({len(bounds) - 1}), got {len(scales)}")
        if any(s < 1 for s in scales):
            raise ValueError(f"scales must all be >= 1, got {scales}")
        if self.mask is not None:
            m = self.mask
            if not isinstance(m, torch.Tensor):
                raise TypeError(f"mask must be a torch.Tensor, got {type(m).__name__}")
            if m.dtype != torch.bool:
                raise TypeError(f"mask must be a bool tensor, got {m.dtype}")
            if m.dim() != 3 or m.shape[-1] != self.num_pairs:
                raise ValueError(
                    f"mask must have shape [num_layers, H_m, {self.num_pairs}], got {list(m.shape)}")
        if self.calibrated_length is not None and (not is_int(self.calibrated_length)
                                                   or self.calibrated_length < 1):
            raise ValueError(f"calibrated_length must be a positive int or None, got {self.calibrated_length!r}")
        object.__setattr__(self, "_pair_scale_cache", {})

    # ------------------------------------------------------------------ build
    @classmethod
    def uniform(cls, window: int, scales: Sequence[int], num_pairs: int,
                mask: Optional[torch.Tensor] = None, calibrated_length: Optional[int] = None) -> "DPEConfig":
        """``len(scales)`` equal groups over ``num_pairs`` pairs."""
        if not is_int(num_pairs) or num_pairs < 1:
            raise ValueError(f"num_pairs must be a positive int, got {num_pairs!r}")
        g = len(scales)
        if g < 1 or num_pairs % g != 0:
            raise ValueError(f"num_pairs ({num_pairs}) must be divisible by the number of groups ({g})")
        bounds = tuple(i * (num_pairs // g) for i in range(g + 1))
        return cls(window=window, group_boundaries=bounds, scales=tuple(scales), mask=mask,
                   calibrated_length=calibrated_length)

    @classmethod
    def from_preset(cls, name: str, *, inv_freq: Optional[torch.Tensor] = None,
                    num_pairs: Optional[int] = None, train_length: Optional[int] = None,
                    target_length: Optional[int] = None, window: int = WINDOW) -> "DPEConfig":
        """A named configuration (:func:`preset_names`).

        * a shipped calibrated preset (``dpe_kernels/presets/NAME.json``): loaded as
          written, window, mask and calibrated length included (``num_pairs`` /
          ``inv_freq``, if given, must match its pairs); a ``target_length`` past
          its calibrated length warns (:class:`PresetLengthWarning`);
        * a paper preset (:data:`PAPER_PRESETS`): its 8 scales over ``num_pairs``
          pairs (or ``inv_freq``'s length), window ``window``;
        * ``"auto"``: :func:`starting_scales` for ``target_length`` from ``inv_freq``
          (float32 ``[P]``, the model's frequencies) and ``train_length``;
        * ``"uniform"``: every group at ``2 * ceil(target_length / train_length)``.
        """
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        if inv_freq is not None:
            if not isinstance(inv_freq, torch.Tensor) or inv_freq.dim() != 1:
                raise ValueError("inv_freq must be a 1-D tensor of the model's frequencies")
            if num_pairs is not None and num_pairs != inv_freq.shape[0]:
                raise ValueError(f"num_pairs ({num_pairs}) disagrees with inv_freq ({inv_freq.shape[0]} pairs)")
            num_pairs = inv_freq.shape[0]
        calibrated = calibrated_presets()
        if name in calibrated:
            cfg = cls.from_json(calibrated[name])
            if num_pairs is not None and cfg.num_pairs != num_pairs:
                raise ValueError(f"preset {name!r} covers {cfg.num_pairs} pairs, the model rotates {num_pairs}")
            if target_length is not None:
                cfg.check_length(target_length, name=f"preset {name!r}", stacklevel=3)
            return cfg
        if name not in preset_names():
            raise ValueError(f"unknown DPE preset {name!r}: choose one of {preset_names()}")
        if num_pairs is None:
            raise ValueError(f"preset {name!r} needs num_pairs or inv_freq (the model's rotary pairs)")
        if name in PAPER_PRESETS:
            return cls.uniform(window, PAPER_PRESETS[name], num_pairs)
        for arg, val in (("train_length", train_length), ("target_length", target_length)):
            if not is_int(val) or val < 1:
                raise ValueError(f"preset {name!r} needs {arg}, a positive int, got {val!r}")
        factor = extension_factor(target_length, train_length)
        if name == "uniform":
            return cls.uniform(window, [uniform_scale(factor)] * NUM_GROUPS, num_pairs)
        if inv_freq is None:
            raise ValueError("preset 'auto' needs inv_freq (the model's frequencies)")
        return cls.uniform(window, starting_scales(inv_freq, factor, train_length, window), num_pairs)

    # -------------------------------------------------------------- derived
    @property
    def num_pairs(self) -> int:
        return self.group_boundaries[-1]

    @property
    def num_groups(self) -> int:
        return len(self.scales)

    def pair_scales(self, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
        """int64 ``[P]``: the scale of the group of every pair (cached per device)."""
        device = torch.device(device)
        cache: Dict[torch.device, torch.Tensor] = self._pair_scale_cache  # type: ignore[attr-defined]
        if device not in cache:
            per_pair = [s for s, b0, b1 in zip(self.scales, self.group_boundaries, self.group_boundaries[1:])
                        for _ in range(b1 - b0)]
            cache[device] = torch.tensor(per_pair, dtype=torch.int64, device=device)
        return cache[device]

    def layer_mask(self, layer: int) -> Optional[torch.Tensor]:
        """The ``[H_m, P]`` mask of one layer, or None when the config has no mask."""
        if self.mask is None:
            return None
        if not is_int(layer):
            raise TypeError(f"layer must be an int, got {type(layer).__name__}")
        if not 0 <= layer < self.mask.shape[0]:
            raise ValueError(f"layer must be in [0, {self.mask.shape[0]}), got {layer}")
        return self.mask[layer]

    def with_mask(self, mask: Optional[torch.Tensor]) -> "DPEConfig":
        return DPEConfig(self.window, self.group_boundaries, self.scales, mask, self.calibrated_length)

    def exceeds_calibration(self, length: int) -> bool:
        """True when ``length`` tokens is past :attr:`calibrated_length` (False when that is None)."""
        if not is_int(length) or length < 1:
            raise ValueError(f"length must be a positive int, got {length!r}")
        return self.calibrated_length is not None and length > self.calibrated_length

    def check_length(self, length: int, *, name: str = "this DPE config", stacklevel: int = 2) -> bool:
        """Warn (:class:`PresetLengthWarning`) when ``length`` is past :attr:`calibrated_length`;
        returns True when the config covers ``length`` (or says nothing about it)."""
        if not self.exceeds_calibration(length):
            return True
        warnings.warn(f"{name} was calibrated for {self.calibrated_length} tokens and is used at {length}: "
                      f"its scales were not chosen for this length (calibrate for it with `dpe detect "
                      f"--target-length {length}`)", PresetLengthWarning, stacklevel=stacklevel)
        return False

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        d = {"window": self.window, "group_boundaries": list(self.group_boundaries),
             "scales": list(self.scales)}
        if self.calibrated_length is not None:
            d["calibrated_length"] = self.calibrated_length
        if self.mask is not None:
            # One string of 0/1 per (layer, head): compact and diff-friendly.
            m = self.mask.to("cpu", torch.uint8)
            d["mask"] = [["".join(str(int(v)) for v in row) for row in layer] for layer in m.tolist()]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DPEConfig":
        if not isinstance(d, dict):
            raise TypeError(f"a DPE config must be a JSON object, got {type(d).__name__}")
        unknown = set(d) - {"window", "group_boundaries", "scales", "mask", "calibrated_length"}
        if unknown:
            raise ValueError(f"unknown DPE config keys: {sorted(unknown)}")
        for key in ("window", "group_boundaries", "scales"):
            if key not in d:
                raise ValueError(f"DPE config is missing {key!r}")
        mask = None
        if d.get("mask") is not None:
            rows = d["mask"]
            try:
                mask = torch.tensor([[[c == "1" for c in row] for row in layer] for layer in rows],
                                    dtype=torch.bool)
                ok = all(set(row) <= {"0", "1"} for layer in rows for row in layer)
            except (TypeError, ValueError) as e:
                raise ValueError(f"mask must be a list (layers) of lists (heads) of 0/1 strings: {e}") from None
            if not ok:
                raise ValueError("mask strings may hold only '0' and '1'")
        return cls(window=d["window"], group_boundaries=tuple(d["group_boundaries"]),
                   scales=tuple(d["scales"]), mask=mask, calibrated_length=d.get("calibrated_length"))

    def to_json(self, path: Optional[Union[str, os.PathLike]] = None) -> str:
        """The config as JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            with open(path, "w") as f:
                f.write(text + "\n")
        return text

    @classmethod
    def from_json(cls, source: Union[str, os.PathLike]) -> "DPEConfig":
        """Load from a JSON file path or from JSON text."""
        text = str(source)
        if not text.lstrip().startswith("{"):
            with open(source) as f:
                text = f.read()
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"invalid DPE config JSON: {e}") from None
        return cls.from_dict(d)
