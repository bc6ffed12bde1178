"""The paper's two detection steps (../shared/SPEC.md, "Finding the configuration") as tools
that work for any Hugging Face RoPE model with Llama-style attention (q_proj / k_proj).

Step 1, key dimensions (:func:`select_dims`): run the model over essay text at several
lengths; forward hooks on every layer's ``q_proj`` and ``k_proj`` see the pre-RoPE q and k
and accumulate ``C[l, h, i] = mean_t ||q_t^(i)|| * ||k_t^(i)||`` (k from KV head
``h // n_rep``) while the forward runs: a layer's q is held only until its k arrives, reduced
to a ``[H_q, P]`` sum at once, and freed, so no q/k tensor outlives its layer. Scores are the
mean over samples and lengths; the key dimensions of ``(l, h)`` are its top-k pairs.
Written to safetensors: ``scores`` ``[L, H_q, P]``, ``mask`` (top-k per query head),
``scores_kv`` ``[L, H_k, P]`` (mean of the scores of a KV head's query heads) and ``mask_kv``.

Step 2, effective length per group (:func:`detect`): with the window and the mask fixed,
sweep one group's scale at a time over ``{1, 2, 4, ...}`` while every other group stays at
``2 * target / train`` (rounded up to an integer); each configuration is scored at the target
length, one JSONL record per (group, scale, sample) so an interrupted sweep resumes. Each
group keeps its best scale. Tie-break (documented, deterministic): the highest mean score
wins; among equal scores the scale closest to the others' default ``2 * target / train``
(in log2 distance) wins, and among those the smaller scale. A configuration met twice (every
group at the default scale) is scored once.

Scorers: ``passkey`` (exact key), ``niah`` (4-needle recall fraction), ``ppl`` (minus the mean
next-token loss over the positions beyond the pre-training length: a cheap proxy, one forward
pass per sample, no generation).
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from ..config import DPEConfig

__all__ = ["key_dimension_scores", "top_k_masks", "select_dims", "load_dims_mask", "default_top_k",
           "sweep_configs", "pick_scales", "detect", "SCORERS"]

SCORERS = ("ppl", "passkey", "niah")


# --------------------------------------------------------------------------- step 1
def _pairs(x: torch.Tensor, num_pairs: int, layout: str) -> torch.Tensor:
    """Per-pair 2-norms ``[..., P]`` of ``[..., D]`` head vectors (neox: (i, i+P); gptj: (2i, 2i+1))."""
    x = x.float()
    if layout == "neox":
        a, b = x[..., :num_pairs], x[..., num_pairs:2 * num_pairs]
    else:
        a, b = x[..., 0:2 * num_pairs:2], x[..., 1:2 * num_pairs:2]
    return torch.sqrt(a * a + b * b)


def _geometry(model):
    from ..integrations.hf import find_attention_modules, find_rotary_embedding

    attn = find_attention_modules(model)
    _, rotary = find_rotary_embedding(model)
    d = attn[0].head_dim
    hq = attn[0].q_proj.out_features // d
    hk = attn[0].k_proj.out_features // d
    return attn, int(rotary.inv_freq.shape[-1]), hq, hk, d


def key_dimension_scores(model, batches: Iterable[torch.Tensor], *, layout: str = "neox",
                         progress: bool = False, total: Optional[int] = None) -> torch.Tensor:
    """``C[l, h, i]``, float64 ``[num_layers, H_q, P]``: for every input ``[1, S]`` of ``batches``,
    ``mean_t ||q_t^(i)|| ||k_t^(i)||`` of the pre-RoPE q and k; then the mean over the inputs."""
    from tqdm.auto import tqdm

    if layout not in ("neox", "gptj"):
        raise ValueError(f"layout must be 'neox' or 'gptj', got {layout!r}")
    attn, P, hq, hk, d = _geometry(model)
    if hq % hk:
        raise ValueError(f"H_q={hq} is not a multiple of H_k={hk}")
    rep = hq // hk
    L = len(attn)
    total_scores = torch.zeros(L, hq, P, dtype=torch.float64)
    run = torch.zeros(L, hq, P, dtype=torch.float64)
    pending: Dict[int, torch.Tensor] = {}
    handles = []

    def q_hook(layer):
        def hook(module, args, out):
            pending[layer] = _pairs(out.detach().view(*out.shape[:-1], hq, d), P, layout)  # [B, S, H_q, P]
        return hook

    def k_hook(layer):
        def hook(module, args, out):
            qn = pending.pop(layer, None)
            if qn is None:
                raise RuntimeError(f"layer {layer}: k_proj ran before q_proj; cannot pair q with k")
            kn = _pairs(out.detach().view(*out.shape[:-1], hk, d), P, layout)  # [B, S, H_k, P]
            prod = qn.view(*qn.shape[:-2], hk, rep, P) * kn[..., :, None, :]
            run[layer] += prod.sum(dim=tuple(range(prod.dim() - 3))).reshape(hq, P).double()
        return hook

    try:
        for i, m in enumerate(attn):
            handles.append(m.q_proj.register_forward_hook(q_hook(i)))
            handles.append(m.k_proj.register_forward_hook(k_hook(i)))
        n = 0
        device = next(model.parameters()).device
        with torch.inference_mode():
            for ids in tqdm(batches, desc="select-dims", unit="text", total=total, disable=not progress):
                if ids.dim() != 2 or ids.shape[0] != 1:
                    raise ValueError(f"each input must be [1, S] token ids, got {list(ids.shape)}")
                run.zero_()
                model(input_ids=ids.to(device), use_cache=False)
                total_scores += run / ids.shape[1]
                n += 1
        if n == 0:
            raise ValueError("no input texts were given")
    finally:
        for h in handles:
            h.remove()
        pending.clear()
    return total_scores / n


def default_top_k(num_pairs: int) -> int:
    """The paper's 48 of 64 pairs, as a fraction: round(0.75 P)."""
    return max(1, round(0.75 * num_pairs))


