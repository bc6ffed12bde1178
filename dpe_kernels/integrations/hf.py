"""DPE for Hugging Face ``transformers`` decoders, patched on one model INSTANCE.

    from dpe_kernels import DPEConfig
    from dpe_kernels.integrations.hf import apply_dpe, remove_dpe

    handle = apply_dpe(model, DPEConfig.uniform(1024, [4, 4, 2, 16, 32, 32, 16, 128], num_pairs=32))
    out = model.generate(**inputs, max_new_tokens=32)     # prefill, decode, padding, cache: all DPE
    handle.remove()                                       # or remove_dpe(model)

Works for decoders whose attention modules follow the Llama pattern of
``transformers`` 5.x (``q_proj/k_proj/v_proj/o_proj``, ``layer_idx``,
``head_dim``, ``scaling``, RoPE applied from the model's one ``rotary_emb``):
tested on Llama, Qwen2 and Mistral with the ``transformers`` releases in
:data:`TRANSFORMERS_TESTED`. Another release is refused (:func:`check_transformers`)
unless ``allow_untested_transformers=True`` or ``DPE_ALLOW_UNTESTED_TRANSFORMERS=1``:
the attention forward's arguments are transformers' private interface (5.24 renamed
``past_key_values`` to ``cache``), and a renamed argument would silently drop the cache.

How it hooks in (nothing is patched on a class or a module-level function, so
other models in the process are unaffected):

* every attention module of THIS model gets an instance attribute ``forward``
  (a bound method) that projects q/k/v, rotates them once with
  :func:`~dpe_kernels.dpe_rope` at the ``position_ids`` the decoder layer
  passes down (the positions Hugging Face computed, e.g. ``generate()``'s
  ``attention_mask.cumsum(-1) - 1`` under left padding), appends the rotated
  keys to the cache and calls :func:`~dpe_kernels.dpe_attention` (on a module
  dispatched by accelerate, ``_old_forward`` is replaced instead, so its
  device hook keeps running); removing restores the exact previous attribute;
* a forward pre-hook on the base model (the module owning ``rotary_emb``)
  captures the 2D ``attention_mask`` ``[B, past + new]`` (left padding) that
  becomes ``dpe_attention``'s ``key_padding_mask`` (a 4D mask passed by the
  caller is reduced to its last query row), and a pre-hook on
  ``rotary_emb`` captures the position ids it is given (used only if a layer
  does not pass ``position_ids``);
* ``inv_freq`` and ``attention_scaling`` are read from the model's own
  ``rotary_emb`` at every forward (so Llama-3.1 / YaRN frequencies, and the
  baselines of :mod:`dpe_kernels.integrations.baselines`, carry over; the scaling enters
  as ``softmax_scale * attention_scaling**2``, as HF scales both cos and sin).

Cache: Hugging Face's own cache object (``DynamicCache``, what ``generate()``
creates), so ``generate()``, beam reordering, ``crop`` and
``get_seq_length`` keep working. Keys are rotated ONCE, at insertion, and
never again. Layout per layer: the KEY slot holds ``k_scaled``
``[B, H_ks, S, D]`` (``H_ks = H_q`` with a per-query-head mask, else
``H_k``) and the VALUE slot holds ``cat(k_normal, v)`` along the last dim
``[B, H_k, S, D + Dv]``; both are read back as strided views (no copy).
A cache filled by a DPE-patched model is meaningless to the unpatched model
and vice versa. Static/sliding-window/quantized caches are not supported.

Limits: inference only (run under ``torch.no_grad()`` / ``inference_mode()``;
the kernels raise otherwise); the window test uses cache-slot distances, which
equal position distances for contiguous positions with left padding (what
``generate()`` produces), not for packed sequences or position ids with gaps;
models with sliding-window attention or sequence-dependent RoPE (dynamic,
longrope) are rejected.
"""
from __future__ import annotations

import functools
import os
import re
import types
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from ..attention import dpe_attention
from ..config import DPEConfig
from ..rope import dpe_rope

