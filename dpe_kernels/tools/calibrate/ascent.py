"""Calibration step 2, the scales per group (docs/method.md, "The key-dimension mask and the
configuration search"): the coordinate ascent from the Self-Extend point (:func:`coordinate_ascent`),
what each sample is and how it is scored (:func:`scorer_sample`, :func:`score_sample`), the ascent
replayed from records (:func:`replay`, :func:`sweep_frontier`) and the resumable, shareable run on
a model (:func:`detect`). The key dimensions are :mod:`.dims`; the worker claims :mod:`.claims`."""
from __future__ import annotations

import hashlib
import math
import os
import time
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import torch

from ...config import DPEConfig, extension_factor, uniform_scale
from ...utils import is_int
from ..eval.stats import cluster_mean, cluster_paired_gain
from .claims import Claims
from .dims import attention_geometry

__all__ = ["SCORERS", "DetectResult", "self_extend_scales", "scorer_sample", "score_sample", "MissingScore",
           "coordinate_ascent", "replay", "sweep_frontier", "detect_setting", "detect"]

SCORERS = ("passkey-logprob", "niah-logprob", "passkey", "niah", "ppl")


class DetectResult(NamedTuple):
    config: DPEConfig       # the kept scales, window, mask, calibrated_length = target
    records: List[dict]     # one per scored (configuration, sample), resumed ones included
    trace: dict             # the ascent's decisions (see :func:`coordinate_ascent`)


def self_extend_scales(target_length: int, train_length: int, num_groups: int) -> List[int]:
    """The ascent's start: every group at Self-Extend's scale ``2 * ceil(target / train)``."""
    return [uniform_scale(extension_factor(target_length, train_length))] * num_groups


def scorer_sample(scorer: str, sample: int, seed: int = 0) -> dict:
    """What sample ``sample`` of ``scorer`` is: passkey depth ``(i % 5) / 4`` and key
    ``passkey_key(i, seed)``; NIAH depth ``(i % 3) / 2`` and ``niah_sample(i, seed)``; ppl essay
    text ``i``. The same index is the same prompt for every configuration (paired scores)."""
    if scorer not in SCORERS:
        raise ValueError(f"scorer must be one of {SCORERS}, got {scorer!r}")
    if scorer == "ppl":
        return {"text": sample}
    if scorer.startswith("passkey"):
        from ..eval.passkey import passkey_key

        return {"depth": (sample % 5) / 4, "key": passkey_key(sample, seed)}
    from ..eval.niah import niah_sample

    key, values = niah_sample(sample, seed)
    return {"depth": (sample % 3) / 2, "needle_key": key, "values": values}


