"""Multi-needle retrieval scoring: N labelled needles in one haystack, every question scored as if
it alone followed the context.

The context (format prefix, intro, haystack with the N needles) runs through the model ONCE, into
the model's own ``DynamicCache``. Each question then continues from that cache, teacher-forced:
``question + answer_prefix + answer[:-1]`` at the positions that follow the context, its answer
log-probabilities read from the rows that predict the answer, and the cache is cropped back to the
context before the next question. So question j sees the context and itself, never another
question: exactly the sequence ``context + question_j + answer_j`` (the exactness test compares
against one full forward of it). A branched cache rather than one pass with a block-diagonal mask
over the question blocks because it needs nothing from the attention code: every method
(rope, pi, ntk, yarn through Hugging Face's attention; self_extend and dpe through the DPE
integration) keeps its own cache path, and the questions are a few dozen tokens each, so running
them one by one costs a few percent of the context pass.

Needles (``task``):

* ``passkey``: ``"The pass key for LABEL is KEY. Remember it. KEY is the pass key for LABEL."`` in
  the repeated filler; question ``"What is the pass key for LABEL?"``, answer ``" KEY"`` (5 digits).
* ``niah``: ``"One of the special magic numbers for LABEL is: VALUE."`` in Paul Graham's essays;
  question about LABEL, answer ``" VALUE"`` (7 digits): RULER's multi-key NIAH, one value per key.

Needle j of N sits at depth ``(j + depth) / N`` of the haystack (the NIAH task's rule), so a
context covers the depths evenly and ``depth`` shifts them all. A series of contexts (the
calibration's samples, :func:`series_context`) walks several shifts, so that few needles per
context still cover the haystack's depths: one needle per context walks 0.05, 0.15, ..., 0.95.
"""
from __future__ import annotations

import random
import time
from typing import Dict, List, Sequence, Tuple

import torch

from .passkey import INTRO as PASSKEY_INTRO
from .niah import INTRO as NIAH_INTRO
from .perplexity import backbone_and_head, head_logits
from .prompts import build_context, encode, question_ids

__all__ = ["MULTI_TASKS", "LABELS", "MAX_NEEDLES", "DEPTH_SLOTS", "series_context", "series_shifts", "multi_sample", "multi_context", "score_branches",
           "multi_logprob"]

MULTI_TASKS = ("passkey", "niah")
LABELS = ("amber-falcon", "quiet-harbor", "silver-meadow", "crimson-lantern", "hollow-ridge", "velvet-compass",
          "frozen-orchard", "golden-anchor", "rustic-beacon", "hidden-glacier", "bright-canyon", "lucky-river",
          "ancient-willow", "scarlet-summit", "misty-valley", "copper-thistle", "silent-prairie", "iron-lagoon",
          "pale-juniper", "stormy-citadel", "wild-saffron", "cobalt-mesa", "gentle-fjord", "marble-quarry")
MAX_NEEDLES = len(LABELS)

_TEXT = {
    "passkey": dict(intro=PASSKEY_INTRO, haystack="filler",
                    needle="The pass key for {label} is {value}. Remember it. {value} is the pass key for {label}.",
                    question="What is the pass key for {label}?", prefix="The pass key for {label} is"),
    "niah": dict(intro=NIAH_INTRO, haystack="essays",
                 needle="One of the special magic numbers for {label} is: {value}.",
                 question="What is the special magic number for {label} mentioned in the provided text?",
                 prefix="The special magic number for {label} mentioned in the provided text is"),
}


def _check(task: str, needles: int) -> None:
    if task not in MULTI_TASKS:
        raise ValueError(f"task must be one of {MULTI_TASKS}, got {task!r}")
    _check_needles(needles)


def _check_needles(needles: int) -> None:
    if isinstance(needles, bool) or not isinstance(needles, int) or not 1 <= needles <= MAX_NEEDLES:
        raise ValueError(f"needles must be an int in [1, {MAX_NEEDLES}], got {needles!r}")


DEPTH_SLOTS = 10  # the depths a series of contexts covers: N needles x ceil(10 / N) shifts >= 10


def series_context(index: int, needles: int) -> Tuple[int, float]:
    """Context ``index`` of a series of N-needle contexts (the calibration's samples): (sample, depth
    shift) with ``M = ceil(DEPTH_SLOTS / N)`` shifts, ``sample = index // M`` (its labels and values,
    :func:`multi_sample`) and ``shift = (index % M + 0.5) / M``: the order in which ``dpe eval
    --needles N --depths <the M shifts> --samples S`` scores its contexts, so a series IS those
    evaluation prompts. N >= 10: context i is sample i at 0.5 (needle j at (j + 0.5) / N); N = 4:
    M = 3, 12 depths; N = 1: sample 0 at 0.05, 0.15, ..., 0.95, then sample 1 at the same depths."""
    _check_needles(needles)
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"index must be a non-negative int, got {index!r}")
    m = series_shifts(needles)
    return index // m, (index % m + 0.5) / m


