"""Passkey retrieval: a random 5-digit key hidden at a given depth of repeated filler text
(Landmark Attention / Self-Extend style); score 1 if the first number of the greedy answer is the key."""
from __future__ import annotations

import random
import re
from typing import Optional

from .prompts import Prompt, build_prompt

__all__ = ["passkey_key", "passkey_prompt", "score_passkey", "passkey_stop", "PASSKEY_MAX_NEW_TOKENS"]

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key?"
ANSWER_PREFIX = "The pass key is"
PASSKEY_MAX_NEW_TOKENS = 12
_NUM = re.compile(r"\d+")


def passkey_key(index: int, seed: int = 0) -> int:
    """The ``index``-th key of a run: a reproducible 5-digit number."""
    return random.Random(f"passkey-{seed}-{index}").randint(10000, 99999)


def passkey_prompt(tokenizer, length: int, depth: float, key: int, fmt: str = "raw",
                   haystack: str = "filler") -> Prompt:
    p = build_prompt(tokenizer, length, intro=INTRO, needles=[(depth, NEEDLE.format(key=key))],
                     question=QUESTION, answer_prefix=ANSWER_PREFIX, fmt=fmt, haystack=haystack)
    p.meta["answer"] = str(key)
    return p


def first_number(text: str) -> Optional[str]:
    m = _NUM.search(text)
    return m.group(0) if m else None


def score_passkey(answer: str, key) -> float:
    """1.0 when the first number in ``answer`` is exactly ``key``, else 0.0."""
    return float(first_number(answer) == str(key))


def passkey_stop(text: str) -> bool:
    """Stop once a number has been written and something other than a digit follows it."""
    m = _NUM.search(text)
    return bool(m) and m.end() < len(text)
