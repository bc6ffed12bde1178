"""The first release's import paths, kept for one release: each old module is a
two-line file that calls :func:`alias_module`, which warns (DeprecationWarning)
and makes the old name the new module itself (no second copy of its state)."""
from __future__ import annotations

import importlib
import pkgutil
import sys
import warnings
from types import ModuleType

__all__ = ["alias_module", "MOVED"]

# old path -> new path (the layout of the second release)
MOVED = {
    "dpe_kernels.hf": "dpe_kernels.integrations.hf",
    "dpe_kernels.baselines": "dpe_kernels.integrations.baselines",
    "dpe_kernels.models": "dpe_kernels.tools.models",
    "dpe_kernels.calibrate": "dpe_kernels.tools.calibrate",
    "dpe_kernels.cli": "dpe_kernels.tools.cli",
    "dpe_kernels.eval": "dpe_kernels.tools.eval",
    "dpe_kernels.rope_triton": "dpe_kernels.backends.triton_rope",
    "dpe_kernels.attention_triton": "dpe_kernels.backends.triton_attention",
    "dpe_kernels._ext": "dpe_kernels.ops",
    "dpe_kernels._ops": "dpe_kernels.ops",
}


def alias_module(old: str) -> ModuleType:
    """Warn that ``old`` moved, import its new home and register it under the old
    name (for a package, its submodules too, so ``import old.sub`` works)."""
    new = MOVED[old]
    warnings.warn(f"{old} is deprecated and will be removed in the next release: import {new}",
                  DeprecationWarning, stacklevel=3)
    mod = importlib.import_module(new)
    sys.modules[old] = mod
    if hasattr(mod, "__path__"):
        for info in pkgutil.iter_modules(mod.__path__):
            sys.modules[f"{old}.{info.name}"] = importlib.import_module(f"{new}.{info.name}")
    return mod