def series_shifts(needles: int) -> int:
    """How many depth shifts a series of N-needle contexts walks: ``ceil(DEPTH_SLOTS / N)``."""
    _check_needles(needles)
    return -(-DEPTH_SLOTS // needles)


def multi_sample(task: str, index: int, needles: int, seed: int = 0) -> List[Tuple[str, str]]:
    """[(label, value)] of context ``index``: distinct labels, distinct values (5 digits for
    passkey, 7 for niah), reproducible from (task, seed, index, needles)."""
    _check(task, needles)
    rng = random.Random(f"multi-{task}-{seed}-{index}-{needles}")
    labels = rng.sample(LABELS, needles)
    lo, hi = (10_000, 99_999) if task == "passkey" else (1_000_000, 9_999_999)
    values: List[str] = []
    while len(values) < needles:
        v = str(rng.randint(lo, hi))
        if v not in values:
            values.append(v)
    return list(zip(labels, values))


def multi_context(tokenizer, task: str, length: int, depth: float, sample: Sequence[Tuple[str, str]],
                  fmt: str = "raw", haystack: str = None):
    """(context Prompt, [(question ids, answer ids)] per needle). Every ``context + question_j``
    is at most ``length`` tokens (the longest is exactly ``length``)."""
    t = _TEXT[task]
    n = len(sample)
    d = min(max(float(depth), 0.0), 1.0)
    branches = []
    for label, value in sample:
        q = question_ids(tokenizer, t["question"].format(label=label), t["prefix"].format(label=label), fmt)
        branches.append((q, encode(tokenizer, f" {value}")))
    needles = [(min((j + d) / n, 1.0), t["needle"].format(label=label, value=value))
               for j, (label, value) in enumerate(sample)]
    ctx = build_context(tokenizer, length, intro=t["intro"], needles=needles,
                        reserve=max(len(q) for q, _ in branches), fmt=fmt, haystack=haystack or t["haystack"])
    return ctx, branches


def score_branches(model, context_ids: Sequence[int], branches: Sequence[Tuple[Sequence[int], Sequence[int]]]):
    """Per branch ``(question ids, answer ids)``: (float32 ``[A]`` answer log-probabilities, int64
    ``[A]`` argmax ids), each as if ``context + question + answer`` were one sequence; and the
    seconds of the context pass and of all branches."""
    from transformers import DynamicCache

    from ...integrations.hf import cache_kwargs

    if not context_ids:
        raise ValueError("the context must be non-empty")
    base, head = backbone_and_head(model)
    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    out = []
    with torch.inference_mode():
        t0 = time.perf_counter()
        base(input_ids=torch.tensor([list(context_ids)], device=device), use_cache=True, **cache_kwargs(cache))
        t1 = time.perf_counter()
        for q, a in branches:
            q, a = list(q), list(a)
            if not a:
                raise ValueError("every answer must be non-empty")
            ids = torch.tensor([q + a[:-1]], device=device)
            hidden = base(input_ids=ids, use_cache=True, **cache_kwargs(cache))[0]
            # Negative crop (tokens to remove): the form every tested transformers release takes.
            cache.crop(-ids.shape[1])
            logits = head_logits(model, head, hidden[0, -len(a):])
            logp = torch.log_softmax(logits, dim=-1)
            target = torch.tensor(a, dtype=torch.long, device=device)
            out.append((logp.gather(-1, target[:, None])[:, 0].cpu(), logits.argmax(dim=-1).cpu()))
        t2 = time.perf_counter()
    return out, t1 - t0, t2 - t1


def multi_logprob(model, tokenizer, task: str, length: int, depth: float, needles: int, sample: int,
                  seed: int = 0, fmt: str = "raw", haystack: str = None) -> List[Dict]:
    """One record body per needle of context ``sample``: the needle's label, value, depth and
    position; its answer's log-probability (``logprob``, the sum over the value's tokens) and exact
    match (``score`` 1/0: every answer token is the argmax); the context's and the branch's cost."""
    _check(task, needles)
    items = multi_sample(task, sample, needles, seed)
    ctx, branches = multi_context(tokenizer, task, length, depth, items, fmt, haystack)
    scored, ctx_s, br_s = score_branches(model, ctx.input_ids, branches)
    recs = []
    for j, ((label, value), (q, a), (lp, am)) in enumerate(zip(items, branches, scored)):
        ok = [int(x) for x in am] == list(a)
        recs.append({
            "scoring": "logprob", "needles": needles, "needle": j, "needle_label": label, "answer": value,
            "needle_depth": round(ctx.needle_positions[j] / len(ctx), 4), "needle_position": ctx.needle_positions[j],
            "logprob": float(lp.sum()), "score": float(ok), "correct": ok, "answer_tokens": list(a),
            "token_logprobs": [round(float(x), 6) for x in lp], "token_argmax": [int(x) for x in am],
            "prompt_tokens": len(ctx) + len(q), "context_tokens": len(ctx),
            "context_seconds": round(ctx_s, 3), "seconds": round(ctx_s / needles + br_s / needles, 3),
        })
    return recs
