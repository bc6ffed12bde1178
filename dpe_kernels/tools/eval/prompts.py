"""Token-exact prompt construction for the retrieval tasks.

A prompt is built from token ids, not text, so its length is exact:

    [format prefix] intro  haystack[:a] needle_1 haystack[a:b] needle_2 ...  question [format suffix] answer_prefix

* ``format="raw"``: plain text (with whatever special tokens the tokenizer adds by default, e.g.
  Llama-3's BOS); the answer prefix follows the question directly.
* ``format="chat"``: intro + haystack + needles + question form the user message of the model's
  chat template (with its generation prompt); the answer prefix starts the assistant's reply.

The haystack is cut at a token boundary to fill the requested length; each needle goes at the
sentence boundary nearest to its requested depth (fraction of the haystack before it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import torch

from .data import PASSKEY_FILLER, load_essays

__all__ = ["FORMATS", "Prompt", "build_prompt", "build_context", "question_ids", "haystack_ids", "encode",
           "format_pieces"]

FORMATS = ("raw", "chat")
_SENTINEL = "\x00DPE_CONTENT\x00"
_SNAP = 48  # tokens searched either side of a requested needle position for a sentence end


@dataclass
class Prompt:
    input_ids: List[int]
    needle_positions: List[int]  # token index where each needle starts
    needle_depths: List[float]   # realised depth: needle start / prompt length
    meta: Dict = field(default_factory=dict)

    def __len__(self):
        return len(self.input_ids)

    def tensor(self) -> torch.Tensor:
        return torch.tensor([self.input_ids], dtype=torch.long)


def encode(tokenizer, text: str, add_special_tokens: bool = False) -> List[int]:
    ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    return list(ids)


def _tok_key(tokenizer):
    return (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), id(tokenizer))


_PIECES: Dict[tuple, Tuple[List[int], List[int]]] = {}


def format_pieces(tokenizer, fmt: str) -> Tuple[List[int], List[int]]:
    """(prefix ids, suffix ids) that the format puts around the user content."""
    if fmt not in FORMATS:
        raise ValueError(f"prompt format must be one of {FORMATS}, got {fmt!r}")
    key = (_tok_key(tokenizer), fmt)
    if key not in _PIECES:
        if fmt == "raw":
            with_special = encode(tokenizer, "a", add_special_tokens=True)
            plain = encode(tokenizer, "a")
            n = len(with_special) - len(plain)
            prefix = with_special[:n] if n > 0 and with_special[n:] == plain else []
            _PIECES[key] = (prefix, [])
        else:
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError("prompt format 'chat' needs a tokenizer with a chat template; use 'raw'")
            text = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False,
                                                 add_generation_prompt=True)
            pre, post = text.split(_SENTINEL)
            _PIECES[key] = (encode(tokenizer, pre), encode(tokenizer, post))
    return _PIECES[key]


_HAY: Dict[tuple, List[int]] = {}


def haystack_ids(tokenizer, kind: str, n_tokens: int) -> List[int]:
    """At least ``n_tokens`` haystack token ids: ``"filler"`` (the repeated passkey sentence group)
    or ``"essays"`` (Paul Graham's essays from their start)."""
    key = (_tok_key(tokenizer), kind)
    have = _HAY.get(key, [])
    if len(have) >= n_tokens:
        return have[:n_tokens]
    if kind == "filler":
        unit = encode(tokenizer, PASSKEY_FILLER)
        ids = unit * (n_tokens // len(unit) + 1)
    elif kind == "essays":
        text = load_essays()
        chars = max(6 * n_tokens + 4096, 2 * len(have) * 6)
        while True:
            ids = encode(tokenizer, text[:chars])
            if len(ids) >= n_tokens or chars >= len(text):
                break
            chars *= 2
        if len(ids) < n_tokens:
            raise ValueError(f"the essays hold only {len(ids)} tokens, {n_tokens} requested")
    else:
        raise ValueError(f"haystack must be 'filler' or 'essays', got {kind!r}")
    _HAY[key] = ids
    return ids[:n_tokens]


def _sentence_ends(tokenizer, hay: List[int], lo: int, hi: int) -> List[int]:
    """Indices j in [lo, hi] such that the haystack token before j ends a sentence."""
    out = []
    for j in range(max(lo, 1), min(hi, len(hay)) + 1):
        t = tokenizer.decode([hay[j - 1]])
        if t.rstrip(" \"')").endswith((".", "!", "?")):
            out.append(j)
    return out


def build_context(tokenizer, length: int, *, intro: str, needles: Sequence[Tuple[float, str]], reserve: int,
                  fmt: str = "raw", haystack: str = "filler") -> Prompt:
    """The shared part of a prompt: ``[format prefix] intro haystack-with-needles``, exactly
    ``length - reserve`` tokens, ``reserve`` being what follows it (question, format suffix,
    answer prefix). Each needle text sits at its depth (0..1) of the haystack."""
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    pre, _ = format_pieces(tokenizer, fmt)
    intro_ids = encode(tokenizer, intro)
    needle_ids = [encode(tokenizer, " " + text) for _, text in needles]
    fixed = len(pre) + len(intro_ids) + sum(map(len, needle_ids)) + reserve
    n_hay = length - fixed
    if n_hay < 0:
        raise ValueError(f"length {length} is shorter than the prompt without haystack ({fixed} tokens)")
    # End the haystack on a sentence boundary (the question must not follow half a sentence): take
    # the n_hay tokens that end at the first sentence end at or after n_hay of the stream.
    stream = haystack_ids(tokenizer, haystack, n_hay + 4 * _SNAP)
    ends = _sentence_ends(tokenizer, stream, n_hay, n_hay + 4 * _SNAP) if n_hay else []
    end = ends[0] if ends else n_hay
    hay = stream[end - n_hay:end]
    order = sorted(range(len(needles)), key=lambda i: needles[i][0])
    cuts = []
    for i in order:
        d = float(needles[i][0])
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"needle depth must be in [0, 1], got {d}")
        target = int(round(d * n_hay))
        ends = _sentence_ends(tokenizer, hay, target - _SNAP, target + _SNAP)
        lo = cuts[-1][0] if cuts else 0
        ends = [j for j in ends if j >= lo]
        cut = min(ends, key=lambda j: (abs(j - target), j)) if ends else max(target, lo)
        cuts.append((min(cut, n_hay), i))
    ids = list(pre) + intro_ids
    positions = [0] * len(needles)
    prev = 0
    for cut, i in cuts:
        ids += hay[prev:cut]
        positions[i] = len(ids)
        ids += needle_ids[i]
        prev = cut
    ids += hay[prev:]
    if len(ids) != length - reserve:
        raise RuntimeError(f"context built with {len(ids)} tokens, {length - reserve} intended")
    return Prompt(ids, positions, [p / length for p in positions],
                  meta={"haystack_tokens": n_hay, "format": fmt, "haystack": haystack})


def question_ids(tokenizer, question: str, answer_prefix: str, fmt: str = "raw") -> List[int]:
    """What follows the context: the question, the format's suffix, the answer prefix."""
    _, post = format_pieces(tokenizer, fmt)
    q_ids = encode(tokenizer, " " + question if fmt == "raw" else "\n" + question)
    ans_ids = encode(tokenizer, (" " if fmt == "raw" else "") + answer_prefix)
    return q_ids + list(post) + ans_ids


def build_prompt(tokenizer, length: int, *, intro: str, needles: Sequence[Tuple[float, str]], question: str,
                 answer_prefix: str, fmt: str = "raw", haystack: str = "filler") -> Prompt:
    """A prompt of exactly ``length`` tokens with each needle text at its depth (0..1) of the haystack."""
    tail = question_ids(tokenizer, question, answer_prefix, fmt)
    p = build_context(tokenizer, length, intro=intro, needles=needles, reserve=len(tail), fmt=fmt,
                      haystack=haystack)
    p.input_ids = p.input_ids + tail
    return p