def score_sample(model, tokenizer, scorer: str, length: int, sample: int, train_length: int,
                 seed: int = 0, needles: Optional[int] = None) -> dict:
    """One sample of ``scorer`` at ``length`` tokens on the model as it is patched now:
    ``{"score": float, ...}`` (higher is better) with what is needed to recompute it.

    * ``passkey-logprob`` / ``niah-logprob``: the teacher-forced log-probability of the answer
      (:mod:`.eval.logprob`: one forward, no generation); ``exact`` is the exact-match score of
      the same pass;
    * ``passkey`` / ``niah``: greedy generation, exact key / fraction of the 4 values recalled;
    * ``ppl``: minus the mean next-token loss of the positions beyond ``train_length``;
    * with ``needles`` (the ``-logprob`` scorers): sample ``i`` is context ``i`` of
      :func:`~.eval.multi.series_context` (sample ``i // M`` of :func:`~.eval.multi.multi_logprob`
      with its needles shifted by ``(i % M + 0.5) / M``: one needle walks 0.05 .. 0.95 over ten
      contexts; the prompts ``dpe eval --needles N`` scores); ``score`` is the mean of its needles'
      answer log-probabilities, ``needle_scores`` each one (what the ascent pairs).
    """
    if needles is not None:
        if not scorer.endswith("-logprob"):
            raise ValueError(f"needles applies to the -logprob scorers, got scorer {scorer!r}")
        from ..eval.multi import multi_logprob, series_context

        t0 = time.perf_counter()
        key_sample, shift = series_context(sample, needles)
        recs = multi_logprob(model, tokenizer, scorer.split("-")[0], length, shift, needles, key_sample, seed)
        lps = [r["logprob"] for r in recs]
        return {"needles": needles, "score": sum(lps) / len(lps), "needle_scores": lps,
                "exact": sum(r["score"] for r in recs) / len(recs),
                "needle_exact": [r["score"] for r in recs], "needle_depths": [r["needle_depth"] for r in recs],
                "answers": [r["answer"] for r in recs], "labels": [r["needle_label"] for r in recs],
                "context_tokens": recs[0]["context_tokens"], "context_seconds": recs[0]["context_seconds"],
                "seconds": round(time.perf_counter() - t0, 2)}
    spec = scorer_sample(scorer, sample, seed)
    t0 = time.perf_counter()
    if scorer == "ppl":
        from ..eval.perplexity import loss_by_position, ppl_tokens

        ids = torch.tensor([ppl_tokens(tokenizer, length, sample)])
        losses = loss_by_position(model, ids)
        tail = losses[train_length:] if losses.shape[0] > train_length else losses
        return {"score": -float(tail.mean()), "seconds": round(time.perf_counter() - t0, 2)}
    if scorer.endswith("-logprob"):
        from ..eval.logprob import niah_logprob, passkey_logprob

        if scorer == "passkey-logprob":
            res = passkey_logprob(model, tokenizer, length, spec["depth"], spec["key"], "raw")
        else:
            res = niah_logprob(model, tokenizer, length, spec["depth"], spec["needle_key"], spec["values"], "raw")
        exact = res.pop("score")
        return {"depth": spec["depth"], **res, "score": res["logprob"], "exact": exact}
    from ..eval.generate import greedy_generate

    if scorer == "passkey":
        from ..eval.passkey import PASSKEY_MAX_NEW_TOKENS, passkey_prompt, passkey_stop, score_passkey

        p = passkey_prompt(tokenizer, length, spec["depth"], spec["key"], "raw")
        text, _, _ = greedy_generate(model, tokenizer, p.tensor(), PASSKEY_MAX_NEW_TOKENS, stop=passkey_stop)
        score = score_passkey(text, spec["key"])
        answer = str(spec["key"])
    else:
        from ..eval.niah import NIAH_MAX_NEW_TOKENS, niah_prompt, score_niah

        p = niah_prompt(tokenizer, length, spec["depth"], spec["needle_key"], spec["values"], "raw", None)
        text, _, _ = greedy_generate(model, tokenizer, p.tensor(), NIAH_MAX_NEW_TOKENS)
        score = score_niah(text, spec["values"])
        answer = spec["values"]
    return {"depth": spec["depth"], "answer": answer, "output": text, "score": score,
            "seconds": round(time.perf_counter() - t0, 2), "prompt_tokens": len(p)}


class MissingScore(LookupError):
    """:func:`replay` met a configuration / sample that the records do not hold."""