__all__ = ["apply_dpe", "remove_dpe", "DPEHandle", "find_rotary_embedding", "find_attention_modules",
           "get_handle", "check_not_patched", "register_handle", "rope_type", "train_length",
           "TRANSFORMERS_TESTED", "ALLOW_UNTESTED_ENV", "check_transformers", "cache_kwargs"]

_HANDLE_ATTR = "_dpe_kernels_handle"

# The transformers releases the integration is tested with: oldest (the vLLM 0.32 environment's
# pin) and newest; CI runs the integration tests at both ends. Minor releases in between share the
# same attention interface. setup.py's "hf" extra states the same range.
TRANSFORMERS_TESTED = ("5.19.0", "5.25.0")
ALLOW_UNTESTED_ENV = "DPE_ALLOW_UNTESTED_TRANSFORMERS"
# 5.24 renamed the cache argument of every forward (``past_key_values`` -> ``cache``).
_CACHE_RENAMED_IN = (5, 24)


def _version_tuple(v: str):
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", v)
    if not m:
        raise ValueError(f"cannot parse the transformers version {v!r}")
    return tuple(int(x or 0) for x in m.groups())


def _installed_transformers() -> Optional[str]:
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__


def check_transformers(allow_untested: bool = False) -> Optional[str]:
    """The installed transformers version, after refusing one outside :data:`TRANSFORMERS_TESTED`.

    Tested means a release of a minor version from the oldest to the newest tested one (any patch
    release of those; no pre-release). Another raises RuntimeError naming the installed version and
    the range, unless ``allow_untested`` or the environment variable
    ``DPE_ALLOW_UNTESTED_TRANSFORMERS=1`` (then one RuntimeWarning). Returns None when
    transformers is not installed (no Hugging Face model can exist then)."""
    v = _installed_transformers()
    if v is None:
        return None
    lo, hi = (_version_tuple(x)[:2] for x in TRANSFORMERS_TESTED)
    release = re.fullmatch(r"\d+\.\d+(\.\d+)?(\.post\d+)?", v) is not None
    if release and lo <= _version_tuple(v)[:2] <= hi:
        return v
    if allow_untested or os.environ.get(ALLOW_UNTESTED_ENV, "") not in ("", "0"):
        warnings.warn(f"dpe_kernels: transformers {v} is outside the tested range {_tested_range()}; "
                      "running at your own risk", RuntimeWarning, stacklevel=3)
        return v
    raise RuntimeError(
        f"dpe_kernels' Hugging Face integration is tested with transformers {_tested_range()}, and "
        f"transformers {v} is installed. Install a tested release (pip install "
        f"\"transformers>={TRANSFORMERS_TESTED[0]},<{hi[0]}.{hi[1] + 1}\"), or proceed at your own risk with "
        f"allow_untested_transformers=True or {ALLOW_UNTESTED_ENV}=1, and check generate() against a full "
        "forward (a renamed cache argument silently breaks decoding)")


def _tested_range() -> str:
    lo, hi = (".".join(x.split(".")[:2]) for x in TRANSFORMERS_TESTED)
    return f"{lo}.x - {hi}.x"


def cache_kwargs(cache) -> Dict[str, Any]:
    """``{name: cache}`` for a model forward, under the cache argument name of the installed
    transformers (``cache`` from 5.24, ``past_key_values`` before)."""
    v = _installed_transformers()
    new = v is not None and _version_tuple(v)[:2] >= _CACHE_RENAMED_IN
    return {"cache" if new else "past_key_values": cache}


# --------------------------------------------------------------------------- discovery
def _is_attention(m: torch.nn.Module) -> bool:
    return all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "layer_idx", "head_dim"))


def find_attention_modules(model: torch.nn.Module) -> List[torch.nn.Module]:
    """The attention modules (q/k/v/o projections + ``layer_idx``), sorted by ``layer_idx``."""
    mods = [m for m in model.modules() if _is_attention(m)]
    if not mods:
        raise ValueError(
            f"{type(model).__name__}: no attention module with q_proj/k_proj/v_proj/o_proj, layer_idx and "
            "head_dim found; DPE supports Llama-style Hugging Face decoders (Llama, Qwen2, Mistral, ...)")
    mods.sort(key=lambda m: m.layer_idx)
    idx = [m.layer_idx for m in mods]
    if idx != list(range(len(mods))):
        raise ValueError(f"attention layer_idx values must be 0..{len(mods) - 1}, got {idx}")
    return mods