def top_k_masks(scores: torch.Tensor, top_k: int, heads_k: int) -> Dict[str, torch.Tensor]:
    """Top-k masks per query head and per KV head from ``scores [L, H_q, P]``."""
    if scores.dim() != 3:
        raise ValueError(f"scores must be [num_layers, H_q, P], got {list(scores.shape)}")
    L, hq, P = scores.shape
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= P:
        raise ValueError(f"top_k must be an int in [1, {P}], got {top_k!r}")
    if heads_k < 1 or hq % heads_k:
        raise ValueError(f"heads_k must divide H_q={hq}, got {heads_k}")

    def mask_of(s):
        idx = s.topk(top_k, dim=-1).indices
        return torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, True)

    scores_kv = scores.view(L, heads_k, hq // heads_k, P).mean(2)
    return {"scores": scores.float(), "mask": mask_of(scores), "scores_kv": scores_kv.float(),
            "mask_kv": mask_of(scores_kv)}


def select_dims(model, tokenizer, *, lengths: Sequence[int] = (1024, 2048, 4096), samples: int = 2,
                top_k: Optional[int] = None, out: Optional[os.PathLike] = None, layout: str = "neox",
                progress: bool = True) -> Dict[str, torch.Tensor]:
    """Step 1 over the essays: ``samples`` texts at each of ``lengths``; writes safetensors to ``out``."""
    from .eval.perplexity import ppl_tokens

    for name, v in (("samples", samples),):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not lengths or any(not isinstance(x, int) or isinstance(x, bool) or x < 2 for x in lengths):
        raise ValueError(f"lengths must be ints >= 2, got {list(lengths)!r}")
    _, P, hq, hk, _ = _geometry(model)
    top_k = default_top_k(P) if top_k is None else top_k
    texts = ((L, s) for L in lengths for s in range(samples))
    batches = (torch.tensor([ppl_tokens(tokenizer, L, s)]) for L, s in texts)
    scores = key_dimension_scores(model, batches, layout=layout, progress=progress,
                                  total=len(lengths) * samples)
    res = top_k_masks(scores, top_k, hk)
    if out is not None:
        from safetensors.torch import save_file

        meta = {"lengths": json.dumps(list(lengths)), "samples": str(samples), "top_k": str(top_k),
                "layout": layout, "num_layers": str(scores.shape[0]), "heads_q": str(hq), "heads_k": str(hk),
                "num_pairs": str(P), "definition": "C[l,h,i] = mean_t |q_t^(i)| |k_t^(i)| (pre-RoPE), "
                                                  "averaged over texts; mask = top_k pairs"}
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in res.items()}, str(out), metadata=meta)
    return res


def load_dims_mask(path: os.PathLike, which: str = "q") -> torch.Tensor:
    """The bool mask ``[L, H, P]`` of a select-dims file: ``which`` = "q" (per query head) or "kv"."""
    from safetensors.torch import load_file

    if which not in ("q", "kv"):
        raise ValueError(f"which must be 'q' or 'kv', got {which!r}")
    t = load_file(str(path))
    key = "mask" if which == "q" else "mask_kv"
    if key not in t:
        raise ValueError(f"{path} holds no {key!r} tensor (not a `dpe select-dims` file?)")
    return t[key].bool()


# --------------------------------------------------------------------------- step 2
def default_sweep_scale(target_length: int, train_length: int) -> int:
    """The scale of the groups not being swept: 2 * target / train, rounded up, at least 1."""
    return max(1, math.ceil(2 * target_length / train_length))


def sweep_configs(num_groups: int, scales: Sequence[int], default: int) -> List[Tuple[int, int, Tuple[int, ...]]]:
    """(group, scale, all scales) of the sweep, in order; a repeated configuration appears once per
    (group, scale) but :func:`detect` scores it once."""
    out = []
    for g in range(num_groups):
        for s in scales:
            sc = [default] * num_groups
            sc[g] = s
            out.append((g, s, tuple(sc)))
    return out


