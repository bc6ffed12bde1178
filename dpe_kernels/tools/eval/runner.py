"""Evaluation runner: methods x lengths x depths x samples -> one JSONL record per sample.

The JSONL file is the state: a run that is interrupted and started again with the same
arguments skips every record already written (matched on task, model, prompt format, scoring, model dtype,
method, length, depth and sample index). Records of several invocations (e.g. 4K-16K with 10 samples,
then 32K with 3) can share one file; the report reads them all.

With ``skip_zero`` (default) a method that scored 0 on every sample at some length is not run
at longer lengths of the same task: one ``{"skipped": true, "reason": ...}`` record per
(method, length) says so, and the table shows it.

Scoring of the retrieval tasks (``EvalSpec.scoring``): ``generate`` (greedy decoding, the
answer's first number / the values found in it), ``logprob`` (teacher-forced, one forward, no
generation: the answer's log-probability and exact match from the same pass, see
:mod:`.logprob`; ``score`` is the exact-match score) or ``both`` (``score`` from generation, the
teacher-forced fields beside it as ``logprob``, ``tf_score``, ``tf_correct``, ...).

``needles`` (passkey / niah with ``logprob`` scoring): N labelled needles per context, each question
scored as if it alone followed the context (:mod:`.multi`); the context of (depth, sample) holds
needle j at depth ``(j + depth) / N`` and yields N records (``needle`` 0..N-1), one per question.
Without it (None) the single-needle prompts above.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from ...config import DPEConfig
from . import methods as M
from .generate import greedy_generate
from .logprob import niah_logprob, passkey_logprob
from .multi import multi_logprob
from .niah import NIAH_MAX_NEW_TOKENS, niah_prompt, niah_sample, score_niah
from .passkey import PASSKEY_MAX_NEW_TOKENS, passkey_key, passkey_prompt, passkey_stop, score_passkey
from .perplexity import bucket_means, loss_by_position, ppl_tokens

__all__ = ["TASKS", "SCORINGS", "EvalSpec", "run_eval", "read_records", "resume_records", "append_record", "record_key",
           "parse_depths", "DEFAULT_FORMAT"]

TASKS = ("passkey", "niah", "ppl")
SCORINGS = ("generate", "logprob", "both")
# Chosen by measurement on SmolLM2-135M-Instruct with plain RoPE at 4K and 8K (see the README).
DEFAULT_FORMAT = "raw"


def parse_depths(values: Sequence[str]) -> List[float]:
    """``["5"]`` -> 5 evenly spaced depths 0..1; ``["0.1", "0.5"]`` -> those depths."""
    vals = [str(v) for v in values]
    if len(vals) == 1 and vals[0].isdigit():
        n = int(vals[0])
        if n < 1:
            raise ValueError("the number of depths must be >= 1")
        return [0.5] if n == 1 else [round(i / (n - 1), 4) for i in range(n)]
    out = [float(v) for v in vals]
    if not all(0.0 <= d <= 1.0 for d in out):
        raise ValueError(f"depths must be in [0, 1], got {out}")
    return out


@dataclass
class EvalSpec:
    task: str = "passkey"
    methods: Sequence[str] = ("rope", "dpe")
    lengths: Sequence[int] = (4096,)
    depths: Sequence[float] = (0.5,)
    samples: int = 1                      # keys per (length, depth); text samples for ppl
    fmt: str = DEFAULT_FORMAT
    haystack: Optional[str] = None        # passkey: "filler", niah: "essays" (defaults)
    model_name: str = "smollm2"
    train_length: Optional[int] = None    # default: from the model config
    target_length: Optional[int] = None   # default: each length is its own target
    dpe_preset: str = "auto"
    dpe_config: Optional[DPEConfig] = None
    dpe_mask: Optional[torch.Tensor] = None   # key-dimension mask [L, H, P] put on the DPE config
    skip_zero: bool = True
    seed: int = 0
    bucket: int = 1024                    # ppl bucket size in tokens
    scoring: str = "generate"             # passkey / niah: generate, logprob or both (see the module doc)
    needles: Optional[int] = None         # logprob scoring: N labelled needles per context (module doc)

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {self.scoring!r}")
        bad = [m for m in self.methods if m not in M.METHODS]
        if bad:
            raise ValueError(f"unknown methods {bad}; choose from {M.METHODS}")
        self.lengths = sorted(int(x) for x in self.lengths)
        if self.haystack is None:
            self.haystack = "essays" if self.task == "niah" else "filler"
        if self.needles is not None and (self.task == "ppl" or self.scoring != "logprob"):
            raise ValueError(f"needles applies to the passkey / niah tasks with logprob scoring, got task "
                             f"{self.task!r}, scoring {self.scoring!r}")


def record_key(r: dict) -> tuple:
    """What identifies a sample; records written before scoring and dtype were recorded count as
    greedy generation in float32 (all of them were)."""
    depth = r.get("depth")
    return (r.get("task"), r.get("model"), r.get("format"), r.get("scoring", "generate"),
            r.get("dtype", "float32"), r.get("method"), int(r.get("length", 0)),
            None if depth is None else round(float(depth), 4), r.get("sample"), r.get("needles"), r.get("needle"))


def read_records(path) -> List[dict]:
    """All records of a JSONL file (a truncated last line from an interrupted run is ignored)."""
    out = []
    p = Path(path)
    if not p.is_file():
        return out
    with open(p, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def resume_records(path) -> List[dict]:
    """The records of a JSONL file about to be appended to: a last line cut by an interruption is
    ended first, so the next record does not join it (and get lost with it)."""
    p = Path(path)
    if p.is_file() and p.stat().st_size:
        with open(p, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
    return read_records(p)


def append_record(path, rec: dict):
    """Append one record (one line, flushed to disk) to a JSONL file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _zero_at_shorter(records: Iterable[dict], spec: EvalSpec, method: str, length: int,
                     dtype: str = "float32") -> Optional[int]:
    """The shortest length below ``length`` where ``method`` scored 0 on every sample, if any."""
    by_len: Dict[int, List[float]] = {}
    fmt = "text" if spec.task == "ppl" else spec.fmt
    same = {"task": spec.task, "model": spec.model_name, "format": fmt}
    for r in records:
        if (all(r.get(k) == v for k, v in same.items()) and r.get("method") == method
                and r.get("scoring", "generate") == spec.scoring and r.get("dtype", "float32") == dtype
                and not r.get("skipped") and int(r["length"]) < length):
            by_len.setdefault(int(r["length"]), []).append(float(r["score"]))
    zeros = [L for L, s in by_len.items() if s and max(s) == 0.0]
    return min(zeros) if zeros else None