def find_rotary_embedding(model: torch.nn.Module):
    """``(base_model, rotary_emb)``: the single module named ``rotary_emb`` holding ``inv_freq`` and its parent."""
    found = []
    for parent in model.modules():
        rot = getattr(parent, "rotary_emb", None)
        if isinstance(rot, torch.nn.Module) and isinstance(getattr(rot, "inv_freq", None), torch.Tensor):
            found.append((parent, rot))
    if len(found) != 1:
        raise ValueError(f"{type(model).__name__}: expected exactly one `rotary_emb` module with an `inv_freq` "
                         f"buffer (the model's shared rotary embedding), found {len(found)}")
    return found[0]


def get_handle(model: torch.nn.Module):
    """The active DPE / baseline handle of ``model``, or None."""
    return model.__dict__.get(_HANDLE_ATTR)


def check_not_patched(model) -> None:
    """RuntimeError when DPE or a baseline is already applied to ``model``."""
    h = get_handle(model)
    if h is not None:
        raise RuntimeError(f"this model is already patched ({h.method!r}); call remove_dpe(model) first")


def rope_type(rotary_emb) -> str:
    """The rotary embedding's ``rope_type`` ("default", "llama3", "yarn", ...; "per-layer" if not one string)."""
    t = getattr(rotary_emb, "rope_type", "default")
    return t if isinstance(t, str) else "per-layer"


def _check_supported(model, attn_modules, rotary_emb):
    cfg = getattr(model, "config", None)
    rt = rope_type(rotary_emb)
    if "dynamic" in rt or rt in ("longrope", "per-layer"):
        raise ValueError(f"rope_type={rt!r}: the frequencies depend on the sequence length or the layer; "
                         "DPE needs one fixed inv_freq")
    for m in attn_modules:
        sw = getattr(m, "sliding_window", None)
        if sw is None and cfg is not None and getattr(cfg, "model_type", "") == "mistral":
            sw = getattr(cfg, "sliding_window", None)  # Mistral reads it from the config at every call
        if sw is not None:
            raise ValueError(
                f"layer {m.layer_idx} uses sliding-window attention (sliding_window={sw}); DPE replaces full "
                "causal attention. Set config.sliding_window = None (e.g. Mistral-7B-v0.2 has none) before "
                "loading the model")
        if getattr(m, "attn_logit_softcapping", None) is not None or \
                getattr(getattr(m, "config", None), "attn_logit_softcapping", None) is not None:
            raise ValueError("attention logit soft-capping is not supported by DPE attention")


# --------------------------------------------------------------------------- handle
@dataclass
class _State:
    """Per-forward inputs captured by the hooks, and per-forward derived tensors."""
    attention_mask: Any = None
    rotary_position_ids: Any = None
    # derived once per forward (shared by all layers): keyed by the identity of the source tensor
    kpm_key: Any = None
    kpm: Any = None
    pos_key: Any = None
    pos: Any = None
    masks: Dict[Any, torch.Tensor] = field(default_factory=dict)


class DPEHandle:
    """What :func:`apply_dpe` (or :func:`~dpe_kernels.integrations.baselines.apply_method`) did; ``remove()`` undoes it."""

    def __init__(self, model, method: str, config: Optional[DPEConfig] = None, **info):
        self.model = model
        self.method = method
        self.config = config
        self.info = info
        self._undo: List[Any] = []
        self._removed = False

    def add_undo(self, fn) -> None:
        """Register a callable that ``remove()`` runs (in reverse order of registration)."""
        self._undo.append(fn)

    @property
    def active(self) -> bool:
        return not self._removed

    def remove(self) -> None:
        """Restore the model exactly (idempotent)."""
        if self._removed:
            return
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        if self.model.__dict__.get(_HANDLE_ATTR) is self:
            del self.model.__dict__[_HANDLE_ATTR]
        self._removed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def __repr__(self):
        state = "removed" if self._removed else "active"
        return f"DPEHandle(method={self.method!r}, {state}, config={self.config!r})"


