"""Loss by position: one forward over ``length`` tokens of the essays, the next-token loss of every
position, averaged per bucket of ``bucket`` tokens (1K by default). The logits are formed in
chunks (a 32K x 49K float32 logit matrix would need 6 GB)."""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from .data import load_essays
from .prompts import encode, format_pieces

__all__ = ["ppl_tokens", "loss_by_position", "bucket_means", "backbone_and_head", "head_logits"]

_LOGIT_CHUNK = 2048


def ppl_tokens(tokenizer, length: int, sample: int = 0) -> List[int]:
    """``length`` tokens of the essays, sample ``i`` starting ``i`` x 100K characters in (at a line start)."""
    text = load_essays()
    start = 0
    if sample:
        start = text.find("\n", sample * 100_000)
        start = 0 if start < 0 else start + 1
    prefix, _ = format_pieces(tokenizer, "raw")
    chars = 6 * length + 4096
    while True:
        ids = list(prefix) + encode(tokenizer, text[start:start + chars])
        if len(ids) >= length or start + chars >= len(text):
            break
        chars *= 2
    if len(ids) < length:
        raise ValueError(f"not enough essay text for {length} tokens from sample {sample}")
    return ids[:length]


def backbone_and_head(model):
    """(decoder stack, output embedding) of a ``*ForCausalLM`` model: the hidden states are formed
    once and only the rows that are scored go through the (vocabulary-wide) head."""
    base = getattr(model, "model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is None or head is None:
        raise ValueError("scoring needs a *ForCausalLM model with .model and an output embedding")
    return base, head


def head_logits(model, head, hidden: torch.Tensor) -> torch.Tensor:
    """float32 logits of ``hidden`` rows (the model's final logit soft-capping applied, if any)."""
    logits = head(hidden).float()
    soft_cap = getattr(model.config, "final_logit_softcapping", None)
    if soft_cap:
        logits = torch.tanh(logits / soft_cap) * soft_cap
    return logits


def loss_by_position(model, input_ids: torch.Tensor) -> torch.Tensor:
    """float32 [S - 1]: the loss of predicting token t + 1 from tokens 0..t."""
    base, head = backbone_and_head(model)
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    with torch.inference_mode():
        hidden = base(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False)[0]
        hidden = hidden[0, :-1]
        target = input_ids[0, 1:]
        losses = []
        for i in range(0, hidden.shape[0], _LOGIT_CHUNK):
            logits = head_logits(model, head, hidden[i:i + _LOGIT_CHUNK])
            losses.append(F.cross_entropy(logits, target[i:i + _LOGIT_CHUNK], reduction="none"))
    return torch.cat(losses).cpu()


def bucket_means(losses: torch.Tensor, bucket: int) -> List[float]:
    """Mean loss per bucket of ``bucket`` positions (position t predicts token t + 1)."""
    return [float(losses[i:i + bucket].mean()) for i in range(0, losses.shape[0], bucket)]
