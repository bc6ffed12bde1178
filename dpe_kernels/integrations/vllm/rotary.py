"""Out-of-tree rotary embeddings for vLLM: the identity rotary of the DPE path.

Registered with ``CustomOp.register_oot`` under vLLM's class names ``RotaryEmbedding`` and
``Llama3RotaryEmbedding``, so the models' ``get_rope(...)`` builds these classes. At construction
(vLLM sets the current ``VllmConfig`` while it builds the model) each instance decides:

* no ``dpe`` key in ``additional_config``: the instance turns itself back into vLLM's own class
  (``self.__class__`` is reassigned before vLLM's ``__init__`` runs), so it IS vLLM's rotary:
  same class, same op name, same kernels;
* DPE configured: ``forward`` returns ``query`` and ``key`` unrotated. The DPE attention backend
  rotates them (each new key once, at its absolute normal and scaled positions, when it enters
  the paged cache; the queries every step), so the model's own rotary must not. The instance
  records its frequencies (vLLM's ``_compute_inv_freq``, Llama-3 scaling included) and layout
  for the backend (:func:`rotary_facts`).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

__all__ = ["RotaryFacts", "rotary_facts", "register_rotaries", "reset", "IDENTITY_OP_NAME"]

IDENTITY_OP_NAME = "dpe_identity_rotary"


@dataclass(frozen=True)
class RotaryFacts:
    """What the backend needs from the model's rotary: frequencies and pair layout."""

    head_size: int
    rotary_dim: int
    is_neox_style: bool
    inv_freq: torch.Tensor  # float32 [rotary_dim / 2], CPU

    def key(self) -> Tuple:
        return (self.head_size, self.rotary_dim, self.is_neox_style, tuple(self.inv_freq.tolist()))


_LOCK = threading.Lock()
_FACTS: Dict[Tuple, RotaryFacts] = {}


def rotary_facts() -> Optional[RotaryFacts]:
    """The one rotary the DPE identity rotaries of this process recorded; ValueError if the model
    built several different ones (DPE needs one frequency set per model), None if none."""
    with _LOCK:
        facts = list(_FACTS.values())
    if not facts:
        return None
    if len(facts) > 1:
        raise ValueError(f"dpe: the model builds {len(facts)} different rotary embeddings "
                         "(per-layer frequencies or head sizes); DPE serves models with one")
    return facts[0]


def reset() -> None:
    """Forget the recorded rotaries (a new model is about to be built in this process)."""
    with _LOCK:
        _FACTS.clear()


def _record(rot) -> None:
    inv = rot._compute_inv_freq(rot.base).detach().to("cpu", torch.float32).contiguous()
    facts = RotaryFacts(int(rot.head_size), int(rot.rotary_dim), bool(rot.is_neox_style), inv)
    with _LOCK:
        _FACTS.setdefault(facts.key(), facts)


def _make_identity_class(base):
    """A subclass of vLLM's rotary class ``base`` that is the identity while DPE is configured."""

    class _DPEIdentityRotary(base):
        def __init__(self, *args, **kwargs):
            from vllm.config import get_current_vllm_config_or_none

            from .selection import check_selection
            from .settings import engine_settings

            vllm_config = get_current_vllm_config_or_none()
            settings = engine_settings(vllm_config)
            if settings is None:
                # Not DPE: become vLLM's class itself before its __init__ runs.
                self.__class__ = base
                base.__init__(self, *args, **kwargs)
                return
            check_selection(vllm_config)
            super().__init__(*args, **kwargs)
            _record(self)
            # The identity runs on every platform: the dispatch chosen by CustomOp is replaced.
            self._forward_method = self._identity

        @staticmethod
        def _identity(positions: torch.Tensor, query: torch.Tensor, key: Optional[torch.Tensor] = None):
            return query, key

        def forward_native(self, positions, query, key=None):
            return query, key

        def extra_repr(self) -> str:
            return super().extra_repr() + ", dpe=identity (rotated by the DPE attention backend)"

    _DPEIdentityRotary.__name__ = f"DPEIdentity{base.__name__}"
    _DPEIdentityRotary.__qualname__ = _DPEIdentityRotary.__name__
    return _DPEIdentityRotary


_REGISTERED = False


def register_rotaries() -> None:
    """Register the identity rotaries with vLLM (idempotent; vLLM refuses a duplicate name)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from vllm.model_executor.custom_op import CustomOp, op_registry_oot
    from vllm.model_executor.layers.rotary_embedding import Llama3RotaryEmbedding, RotaryEmbedding

    for base in (RotaryEmbedding, Llama3RotaryEmbedding):
        if base.__name__ in op_registry_oot:  # another plugin (or an earlier load) owns the name
            continue
        cls = _make_identity_class(base)
        CustomOp.register_oot(cls, name=base.__name__)
        cls.name = IDENTITY_OP_NAME  # op name for custom_ops lists (register_oot set the class name)
    _REGISTERED = True
