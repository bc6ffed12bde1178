"""4-needle needle-in-a-haystack (the paper's detection task, RULER's multi-value NIAH): four 7-digit
"special magic numbers" for one key, one needle per quarter of the context, Paul Graham's essays
as haystack, greedy decoding; a sample scores the fraction of the four numbers recalled.

``depth`` places needle ``q`` (q = 0..3) at depth ``(q + depth) / 4`` of the haystack, so the
length x depth heatmap of the passkey task has a NIAH counterpart."""
from __future__ import annotations

import random
import re
from typing import List, Sequence, Tuple

from .prompts import Prompt, build_prompt

__all__ = ["niah_sample", "niah_prompt", "score_niah", "NIAH_MAX_NEW_TOKENS", "NUM_NEEDLES"]

INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
         "I will quiz you about the numbers afterwards.")
NEEDLE = "One of the special magic numbers for {key} is: {value}."
QUESTION = "What are all the special magic numbers for {key} mentioned in the provided text?"
ANSWER_PREFIX = "The special magic numbers for {key} mentioned in the provided text are"
NUM_NEEDLES = 4
NIAH_MAX_NEW_TOKENS = 64
_WORDS = ["amber-falcon", "quiet-harbor", "silver-meadow", "crimson-lantern", "hollow-ridge",
          "velvet-compass", "frozen-orchard", "golden-anchor", "rustic-beacon", "hidden-glacier",
          "bright-canyon", "lucky-river", "ancient-willow", "scarlet-summit", "misty-valley"]


def niah_sample(index: int, seed: int = 0) -> Tuple[str, List[str]]:
    """(key word, four distinct 7-digit values) of the ``index``-th sample of a run."""
    rng = random.Random(f"niah-{seed}-{index}")
    key = rng.choice(_WORDS)
    values: List[str] = []
    while len(values) < NUM_NEEDLES:
        v = str(rng.randint(1_000_000, 9_999_999))
        if v not in values:
            values.append(v)
    return key, values


def niah_prompt(tokenizer, length: int, depth: float, key: str, values: Sequence[str], fmt: str = "raw",
                haystack: str = "essays") -> Prompt:
    d = min(max(float(depth), 0.0), 1.0)
    needles = [((q + d) / NUM_NEEDLES, NEEDLE.format(key=key, value=v)) for q, v in enumerate(values)]
    p = build_prompt(tokenizer, length, intro=INTRO, needles=needles, question=QUESTION.format(key=key),
                     answer_prefix=ANSWER_PREFIX.format(key=key), fmt=fmt, haystack=haystack)
    p.meta["answer"] = list(values)
    return p


def score_niah(answer: str, values: Sequence[str]) -> float:
    """Fraction of ``values`` that occur as whole numbers in ``answer``."""
    found = set(re.findall(r"\d+", answer))
    return sum(v in found for v in values) / len(values)