def train_length(model) -> int:
    """The model's pre-training context length by the package's one rule
    (:func:`dpe_kernels.integrations.lengths.pretraining_length`: a ``dpe.train_length``, else
    ``max_position_embeddings`` for ``rope_type: "llama3"``, else a rope scaling's
    ``original_max_position_embeddings``, else ``max_position_embeddings``); 4096 if none."""
    from .lengths import pretraining_length

    n, _ = pretraining_length(model.config)
    return n or 4096


def register_handle(model, handle: DPEHandle) -> DPEHandle:
    """Record ``handle`` as the model's active patch (what :func:`get_handle` returns)."""
    model.__dict__[_HANDLE_ATTR] = handle
    return handle


# --------------------------------------------------------------------------- public API
def apply_dpe(model: torch.nn.Module, config: DPEConfig, mask: Optional[torch.Tensor] = None, *,
              attention_backend: str = "auto", rope_backend: str = "auto",
              method: str = "dpe", allow_untested_transformers: bool = False) -> DPEHandle:
    """Patch ``model`` (this instance only) to run DPE attention in every layer.

    Args:
        model: a Hugging Face causal LM (or its base model) with Llama-style attention.
        config: the :class:`~dpe_kernels.DPEConfig`; its groups must cover the
            model's ``rotary_dim / 2`` pairs (``len(rotary_emb.inv_freq)``).
        mask: optional key-dimension mask ``[num_layers, H_q or H_k, P]``
            (overrides ``config.mask``).
        attention_backend, rope_backend: passed to :func:`dpe_attention` / :func:`dpe_rope`.
        method: the name the handle records (``"dpe"``; the baselines pass ``"self_extend"``).
        allow_untested_transformers: run with a transformers release outside
            :data:`TRANSFORMERS_TESTED` (else RuntimeError; see :func:`check_transformers`).

    Returns:
        a :class:`DPEHandle`; ``handle.remove()`` or :func:`remove_dpe` restores the model.
    """
    if not isinstance(config, DPEConfig):
        raise TypeError(f"config must be a DPEConfig, got {type(config).__name__}")
    check_transformers(allow_untested_transformers)
    check_not_patched(model)
    if mask is not None:
        config = config.with_mask(mask)
    base, rotary = find_rotary_embedding(model)
    attn = find_attention_modules(model)
    _check_supported(model, attn, rotary)
    npairs = int(rotary.inv_freq.shape[-1])
    if config.num_pairs != npairs:
        raise ValueError(f"config covers {config.num_pairs} pairs but the model rotates {npairs} pairs "
                         f"(rotary_dim {2 * npairs}); build it with DPEConfig.uniform(..., num_pairs={npairs})")
    hq = attn[0].q_proj.out_features // attn[0].head_dim
    hk = attn[0].k_proj.out_features // attn[0].head_dim
    if config.mask is not None:
        m = config.mask
        if m.shape[0] != len(attn) or m.shape[1] not in (hq, hk):
            raise ValueError(f"mask must be [num_layers={len(attn)}, H_q={hq} or H_k={hk}, P={npairs}], "
                             f"got {list(m.shape)}")

    handle = DPEHandle(model, method, config, attention_backend=attention_backend, rope_backend=rope_backend)
    state = _State()

    def base_pre_hook(module, args, kwargs):
        am = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        state.attention_mask = am
        state.rotary_position_ids = None
        state.kpm_key = state.pos_key = None
        state.kpm = state.pos = None

    def rotary_pre_hook(module, args, kwargs):
        pid = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
        state.rotary_position_ids = pid

    h1 = base.register_forward_pre_hook(base_pre_hook, with_kwargs=True)
    h2 = rotary.register_forward_pre_hook(rotary_pre_hook, with_kwargs=True)
    handle.add_undo(h1.remove)
    handle.add_undo(h2.remove)

    ctx = _Ctx(config, rotary, state, attention_backend, rope_backend, _cache_types())
    for m in attn:
        # A module dispatched by accelerate (device_map=...) has its forward wrapped in an instance
        # attribute that calls `_old_forward`: replace that one so the device hooks keep running.
        attr = "_old_forward" if (hasattr(m, "_hf_hook") and "_old_forward" in m.__dict__) else "forward"
        had = attr in m.__dict__
        old = m.__dict__.get(attr)
        setattr(m, attr, types.MethodType(functools.partial(_dpe_attention_forward, ctx), m))

        def undo(m=m, attr=attr, had=had, old=old):
            if had:
                setattr(m, attr, old)
            else:
                m.__dict__.pop(attr, None)
        handle.add_undo(undo)
    return register_handle(model, handle)


