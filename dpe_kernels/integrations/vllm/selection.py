"""Which attention backend DPE layers must reach, and the check that they do (shared by the
plugin's entry point and the identity rotary, so neither imports the other)."""
from __future__ import annotations

__all__ = ["BACKEND_NAME", "BACKEND_MEMBER", "CPU_BACKEND_PATH", "DPE_BACKEND_PATH", "check_selection",
           "disabled_reason"]

BACKEND_NAME = "CUSTOM"  # the backend's get_name(): vLLM looks layers up as AttentionBackendEnum[get_name()]
BACKEND_MEMBER = "CUSTOM"  # the AttentionBackendEnum member the plugin points at its backend
CPU_BACKEND_PATH = "dpe_kernels.integrations.vllm.CPUAttentionBackendSelected"
DPE_BACKEND_PATH = "dpe_kernels.integrations.vllm.backend.DPEAttentionBackend"
disabled_reason = None  # set by register() when the installed vLLM is outside the tested range


def check_selection(vllm_config) -> None:
    """With DPE configured, the layers must reach the DPE backend: on the CPU through the
    ``CPU_ATTN`` override, elsewhere through the ``CUSTOM`` member (selected by the plugin when
    no backend is chosen). ValueError otherwise (the identity rotary would hand unrotated keys
    to another backend)."""
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    if disabled_reason is not None:
        raise ValueError(f"dpe: {disabled_reason}; the DPE plugin is disabled")
    if current_platform.is_cpu():
        path = AttentionBackendEnum.CPU_ATTN.get_path()
        if path != CPU_BACKEND_PATH:
            raise ValueError(f"dpe: the CPU_ATTN attention backend is overridden by another plugin ({path}); "
                             "DPE cannot select its backend")
        return
    custom = AttentionBackendEnum.CUSTOM
    if not custom.is_overridden() or custom.get_path() != DPE_BACKEND_PATH:
        raise ValueError("dpe: vLLM's CUSTOM attention backend is registered by another plugin "
                         f"({custom.get_path() if custom.is_overridden() else 'unregistered'}); DPE needs it")
    backend = vllm_config.attention_config.backend
    if backend is not custom:
        raise ValueError(f"dpe: on {current_platform.device_name} the attention backend must be the DPE "
                         f"backend (attention_config={{'backend': '{BACKEND_MEMBER}'}} / --attention-backend "
                         f"{BACKEND_MEMBER}, or leave it unset); got attention_config.backend={backend!r}")