def _plan(spec: EvalSpec):
    """[(depth, sample)] of one (method, length)."""
    if spec.task == "ppl":
        return [(None, i) for i in range(spec.samples)]
    return [(round(float(d), 4), i) for d in spec.depths for i in range(spec.samples)]


def _teacher_forced(model, tokenizer, spec: EvalSpec, length: int, depth, sample: int) -> dict:
    if spec.task == "passkey":
        return passkey_logprob(model, tokenizer, length, depth, passkey_key(sample, spec.seed), spec.fmt,
                               spec.haystack)
    key, values = niah_sample(sample, spec.seed)
    return niah_logprob(model, tokenizer, length, depth, key, values, spec.fmt, spec.haystack)


def _run_one(model, tokenizer, spec: EvalSpec, length: int, depth, sample: int):
    """One record body, or a list of them (one per needle) with ``spec.needles``."""
    if spec.needles is not None:
        return multi_logprob(model, tokenizer, spec.task, length, depth, spec.needles, sample, spec.seed,
                             spec.fmt, spec.haystack)
    if spec.task != "ppl" and spec.scoring == "logprob":
        return _teacher_forced(model, tokenizer, spec, length, depth, sample)
    if spec.task != "ppl" and spec.scoring == "both":
        gen = _run_one(model, tokenizer, dataclasses.replace(spec, scoring="generate"), length, depth, sample)
        tf = _teacher_forced(model, tokenizer, spec, length, depth, sample)
        keep = ("logprob", "span_logprobs", "span_exact", "answer_tokens", "answer_spans", "token_logprobs",
                "token_argmax")
        return {**gen, **{k: tf[k] for k in keep}, "tf_score": tf["score"], "tf_correct": tf["correct"],
                "tf_seconds": tf["seconds"], "scoring": "both"}
    if spec.task == "passkey":
        key = passkey_key(sample, spec.seed)
        p = passkey_prompt(tokenizer, length, depth, key, spec.fmt, spec.haystack)
        text, _, dt = greedy_generate(model, tokenizer, p.tensor(), PASSKEY_MAX_NEW_TOKENS, stop=passkey_stop)
        score = score_passkey(text, key)
        return {"answer": str(key), "output": text, "score": score, "correct": bool(score == 1.0),
                "seconds": round(dt, 3), "prompt_tokens": len(p), "needle_positions": p.needle_positions}
    if spec.task == "niah":
        key, values = niah_sample(sample, spec.seed)
        p = niah_prompt(tokenizer, length, depth, key, values, spec.fmt, spec.haystack)

        def stop(t, values=values):
            return all(v in t for v in values) or "\n\n" in t
        text, _, dt = greedy_generate(model, tokenizer, p.tensor(), NIAH_MAX_NEW_TOKENS, stop=stop)
        score = score_niah(text, values)
        return {"answer": values, "needle_key": key, "output": text, "score": score,
                "correct": bool(score == 1.0), "seconds": round(dt, 3), "prompt_tokens": len(p),
                "needle_positions": p.needle_positions}
    ids = ppl_tokens(tokenizer, length, sample)
    t0 = time.perf_counter()
    losses = loss_by_position(model, torch.tensor([ids]))
    dt = time.perf_counter() - t0
    buckets = bucket_means(losses, spec.bucket)
    mean = float(losses.mean())
    return {"score": mean, "loss": mean, "bucket": spec.bucket, "bucket_losses": [round(x, 5) for x in buckets],
            "seconds": round(dt, 3), "prompt_tokens": len(ids)}