def remove_dpe(model: torch.nn.Module) -> bool:
    """Undo :func:`apply_dpe` / ``apply_method`` on ``model``; returns False if nothing was applied."""
    h = get_handle(model)
    if h is None:
        return False
    h.remove()
    return True


# --------------------------------------------------------------------------- the patched forward
class _Ctx:
    __slots__ = ("config", "rotary", "state", "attention_backend", "rope_backend", "cache_types")

    def __init__(self, config, rotary, state, attention_backend, rope_backend, cache_types):
        self.config, self.rotary, self.state = config, rotary, state
        self.attention_backend, self.rope_backend = attention_backend, rope_backend
        self.cache_types = cache_types


def _cache_types() -> tuple:
    """transformers' cache base class (a tuple for isinstance; empty without transformers)."""
    try:
        from transformers.cache_utils import Cache
    except ImportError:
        return ()
    return (Cache,)


def _positions(ctx: _Ctx, position_ids, b: int, s: int, device) -> torch.Tensor:
    st = ctx.state
    src = position_ids if position_ids is not None else st.rotary_position_ids
    if src is None:
        raise ValueError("DPE: no position_ids reached the attention layer; call the model through its "
                         "top-level forward (or pass position_ids)")
    if st.pos_key is src and st.pos.device == device:
        return st.pos
    if src.dim() == 1:
        src_ = src[None]
    else:
        src_ = src
    if src_.dim() != 2 or src_.shape[-1] != s or src_.shape[0] not in (1, b):
        raise ValueError(f"DPE: position_ids must be [B, S] = [{b}, {s}] (or [1, S]), got {list(src.shape)}")
    # Padding slots may carry any position (generate() uses 0, a plain cumsum - 1 gives -1): clamp.
    pos = src_.to(device=device, dtype=torch.int64).clamp(min=0)
    st.pos_key, st.pos = src, pos
    return pos


def _key_padding(ctx: _Ctx, b: int, s_k: int, device) -> Optional[torch.Tensor]:
    st = ctx.state
    am = st.attention_mask
    if am is None:
        return None
    key = (id(am), s_k, device)
    if st.kpm_key == key:
        return st.kpm
    if not isinstance(am, torch.Tensor):
        raise ValueError(f"DPE: attention_mask must be a 2D tensor [B, S_k], got {type(am).__name__}")
    if am.dim() == 4:  # a prepared mask [B, 1, S_q, S_k]: with left padding its last query row sees every real key
        m = am[:, 0, -1, :]
        m = (m == 0) if m.is_floating_point() else m.bool()
    elif am.dim() == 2:
        m = am.bool()
    else:
        raise ValueError(f"DPE: attention_mask must be 2D [B, S_k], got shape {list(am.shape)}")
    if m.shape[-1] != s_k or m.shape[0] != b:
        raise ValueError(
            f"DPE: attention_mask has shape {list(m.shape)} but the layer attends over [B={b}, S_k={s_k}] keys "
            "(cached + new); pass the mask of the whole sequence so far, as generate() does")
    m = m.to(device)
    kpm = None if bool(m.all()) else m
    st.kpm_key, st.kpm = key, kpm
    return kpm