def coordinate_ascent(score: Callable[[Tuple[int, ...], Sequence[int]], List[float]], start: Sequence[int],
                      scales: Sequence[int], samples: Sequence[int], fresh_samples: Sequence[int],
                      max_passes: int = 3, log: Optional[Callable[[str], None]] = None,
                      trace: Optional[dict] = None) -> dict:
    """Coordinate ascent over the groups' scales from ``start`` (the Self-Extend point).

    ``score(scales, samples)`` returns one score per sample (higher is better; the same sample
    index is the same prompt for every configuration), or per sample the list of its needles'
    scores (a multi-needle context: then means are over needles and standard errors are
    cluster-robust over contexts, :func:`~.eval.stats.cluster_paired_gain`). Each pass sweeps the groups in order;
    group ``g`` tries every scale of ``scales`` with the other groups at their CURRENT scales,
    and a candidate is accepted only when its mean paired gain over the incumbent on the same
    samples exceeds the gain's standard error (``mean(d) > sd(d) / sqrt(n)``); among accepted
    candidates the largest gain wins (tie: the scale closest in log2 to the incumbent's, then the
    smaller). Passes repeat while a pass changed something, at most ``max_passes``. Then the
    final configuration and ``start`` are scored on ``fresh_samples`` (not used above) and the
    one with the higher mean is kept (a tie keeps ``start``); when nothing changed there is
    nothing to compare and ``start`` is kept.

    Returns (and fills ``trace``, so a caller holds the decisions made before an exception):
    ``{"start", "final", "kept", "passes", "converged", "steps": [...], "fresh": {...} | None}``.
    """
    if len(samples) < 2:
        raise ValueError(f"the acceptance rule needs a standard error: at least 2 samples, got {len(samples)}")
    if not is_int(max_passes) or max_passes < 1:
        raise ValueError(f"max_passes must be a positive int, got {max_passes!r}")
    trace = {} if trace is None else trace
    cur = tuple(int(s) for s in start)
    trace.update({"start": list(cur), "final": None, "kept": None, "passes": 0, "converged": False,
                  "samples": list(samples), "fresh_samples": list(fresh_samples), "steps": [], "fresh": None})
    cur_scores = score(cur, samples)
    changed = False
    for p in range(1, max_passes + 1):
        trace["passes"] = p
        changed = False
        for g in range(len(cur)):
            inc_mean = cluster_mean(cur_scores)
            cands = []
            for s in scales:
                if s == cur[g]:
                    continue
                cfg = cur[:g] + (int(s),) + cur[g + 1:]
                sc = score(cfg, samples)
                gain, se = cluster_paired_gain(sc, cur_scores)
                cands.append({"scale": int(s), "mean": cluster_mean(sc), "gain": gain, "se": se,
                              "accepted": bool(gain > se)})  # nan se (cannot happen for n >= 2) rejects
            ok = [c for c in cands if c["accepted"]]
            step = {"pass": p, "group": g, "incumbent": list(cur), "incumbent_mean": inc_mean,
                    "candidates": cands, "chosen": None}
            if ok:
                best = max(ok, key=lambda c: (c["gain"], -abs(math.log2(c["scale"]) - math.log2(cur[g])),
                                              -c["scale"]))
                step["chosen"] = best["scale"]
                cur = cur[:g] + (best["scale"],) + cur[g + 1:]
                cur_scores = score(cur, samples)
                changed = True
            trace["steps"].append(step)
            if log:
                tried = ", ".join(f"{c['scale']}: {c['gain']:+.3f}±{c['se']:.3f}{'*' if c['accepted'] else ''}"
                                  for c in cands)
                log(f"pass {p} group {g}: incumbent {step['incumbent']} (mean {inc_mean:.4f}); gains {tried}"
                    f" -> {'scale ' + str(step['chosen']) if ok else 'kept'}")
        if not changed:
            break
    trace["converged"] = not changed
    trace["final"] = list(cur)
    start_t = tuple(trace["start"])
    kept = start_t
    if cur != start_t and fresh_samples:
        f_final, f_start = score(cur, fresh_samples), score(start_t, fresh_samples)
        gain, se = cluster_paired_gain(f_final, f_start)
        m_final, m_start = cluster_mean(f_final), cluster_mean(f_start)
        kept = cur if m_final > m_start else start_t
        trace["fresh"] = {"final_mean": m_final, "start_mean": m_start, "gain": gain, "se": se,
                          "kept": "final" if kept == cur else "start"}
        if log:
            log(f"fresh samples {list(fresh_samples)}: final {list(cur)} mean {m_final:.4f}, start {list(start_t)} "
                f"mean {m_start:.4f} (gain {gain:+.4f} ± {se:.4f}) -> keep the {trace['fresh']['kept']}")
    elif cur != start_t:
        kept = cur
    trace["kept"] = list(kept)
    return trace


def _mask_id(mask: Optional[torch.Tensor]) -> Optional[str]:
    if mask is None:
        return None
    m = mask.detach().to("cpu", torch.uint8).contiguous()
    return hashlib.sha1(str(list(m.shape)).encode() + m.numpy().tobytes()).hexdigest()[:12]