def device_name(model) -> str:
    """Where the model runs, for the records: "cpu (N cores)" or the GPU's name."""
    dev = next(model.parameters()).device
    if dev.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(dev)}"
    return f"{dev.type} ({os.cpu_count()} cores)"


def run_eval(model, tokenizer, spec: EvalSpec, out_path, *, progress: bool = True, log=None) -> List[dict]:
    """Run (or resume) ``spec``; append one record per sample to ``out_path``; return the new records."""
    from tqdm.auto import tqdm

    from ...integrations.hf import train_length as model_train_length

    out_path = Path(out_path)
    existing = resume_records(out_path)
    done = {record_key(r) for r in existing}
    all_records = list(existing)
    T = spec.train_length or model_train_length(model)
    plan = _plan(spec)
    total = len(spec.methods) * len(spec.lengths) * len(plan)
    new: List[dict] = []
    bar = tqdm(total=total, desc=f"{spec.task}", unit="sample", disable=not progress, dynamic_ncols=True)
    write = log or bar.write
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    base = {"task": spec.task, "model": spec.model_name,
            "format": "text" if spec.task == "ppl" else spec.fmt, "haystack": spec.haystack,
            "train_length": T, "seed": spec.seed, "device": device_name(model), "dtype": dtype}
    if spec.task != "ppl":
        base["scoring"] = spec.scoring
    needle_ids = [None] if spec.needles is None else list(range(spec.needles))
    if spec.needles is not None:
        base["needles"] = spec.needles
    try:
        # Length-major: every method at the shortest length first, so an interrupted run has
        # comparable rows for all methods (skip-after-0 only needs the shorter lengths done).
        for length in spec.lengths:
            for method in spec.methods:
                todo = [(d, i) for d, i in plan
                        if any(record_key({**base, "method": method, "length": length, "depth": d, "sample": i,
                                           "needle": j}) not in done for j in needle_ids)]
                skip_key = record_key({**base, "method": method, "length": length, "depth": None,
                                       "sample": None})
                if skip_key in done and spec.skip_zero:
                    todo = []
                bar.update(len(plan) - len(todo))
                if not todo:
                    continue
                if spec.skip_zero and spec.task != "ppl":
                    z = _zero_at_shorter(all_records, spec, method, length, dtype)
                    if z is not None:
                        rec = {**base, "method": method, "length": length, "depth": None, "sample": None,
                               "skipped": True, "reason": f"scored 0 at {z}"}
                        append_record(out_path, rec)
                        done.add(skip_key)
                        all_records.append(rec)
                        new.append(rec)
                        write(f"{method} @ {length}: skipped (scored 0 at {z})")
                        bar.update(len(todo))
                        continue
                kw = M.method_kwargs(model, method, length, T, target_length=spec.target_length,
                                     dpe_preset=spec.dpe_preset, dpe_config=spec.dpe_config,
                                     dpe_mask=spec.dpe_mask)
                params = M.describe(method, kw)
                handle = M.apply(model, method, kw)
                scores, secs, lps = [], [], []
                try:
                    for depth, sample in todo:
                        bar.set_postfix_str(f"{method} {length} d={depth} s={sample}")
                        got = _run_one(model, tokenizer, spec, length, depth, sample)
                        for res in (got if isinstance(got, list) else [got]):
                            rec = {**base, "method": method, "params": params, "length": length, "depth": depth,
                                   "sample": sample, **res, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
                            if record_key(rec) in done:  # a context cut off while its needles were written
                                continue
                            append_record(out_path, rec)
                            done.add(record_key(rec))
                            all_records.append(rec)
                            new.append(rec)
                            scores.append(res["score"])
                            secs.append(res["seconds"])
                            if "logprob" in res:
                                lps.append(res["logprob"])
                        bar.update(1)
                finally:
                    handle.remove()
                    gc.collect()
                lp = f", mean log-prob {sum(lps) / len(lps):.3f}" if lps else ""
                write(f"{spec.task} {method} @ {length} ({params}): mean score "
                      f"{sum(scores) / len(scores):.3f}{lp} over {len(scores)} new samples, "
                      f"{sum(secs) / len(secs):.1f} s/sample")
    finally:
        bar.close()
    return new
