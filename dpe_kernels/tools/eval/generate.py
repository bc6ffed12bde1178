"""Greedy decoding through ``model.generate`` (so DPE's cache integration is what runs)."""
from __future__ import annotations

import time
from typing import Callable, List, Optional, Tuple

import torch

__all__ = ["greedy_generate"]


def _eos_ids(model, tokenizer) -> List[int]:
    ids = set()
    for src in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        e = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, (list, tuple)):
            ids.update(int(x) for x in e)
    return sorted(ids)


def greedy_generate(model, tokenizer, input_ids: torch.Tensor, max_new_tokens: int,
                    stop: Optional[Callable[[str], bool]] = None) -> Tuple[str, List[int], float]:
    """(decoded new text, new token ids, seconds) for greedy decoding of one prompt [1, S].

    ``stop(text_so_far)`` ends decoding early (checked after every token)."""
    from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    n_in = input_ids.shape[1]
    eos = _eos_ids(model, tokenizer)
    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                               eos_token_id=eos or None, pad_token_id=(eos[0] if eos else 0))
    criteria = StoppingCriteriaList()
    if stop is not None:
        class _Stop(StoppingCriteria):
            def __call__(self, ids, scores, **kw):
                done = stop(tokenizer.decode(ids[0, n_in:].tolist(), skip_special_tokens=True))
                return torch.full((ids.shape[0],), bool(done), dtype=torch.bool, device=ids.device)
        criteria.append(_Stop())
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "exceeded the model's predefined maximum length": the point here
    try:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                 generation_config=gen_cfg, stopping_criteria=criteria)
        dt = time.perf_counter() - t0
    finally:
        hf_logging.set_verbosity(verbosity)
    new = out[0, n_in:].tolist()
    return tokenizer.decode(new, skip_special_tokens=True), new, dt