def detect_setting(target_length: int, train_length: int, scorer: str, window: int, mask: Optional[torch.Tensor],
                   seed: int, dtype: str, needles: Optional[int]) -> dict:
    """What makes records of one calibration comparable (every record carries it; a run reuses only
    the records of its own setting)."""
    return {"target_length": target_length, "train_length": train_length, "scorer": scorer, "window": window,
            "masked": mask is not None, "mask_id": _mask_id(mask), "seed": seed, "dtype": dtype, "needles": needles}


def _ascent_score(r: dict):
    """What the ascent pairs: a multi-needle record's list of needle scores, else its score."""
    ns = r.get("needle_scores")
    return [float(x) for x in ns] if ns is not None else float(r["score"])


def _record_matches(r: dict, base: dict) -> bool:
    """A record of this run's setting (records from before dtype / mask_id / needles were recorded:
    float32, no id, single needle)."""
    defaults = {"dtype": "float32", "mask_id": None, "needles": None}
    return all(r.get(k, defaults.get(k)) == v for k, v in base.items())


def replay(records: Iterable[dict], *, target_length: int, train_length: int, scales: Sequence[int],
           samples: int, fresh_samples: Optional[int] = None, max_passes: int = 3,
           num_groups: int = 8, base: Optional[dict] = None) -> dict:
    """The ascent's trace from records alone (no model): how far a (partial) run got. Stops at the
    first configuration / sample the records do not hold; then ``trace["pending"]`` names it."""
    cache: Dict[tuple, object] = {}
    for r in records:
        if base is None or _record_matches(r, base):
            cache[(tuple(r["scales"]), r["sample"])] = _ascent_score(r)

    def score(cfg, idx):
        out = []
        for i in idx:
            if (tuple(cfg), i) not in cache:
                raise MissingScore((list(cfg), i))
            out.append(cache[(tuple(cfg), i)])
        return out

    fresh = samples if fresh_samples is None else fresh_samples
    trace: dict = {}
    try:
        coordinate_ascent(score, self_extend_scales(target_length, train_length, num_groups), sorted(set(scales)),
                          list(range(samples)), list(range(samples, samples + fresh)), max_passes, trace=trace)
        trace["pending"] = None
    except MissingScore as e:
        cfg, i = e.args[0]
        trace["pending"] = {"scales": cfg, "sample": i}
    return trace


def sweep_frontier(records: Iterable[dict], *, target_length: int, train_length: int, scales: Sequence[int],
                   samples: int, fresh_samples: Optional[int] = None, max_passes: int = 3, num_groups: int = 8,
                   base: Optional[dict] = None) -> List[Tuple[Tuple[int, ...], int]]:
    """The (configuration, sample) pairs the ascent needs before its next decision that the records do
    not hold, in the order it scores them: the rest of the current group's sweep (every candidate of
    one group is scored before the group's decision, so they can be scored in any order, by any
    number of processes), or the start's sweep samples, or the fresh comparison. Empty when the
    ascent is complete."""
    records = list(records)
    fresh = samples if fresh_samples is None else fresh_samples
    scales = sorted(set(scales))
    trace = replay(records, target_length=target_length, train_length=train_length, scales=scales,
                   samples=samples, fresh_samples=fresh, max_passes=max_passes, num_groups=num_groups, base=base)
    if trace["pending"] is None:
        return []
    have = {(tuple(r["scales"]), r["sample"]) for r in records if base is None or _record_matches(r, base)}
    start = tuple(trace["start"])
    cur = list(start)
    for step in trace["steps"]:
        if step["chosen"] is not None:
            cur[step["group"]] = step["chosen"]
    cur = tuple(cur)
    cfg, i = tuple(trace["pending"]["scales"]), trace["pending"]["sample"]
    sweep_idx, fresh_idx = list(range(samples)), list(range(samples, samples + fresh))
    if i >= samples:  # the final comparison: the final configuration, then the start, on fresh samples
        todo = [(cur, j) for j in fresh_idx] + [(start, j) for j in fresh_idx]
    elif cfg == cur:  # the incumbent's own scores (the start, before the first sweep)
        todo = [(cur, j) for j in sweep_idx]
    else:
        g = next(k for k in range(len(cur)) if cfg[k] != cur[k])
        todo = [(cur[:g] + (s,) + cur[g + 1:], j) for s in scales if s != cur[g] for j in sweep_idx]
    return [x for x in todo if x not in have]