def _layer_mask(ctx: _Ctx, layer: int, device) -> Optional[torch.Tensor]:
    cfg = ctx.config
    if cfg.mask is None:
        return None
    k = (layer, device)
    got = ctx.state.masks.get(k)
    if got is None:
        got = cfg.layer_mask(layer).to(device).contiguous()
        ctx.state.masks[k] = got
    return got


def _check_cache_layer(cache, layer_idx: int) -> None:
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers):
        return
    layer = layers[layer_idx]
    name = type(layer).__name__
    if getattr(layer, "is_sliding", False) or "Static" in name or "Quantized" in name or "Linear" in name:
        raise NotImplementedError(
            f"DPE stores its rotated keys in Hugging Face's DynamicCache; this cache layer is {name}. "
            "Use the default cache (generate() without cache_implementation, or DynamicCache(config=...))")


def _layer_cache(ctx: _Ctx, cache, past_key_values, kwargs):
    """The layer's cache under either name (``cache`` from transformers 5.24, ``past_key_values``
    before). A cache object under any other name means transformers renamed the argument again:
    refuse rather than run without it (the decode would silently attend to nothing cached)."""
    if cache is not None and past_key_values is not None:
        raise ValueError("DPE: the attention layer got both `cache` and `past_key_values`; pass one")
    if ctx.cache_types:
        for name, val in kwargs.items():
            if isinstance(val, ctx.cache_types):
                raise RuntimeError(
                    f"DPE: the attention layer received its cache as {name!r}, an argument this integration "
                    f"does not know; transformers {_installed_transformers()} is not supported (tested: "
                    f"{_tested_range()})")
    return cache if cache is not None else past_key_values


def _dpe_attention_forward(ctx: _Ctx, self, hidden_states: torch.Tensor, position_embeddings=None,
                           attention_mask=None, cache=None, past_key_values=None, **kwargs):
    past_key_values = _layer_cache(ctx, cache, past_key_values, kwargs)
    b, s = hidden_states.shape[:2]
    d = self.head_dim
    q = self.q_proj(hidden_states).view(b, s, -1, d)
    k = self.k_proj(hidden_states).view(b, s, -1, d)
    v = self.v_proj(hidden_states).view(b, s, -1, d)
    if getattr(self, "q_norm", None) is not None:  # Qwen3-style per-head norms before RoPE
        q = self.q_norm(q)
    if getattr(self, "k_norm", None) is not None:
        k = self.k_norm(k)

    rot = ctx.rotary
    inv_freq = rot.inv_freq
    if inv_freq.device != q.device or inv_freq.dtype != torch.float32:
        inv_freq = inv_freq.to(device=q.device, dtype=torch.float32)
    att = float(getattr(rot, "attention_scaling", 1.0) or 1.0)
    scale = float(self.scaling) * att * att

    pos = _positions(ctx, kwargs.get("position_ids"), b, s, q.device)
    qn, kn, qs, ks = dpe_rope(q, k, pos, inv_freq, ctx.config, mask=_layer_mask(ctx, self.layer_idx, q.device),
                              rotary_dim=2 * inv_freq.shape[0], backend=ctx.rope_backend, check_inputs=False)
    if past_key_values is not None:
        _check_cache_layer(past_key_values, self.layer_idx)
        # Key slot: k_scaled [B, H_ks, S, D]; value slot: cat(k_normal, v) [B, H_k, S, D + Dv].
        k_slot = ks.transpose(1, 2)
        v_slot = torch.cat([kn, v], dim=-1).transpose(1, 2)
        k_all, kv_all = past_key_values.update(k_slot, v_slot, self.layer_idx)
        ks = k_all.transpose(1, 2)
        kv_all = kv_all.transpose(1, 2)
        kn, v = kv_all[..., :d], kv_all[..., d:]
    kpm = _key_padding(ctx, b, kn.shape[1], q.device)
    out = dpe_attention(qn, qs, kn, ks, v, ctx.config.window, softmax_scale=scale, key_padding_mask=kpm,
                        backend=ctx.attention_backend)
    out = out.reshape(b, s, -1)
    return self.o_proj(out), None
