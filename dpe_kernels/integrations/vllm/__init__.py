"""DPE as a vLLM plugin: serve a RoPE model with DPE by one switch.

    pip install --no-build-isolation ".[vllm]"       # registers the entry point below

    LLM(model=DIR, additional_config={"dpe": {"preset": "smollm2-135m"}},
        hf_overrides={"max_position_embeddings": 16384}, max_model_len=16384, ...)
    vllm serve DIR --additional-config '{"dpe": {"preset": "auto", "target_length": 16384}}' \\
        --hf-overrides '{"max_position_embeddings": 16384}' --max-model-len 16384

How it hooks in (vLLM 0.32, pinned by the ``vllm`` extra):

* entry point ``vllm.general_plugins`` -> :func:`register`, which vLLM calls in every process
  (front end, engine core, each tensor-parallel worker) before a model is built. It registers
  three things, all inert unless the engine's ``additional_config`` has a ``dpe`` key:

  - out-of-tree rotaries (``CustomOp.register_oot``) for ``RotaryEmbedding`` /
    ``Llama3RotaryEmbedding`` (:mod:`.rotary`): vLLM's own class without ``dpe``, the identity
    with it;
  - the attention backend ``DPE`` (:mod:`.backend`), a new ``AttentionBackendEnum`` member;
  - on the CPU, whose platform accepts only ``CPU_ATTN``, an override of that member's class
    path with :data:`CPU_BACKEND_PATH`: an attribute of this module that resolves, while vLLM
    builds each attention layer (its ``VllmConfig`` is current then), to vLLM's own
    ``CPUAttentionBackend`` class without ``dpe`` and to the DPE backend with it.

* The ``dpe`` dict is parsed and every unsupported feature is refused, by option name, when the
  engine builds its model (:mod:`.settings`; the error ends engine start-up: vLLM reports the
  root cause of the failed engine core).

One DPE engine configuration per process (vLLM's engine core runs in its own process per engine
by default).
"""
from __future__ import annotations

from .settings import BACKEND_NAME, CPU_BACKEND_PATH, check_selection

__all__ = ["register", "check_selection", "CPU_BACKEND_PATH", "BACKEND_NAME"]

DPE_BACKEND_PATH = f"{__name__}.backend.DPEAttentionBackend"

_registered = False


def register() -> None:
    """The ``vllm.general_plugins`` entry point (idempotent; vLLM may call it more than once)."""
    global _registered
    if _registered:
        return
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from .rotary import register_rotaries

    register_rotaries()
    if BACKEND_NAME not in AttentionBackendEnum.__members__:
        register_backend(BACKEND_NAME, DPE_BACKEND_PATH)
    if not AttentionBackendEnum.CPU_ATTN.is_overridden():
        register_backend(AttentionBackendEnum.CPU_ATTN, CPU_BACKEND_PATH)
    _registered = True


def __getattr__(name: str):
    # PEP 562: resolved by vLLM's resolve_obj_by_qualname(CPU_BACKEND_PATH) at layer build time.
    if name == "CPUAttentionBackendSelected":
        from vllm.config import get_current_vllm_config_or_none

        from .settings import engine_settings

        if engine_settings(get_current_vllm_config_or_none()) is not None:
            from .backend import DPEAttentionBackend

            return DPEAttentionBackend
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        return CPUAttentionBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