def detect(model, tokenizer, *, target_length: int, train_length: Optional[int] = None,
           scales: Sequence[int] = (1, 2, 4, 8, 16), scorer: str = "passkey-logprob", samples: int = 4,
           fresh_samples: Optional[int] = None, max_passes: int = 3, window: int = 1024, num_groups: int = 8,
           mask: Optional[torch.Tensor] = None, jsonl: Optional[os.PathLike] = None, progress: bool = True,
           seed: int = 0, attention_backend: str = "auto", log=print, worker: bool = False,
           poll_s: float = 20.0, needles: Optional[int] = None) -> Optional[DetectResult]:
    """Step 2: :func:`coordinate_ascent` from the Self-Extend point at ``target_length``.

    With ``needles`` (the ``-logprob`` scorers) a sample is a context of that many needles, each
    scored as if it alone followed the context (:func:`score_sample`); gains are paired per needle
    with cluster-robust standard errors over contexts.

    Samples ``0 .. samples-1`` drive the sweep, ``samples .. samples+fresh_samples-1`` (default
    ``fresh_samples = samples``) are the fresh ones of the final comparison. Every scored
    (configuration, sample) is one record appended to ``jsonl``; a rerun with the same setting
    reads them back and scores only what is missing, so an interrupted calibration resumes (the
    ascent is deterministic given the scores). Returns :class:`DetectResult`.

    More processes can share the work on one ``jsonl`` (same setting): the main one (``worker=False``)
    makes the decisions; each ``worker=True`` process scores the current group's candidates from the
    far end of :func:`sweep_frontier` and returns None when the ascent is complete. Before each
    forward every process rereads the records, and marks what it scores in ``<jsonl>.claims``; a
    process waiting for a (configuration, sample) another live process claimed scores something else
    on the frontier meanwhile, or polls every ``poll_s`` seconds.
    """
    from tqdm.auto import tqdm

    from ..eval.runner import append_record, read_records, resume_records
    from ...integrations.hf import apply_dpe
    from ...integrations.hf import train_length as model_train_length

    if scorer not in SCORERS:
        raise ValueError(f"scorer must be one of {SCORERS}, got {scorer!r}")
    if needles is not None:
        from ..eval.multi import MAX_NEEDLES

        if not is_int(needles) or not 1 <= needles <= MAX_NEEDLES:
            raise ValueError(f"needles must be an int in [1, {MAX_NEEDLES}], got {needles!r}")
        if not scorer.endswith("-logprob"):
            raise ValueError(f"needles applies to the -logprob scorers, got scorer {scorer!r}")
    fresh_samples = samples if fresh_samples is None else fresh_samples
    for name, v in (("target_length", target_length), ("samples", samples), ("window", window),
                    ("num_groups", num_groups), ("max_passes", max_passes), ("fresh_samples", fresh_samples)):
        if not is_int(v) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if samples < 2:
        raise ValueError(f"samples must be >= 2 (a gain is accepted only beyond its standard error), got {samples}")
    if worker and not jsonl:
        raise ValueError("worker=True shares the work through the records: it needs jsonl")
    if not isinstance(poll_s, (int, float)) or isinstance(poll_s, bool) or not poll_s > 0:
        raise ValueError(f"poll_s must be a positive number of seconds, got {poll_s!r}")
    if not scales or any(not is_int(s) or s < 1 for s in scales):
        raise ValueError(f"scales must be positive ints, got {list(scales)!r}")
    scales = sorted(set(scales))
    T = train_length or model_train_length(model)
    _, P, _, _, _ = attention_geometry(model)
    if P % num_groups:
        raise ValueError(f"{P} pairs do not split into {num_groups} equal groups")
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    # Recorded, not part of the setting: float32 scores agree across devices to rounding (the Triton
    # kernels take float32 dots in IEEE precision), so a GPU run resumes a CPU run's records.
    device = next(model.parameters()).device.type
    base = detect_setting(target_length, T, scorer, window, mask, seed, dtype, needles)
    cache: Dict[tuple, dict] = {}

    def load(rs):
        for r in rs:
            if _record_matches(r, base) and len(r["scales"]) == num_groups:
                cache.setdefault((tuple(r["scales"]), r["sample"]), r)

    load(resume_records(jsonl) if jsonl else [])
    claims = Claims(jsonl) if jsonl else None
    records: List[dict] = []
    used = set()
    fresh_idx = list(range(samples, samples + fresh_samples))
    bar = tqdm(desc=f"detect ({scorer} @ {target_length})", unit="run", disable=not progress)
    frontier_kw = dict(target_length=target_length, train_length=T, scales=scales, samples=samples,
                       fresh_samples=fresh_samples, max_passes=max_passes, num_groups=num_groups, base=base)

    def score_one(cfg: Tuple[int, ...], i: int):
        if claims is not None:
            claims.claim(cfg, i)
        bar.set_postfix_str(f"scales {list(cfg)}")
        handle = apply_dpe(model, DPEConfig.uniform(window, list(cfg), P, mask=mask),
                           attention_backend=attention_backend)
        try:
            res = score_sample(model, tokenizer, scorer, target_length, i, T, seed, needles)
        finally:
            handle.remove()
        rec = {**base, "phase": "fresh" if i in fresh_idx else "sweep", "scales": list(cfg),
               "sample": i, **res, "device": device, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        cache[(cfg, i)] = rec
        if jsonl:
            append_record(jsonl, rec)
        bar.update(1)

    def frontier():
        """What the ascent needs next and no record holds yet, and the part of it nobody claimed."""
        todo = [x for x in sweep_frontier(cache.values(), **frontier_kw) if x not in cache]
        taken = claims.live() if claims is not None else set()
        return todo, [x for x in todo if x not in taken]

    def ensure(cfg: Tuple[int, ...], i: int):
        while (cfg, i) not in cache:
            if jsonl:
                load(read_records(jsonl))  # another process's records
                if (cfg, i) in cache:
                    break
            if claims is None or (cfg, i) not in claims.live():
                score_one(cfg, i)
                break
            free = frontier()[1]  # claimed by a live worker: help elsewhere meanwhile
            if free:
                score_one(*free[0])
            else:
                time.sleep(poll_s)

    def score(cfg: Tuple[int, ...], idx: Sequence[int]) -> List[float]:
        for i in idx:
            ensure(cfg, i)
        for i in idx:
            if (cfg, i) not in used:
                used.add((cfg, i))
                records.append(cache[(cfg, i)])
        return [_ascent_score(cache[(cfg, i)]) for i in idx]

    if worker:
        try:
            while True:
                load(read_records(jsonl))
                todo, free = frontier()
                if not todo:
                    if log:
                        log(f"detect worker: the ascent is complete ({len(cache)} records of this setting)")
                    return None
                if not free or free[-1] == todo[0]:  # the main one scores the front
                    time.sleep(poll_s)
                    continue
                score_one(*free[-1])
        finally:
            bar.close()

    trace: dict = {}
    try:
        coordinate_ascent(score, self_extend_scales(target_length, T, num_groups), scales, list(range(samples)),
                          fresh_idx, max_passes, log=log, trace=trace)
    finally:
        bar.close()
    trace.update({"scorer": scorer, "target_length": target_length, "train_length": T, "scales_tried": scales,
                  "window": window, "masked": mask is not None, "dtype": dtype, "seed": seed, "needles": needles})
    if log:
        log(f"detect: kept scales {trace['kept']} (start {trace['start']}, final of the ascent {trace['final']}, "
            f"{trace['passes']} pass(es){', converged' if trace['converged'] else ''}; scorer {scorer}, "
            f"target {target_length})")
    cfg = DPEConfig.uniform(window, trace["kept"], P, mask=mask, calibrated_length=target_length)
    return DetectResult(cfg, records, trace)
