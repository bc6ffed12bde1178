"""Text shipped with the package: Paul Graham's essays (the haystack of the paper's
needle-in-a-haystack tests; ``texts/PaulGrahamEssays.json`` beside this module, ``{"text": ...}``)."""
from __future__ import annotations

import functools
import json
from pathlib import Path

__all__ = ["DATA_DIR", "load_essays", "PASSKEY_FILLER"]

DATA_DIR = Path(__file__).resolve().parent / "texts"  # dpe_kernels/tools/eval/texts

# The classic passkey filler (Landmark Attention / Self-Extend / LongLM).
PASSKEY_FILLER = (" The grass is green. The sky is blue. The sun is yellow. Here we go."
                  " There and back again.")


@functools.lru_cache(maxsize=1)
def load_essays() -> str:
    """The essays as one string (about 3 M characters, about 700K SmolLM2 tokens)."""
    path = DATA_DIR / "PaulGrahamEssays.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the package data was not installed (reinstall dpe-kernels from a clone)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)["text"]
