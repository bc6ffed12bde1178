"""Teacher-forced retrieval scores: the log-probability of the right answer, one forward pass.

For a retrieval prompt (it ends with the answer prefix, e.g. "... The pass key is") and the
answer tokens ``a_1 .. a_A``, one forward over ``prompt + a_1 .. a_{A-1}`` gives, at the last A
positions, the model's distribution over each answer token given the prompt and the correct
answer so far. From that one pass:

* ``token_logprobs[j] = log p(a_j | prompt, a_<j)`` (float32 log-softmax of the logits);
* ``token_argmax[j]``: the most likely token there; ``exact`` when it equals ``a_j`` at every
  answer position (what greedy decoding would reproduce token for token);

no generation. The answer is what the prompt asks for, written as the model would continue
the answer prefix: passkey ``" 12345"`` (the key's tokens); NIAH ``" v1, v2, v3, v4"`` in the
order the needles appear, scored per value (the ``", "`` separators are teacher-forced but not
scored). The sample's log-prob is the key's log-probability (passkey) or the mean of the four
values' log-probabilities (NIAH); its exact-match score is 1/0 (passkey) or the fraction of
values reproduced exactly (NIAH, like the generated answer's recall).
"""
from __future__ import annotations

import time
from typing import Dict, List, Sequence, Tuple

import torch

from .niah import niah_prompt
from .passkey import passkey_prompt
from .perplexity import backbone_and_head, head_logits
from .prompts import Prompt, encode

__all__ = ["answer_logprobs", "passkey_answer", "niah_answer", "score_answer", "passkey_logprob",
           "niah_logprob"]


def answer_logprobs(model, prompt_ids: Sequence[int], answer_ids: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(float32 ``[A]`` log-probabilities, int64 ``[A]`` argmax ids) of the answer tokens after the
    prompt, teacher-forced, from one forward over ``prompt + answer[:-1]``."""
    prompt_ids, answer_ids = list(prompt_ids), list(answer_ids)
    if not prompt_ids or not answer_ids:
        raise ValueError(f"prompt and answer must be non-empty, got {len(prompt_ids)} and {len(answer_ids)} tokens")
    base, head = backbone_and_head(model)
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids + answer_ids[:-1]], dtype=torch.long, device=device)
    a = len(answer_ids)
    with torch.inference_mode():
        hidden = base(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)[0]
        # Only the A rows that predict the answer go through the vocabulary-wide head.
        logits = head_logits(model, head, hidden[0, -a:])
        logp = torch.log_softmax(logits, dim=-1)
        target = torch.tensor(answer_ids, dtype=torch.long, device=device)
        lp = logp.gather(-1, target[:, None])[:, 0]
        am = logits.argmax(dim=-1)
    return lp.cpu(), am.cpu()


def passkey_answer(tokenizer, key) -> Tuple[List[int], List[Tuple[int, int]]]:
    """(answer ids, scored spans) of a pass key: the tokens of ``" KEY"``, one span."""
    ids = encode(tokenizer, f" {key}")
    return ids, [(0, len(ids))]


def niah_answer(tokenizer, values: Sequence[str]) -> Tuple[List[int], List[Tuple[int, int]]]:
    """(answer ids, one span per value) of ``" v1, v2, ..."``; the separators are not in a span."""
    ids: List[int] = []
    spans = []
    for j, v in enumerate(values):
        if j:
            ids += encode(tokenizer, ",")
        piece = encode(tokenizer, f" {v}")
        spans.append((len(ids), len(ids) + len(piece)))
        ids += piece
    return ids, spans


def score_answer(model, prompt: Prompt, answer_ids: Sequence[int], spans: Sequence[Tuple[int, int]]) -> Dict:
    """The record fields of one teacher-forced sample (everything needed to recompute the scores)."""
    t0 = time.perf_counter()
    lp, am = answer_logprobs(model, prompt.input_ids, answer_ids)
    dt = time.perf_counter() - t0
    answer_ids = list(answer_ids)
    span_lp = [float(lp[a:b].sum()) for a, b in spans]
    span_ok = [bool(all(int(am[j]) == answer_ids[j] for j in range(a, b))) for a, b in spans]
    frac = sum(span_ok) / len(span_ok)
    return {"scoring": "logprob", "logprob": sum(span_lp) / len(span_lp), "span_logprobs": span_lp,
            "span_exact": span_ok, "score": frac, "correct": bool(frac == 1.0),
            "answer_tokens": answer_ids, "answer_spans": [list(s) for s in spans],
            "token_logprobs": [round(float(x), 6) for x in lp], "token_argmax": [int(x) for x in am],
            "seconds": round(dt, 3), "prompt_tokens": len(prompt), "needle_positions": prompt.needle_positions}


def passkey_logprob(model, tokenizer, length: int, depth: float, key, fmt: str = "raw",
                    haystack: str = "filler") -> Dict:
    """Teacher-forced passkey sample (see the module docstring)."""
    p = passkey_prompt(tokenizer, length, depth, key, fmt, haystack)
    ids, spans = passkey_answer(tokenizer, key)
    return {"answer": str(key), **score_answer(model, p, ids, spans)}


def niah_logprob(model, tokenizer, length: int, depth: float, key: str, values: Sequence[str],
                 fmt: str = "raw", haystack: str = "essays") -> Dict:
    """Teacher-forced 4-needle NIAH sample: the values in needle order (see the module docstring)."""
    p = niah_prompt(tokenizer, length, depth, key, values, fmt, haystack)
    ids, spans = niah_answer(tokenizer, values)
    return {"answer": list(values), "needle_key": key, **score_answer(model, p, ids, spans)}
