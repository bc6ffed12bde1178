"""DPEConfig: window, groups of frequency pairs with integer scales, optional
key-dimension mask. See ../shared/SPEC.md, "Configuration"."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple, Union

import torch

__all__ = ["DPEConfig"]


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


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

    Use :meth:`uniform` for ``G`` equal groups (the paper uses 8).
    """

    window: int
    group_boundaries: Tuple[int, ...]
    scales: Tuple[int, ...]
    mask: Optional[torch.Tensor] = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if not _is_int(self.window):
            raise TypeError(f"window must be an int, got {type(self.window).__name__}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        bounds, scales = self.group_boundaries, self.scales
        if not isinstance(bounds, (list, tuple)) or not all(_is_int(b) for b in bounds):
            raise TypeError("group_boundaries must be a sequence of ints")
        if not isinstance(scales, (list, tuple)) or not all(_is_int(s) for s in scales):
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
        object.__setattr__(self, "_pair_scale_cache", {})

    # ------------------------------------------------------------------ build
    @classmethod
    def uniform(cls, window: int, scales: Sequence[int], num_pairs: int,
                mask: Optional[torch.Tensor] = None) -> "DPEConfig":
        """``len(scales)`` equal groups over ``num_pairs`` pairs."""
        if not _is_int(num_pairs) or num_pairs < 1:
            raise ValueError(f"num_pairs must be a positive int, got {num_pairs!r}")
        g = len(scales)
        if g < 1 or num_pairs % g != 0:
            raise ValueError(f"num_pairs ({num_pairs}) must be divisible by the number of groups ({g})")
        bounds = tuple(i * (num_pairs // g) for i in range(g + 1))
        return cls(window=window, group_boundaries=bounds, scales=tuple(scales), mask=mask)

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
        if not _is_int(layer):
            raise TypeError(f"layer must be an int, got {type(layer).__name__}")
        if not 0 <= layer < self.mask.shape[0]:
            raise ValueError(f"layer must be in [0, {self.mask.shape[0]}), got {layer}")
        return self.mask[layer]

    def with_mask(self, mask: Optional[torch.Tensor]) -> "DPEConfig":
        return DPEConfig(self.window, self.group_boundaries, self.scales, mask)

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        d = {"window": self.window, "group_boundaries": list(self.group_boundaries),
             "scales": list(self.scales)}
        if self.mask is not None:
            # One string of 0/1 per (layer, head): compact and diff-friendly.
            m = self.mask.to("cpu", torch.uint8)
            d["mask"] = [["".join(str(int(v)) for v in row) for row in layer] for layer in m.tolist()]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DPEConfig":
        if not isinstance(d, dict):
            raise TypeError(f"a DPE config must be a JSON object, got {type(d).__name__}")
        unknown = set(d) - {"window", "group_boundaries", "scales", "mask"}
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
                   scales=tuple(d["scales"]), mask=mask)

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