def pick_scales(records: Iterable[dict], num_groups: int, scales: Sequence[int], default: int) -> List[int]:
    """Best scale per group from sweep records (see the module docstring for the tie-break)."""
    by_cfg: Dict[tuple, List[float]] = {}
    for r in records:
        by_cfg.setdefault(tuple(r["scales"]), []).append(float(r["score"]))
    best = []
    for g in range(num_groups):
        cands = []
        for s in scales:
            sc = [default] * num_groups
            sc[g] = s
            vals = by_cfg.get(tuple(sc))
            if vals:
                cands.append((sum(vals) / len(vals), -abs(math.log2(s) - math.log2(default)), -s, s))
        if not cands:
            raise ValueError(f"no sweep records for group {g}")
        best.append(max(cands)[3])
    return best


def _score_one(model, tokenizer, scorer: str, length: int, sample: int, train_length: int, seed: int) -> float:
    from .eval.generate import greedy_generate

    if scorer == "ppl":
        from .eval.perplexity import loss_by_position, ppl_tokens

        ids = torch.tensor([ppl_tokens(tokenizer, length, sample)])
        losses = loss_by_position(model, ids)
        return -float(losses[train_length:].mean()) if losses.shape[0] > train_length else -float(losses.mean())
    depth = (sample % 5) / 4 if scorer == "passkey" else (sample % 3) / 2
    if scorer == "passkey":
        from .eval.passkey import PASSKEY_MAX_NEW_TOKENS, passkey_key, passkey_prompt, passkey_stop, score_passkey

        key = passkey_key(sample, seed)
        p = passkey_prompt(tokenizer, length, depth, key, "raw")
        text, _, _ = greedy_generate(model, tokenizer, p.tensor(), PASSKEY_MAX_NEW_TOKENS, stop=passkey_stop)
        return score_passkey(text, key)
    from .eval.niah import NIAH_MAX_NEW_TOKENS, niah_prompt, niah_sample, score_niah

    key, values = niah_sample(sample, seed)
    p = niah_prompt(tokenizer, length, depth, key, values, "raw", None)
    text, _, _ = greedy_generate(model, tokenizer, p.tensor(), NIAH_MAX_NEW_TOKENS)
    return score_niah(text, values)


def detect(model, tokenizer, *, target_length: int, train_length: Optional[int] = None,
           scales: Sequence[int] = (1, 2, 4, 8, 16), scorer: str = "ppl", samples: int = 1,
           window: int = 1024, num_groups: int = 8, mask: Optional[torch.Tensor] = None,
           jsonl: Optional[os.PathLike] = None, progress: bool = True, seed: int = 0,
           attention_backend: str = "auto", log=print) -> Tuple[DPEConfig, List[dict]]:
    """Step 2: the per-group scale sweep at ``target_length``; returns (config, records)."""
    from tqdm.auto import tqdm

    from .eval.runner import append_record, resume_records
    from ..integrations.hf import apply_dpe
    from .models import train_length as model_train_length

    if scorer not in SCORERS:
        raise ValueError(f"scorer must be one of {SCORERS}, got {scorer!r}")
    for name, v in (("target_length", target_length), ("samples", samples), ("window", window),
                    ("num_groups", num_groups)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not scales or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in scales):
        raise ValueError(f"scales must be positive ints, got {list(scales)!r}")
    scales = sorted(set(scales))
    T = train_length or model_train_length(model)
    default = default_sweep_scale(target_length, T)
    _, P, _, _, _ = _geometry(model)
    if P % num_groups:
        raise ValueError(f"{P} pairs do not split into {num_groups} equal groups")
    base = {"target_length": target_length, "train_length": T, "scorer": scorer, "window": window,
            "masked": mask is not None, "seed": seed}
    done: Dict[tuple, dict] = {}
    records: List[dict] = []
    for r in resume_records(jsonl) if jsonl else []:
        if all(r.get(k) == v for k, v in base.items()):
            done[(tuple(r["scales"]), r["sample"])] = r
    plan = []
    seen = set()
    for g, s, sc in sweep_configs(num_groups, scales, default):
        if sc not in seen:
            seen.add(sc)
            plan += [(g, s, sc, i) for i in range(samples)]
    bar = tqdm(total=len(plan), desc=f"detect ({scorer} @ {target_length})", unit="run", disable=not progress)
    try:
        for g, s, sc, i in plan:
            if (sc, i) in done:
                records.append(done[(sc, i)])
                bar.update(1)
                continue
            bar.set_postfix_str(f"group {g} scale {s} sample {i}")
            cfg = DPEConfig.uniform(window, list(sc), P, mask=mask)
            handle = apply_dpe(model, cfg, attention_backend=attention_backend)
            t0 = time.perf_counter()
            try:
                score = _score_one(model, tokenizer, scorer, target_length, i, T, seed)
            finally:
                handle.remove()
            rec = {**base, "group": g, "scale": s, "scales": list(sc), "sample": i, "score": score,
                   "seconds": round(time.perf_counter() - t0, 2)}
            records.append(rec)
            if jsonl:
                append_record(jsonl, rec)
            bar.update(1)
    finally:
        bar.close()
    best = pick_scales(records, num_groups, scales, default)
    if log:
        log(f"detect: best scales {best} (others' default {default}, scorer {scorer}, target {target_length})")
    return DPEConfig.uniform(window, best, P, mask=mask), records
