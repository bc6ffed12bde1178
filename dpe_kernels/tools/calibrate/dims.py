"""Calibration step 1, key dimensions (docs/method.md, "The key-dimension mask and the configuration
search"): score every (layer, head, pair) by ``mean_t ||q_t^(i)|| * ||k_t^(i)||`` of the pre-RoPE
q and k, keep the top-k pairs per head, write / read the safetensors file (:func:`select_dims`,
:func:`load_dims_mask`). Not the scale search: that is :mod:`.ascent`."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence

import torch

__all__ = ["attention_geometry", "key_dimension_scores", "default_top_k", "top_k_masks", "select_dims",
           "load_dims_mask"]


def _pairs(x: torch.Tensor, num_pairs: int, layout: str) -> torch.Tensor:
    """Per-pair 2-norms ``[..., P]`` of ``[..., D]`` head vectors (neox: (i, i+P); gptj: (2i, 2i+1))."""
    x = x.float()
    if layout == "neox":
        a, b = x[..., :num_pairs], x[..., num_pairs:2 * num_pairs]
    else:
        a, b = x[..., 0:2 * num_pairs:2], x[..., 1:2 * num_pairs:2]
    return torch.sqrt(a * a + b * b)


def attention_geometry(model):
    """(attention modules, rotated pairs P, H_q, H_k, head_dim) of a Hugging Face RoPE model."""
    from ...integrations.hf import find_attention_modules, find_rotary_embedding

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
    attn, P, hq, hk, d = attention_geometry(model)
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
    from ..eval.perplexity import ppl_tokens

    for name, v in (("samples", samples),):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not lengths or any(not isinstance(x, int) or isinstance(x, bool) or x < 2 for x in lengths):
        raise ValueError(f"lengths must be ints >= 2, got {list(lengths)!r}")
    _, P, hq, hk, _ = attention_geometry(model)
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
