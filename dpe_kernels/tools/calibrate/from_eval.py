"""The ascent's start from evaluation records: with N needles per context a calibration context is
an evaluation prompt (:func:`~..eval.multi.series_context`: context i is ``dpe eval --needles N``'s
sample ``i // M`` at depth shift ``(i % M + 0.5) / M``), and the start, every group at Self-Extend's
scale with the calibration's window, is ``dpe eval``'s ``self_extend`` at the target when its group
size and window are the same. So the start's context scores can be read from the evaluation's
records (a quality grid's, say) instead of scored again: :func:`start_records_from_eval`."""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional

from ..eval.multi import series_shifts
from .ascent import detect_setting, self_extend_scales

__all__ = ["start_records_from_eval"]


def start_records_from_eval(eval_records: Iterable[dict], *, scorer: str, target_length: int, train_length: int,
                            window: int, num_groups: int, needles: int, samples: int, fresh_samples: int,
                            seed: int = 0, dtype: str = "float32", model: Optional[str] = None,
                            skip: Iterable[int] = ()) -> List[dict]:
    """Detect records of the Self-Extend start for the contexts ``0 .. samples + fresh_samples - 1``
    (the first ``samples`` the sweep's, the rest fresh) not in ``skip``, built from the ``dpe eval``
    records among ``eval_records`` that score the same prompts with the same forward: the task of
    ``scorer`` (``passkey-logprob`` -> passkey), logprob scoring, raw format and the task's own
    haystack, ``needles`` per context, method self_extend with group size
    ``2 * ceil(target_length / train_length)`` and ``window``, length ``target_length``, the same
    seed, dtype and pre-training length (and ``model`` when given). A context is taken only with
    all of its needles; the first record met of a needle wins. Each record says where it came from
    (``copied_from``: the eval record's ``source`` when the caller put one there)."""
    if not scorer.endswith("-logprob"):
        raise ValueError(f"evaluation records hold teacher-forced scores: scorer must be a -logprob one, got {scorer!r}")
    task = scorer.split("-")[0]
    start = self_extend_scales(target_length, train_length, num_groups)
    g = start[0]
    want = {"task": task, "format": "raw", "haystack": "essays" if task == "niah" else "filler",
            "scoring": "logprob", "dtype": dtype, "method": "self_extend", "params": f"G {g}, w {window}",
            "length": target_length, "needles": needles, "seed": seed, "train_length": train_length}
    if model is not None:
        want["model"] = model
    m, total, skip = series_shifts(needles), samples + fresh_samples, set(skip)
    found: Dict[int, Dict[int, dict]] = {}
    for r in eval_records:
        if r.get("skipped") or any(r.get(k) != v for k, v in want.items()):
            continue
        k = round(float(r["depth"]) * m - 0.5)
        if abs((k + 0.5) / m - float(r["depth"])) > 1e-9:
            continue  # not one of the series' depth shifts
        i = int(r["sample"]) * m + k
        if i < total and i not in skip:
            found.setdefault(i, {}).setdefault(int(r["needle"]), r)
    setting = detect_setting(target_length, train_length, scorer, window, None, seed, dtype, needles)
    out = []
    for i in sorted(found):
        if sorted(found[i]) != list(range(needles)):
            continue
        rs = [found[i][j] for j in range(needles)]
        lps = [float(r["logprob"]) for r in rs]
        out.append({**setting, "phase": "fresh" if i >= samples else "sweep", "scales": list(start), "sample": i,
                    "score": sum(lps) / needles, "needle_scores": lps,
                    "exact": sum(float(r["score"]) for r in rs) / needles,
                    "needle_exact": [float(r["score"]) for r in rs], "needle_depths": [r["needle_depth"] for r in rs],
                    "answers": [r["answer"] for r in rs], "labels": [r["needle_label"] for r in rs],
                    "context_tokens": rs[0]["context_tokens"], "context_seconds": rs[0]["context_seconds"],
                    "seconds": round(sum(float(r["seconds"]) for r in rs), 2), "device": rs[0].get("device"),
                    "time": rs[0].get("time"), "copied_from": rs[0].get("source", "dpe eval records")})
    return out
