"""Long-context baselines in the same harness as DPE: ``apply_method(model, name, **kw) -> handle``.

Every method patches ONE model instance and ``handle.remove()`` (or
:func:`dpe_kernels.integrations.hf.remove_dpe`) restores it exactly:

=============== =============================================================================
``rope``        plain RoPE, the unpatched model (a no-op handle).
``pi``          position interpolation: every position divided by ``factor``
                (``inv_freq / factor``).
``ntk``         NTK-aware: ``base' = base * factor ** (R / (R - 2))``, i.e.
                ``inv_freq[i] * factor ** (-2 i / (R - 2))`` on the model's own frequencies.
``yarn``        YaRN with Hugging Face's formulas: per-pair linear ramp between
                ``inv_freq / factor`` (interpolated) and ``inv_freq`` (original) over the
                correction range of ``beta_fast=32`` / ``beta_slow=1`` rotations at the
                original (training) length, attention temperature ``0.1 ln(factor) + 1``
                applied to cos and sin (so logits scale by its square, as in HF).
``self_extend`` Self-Extend: DPE with one group and scale ``group_size`` for every pair,
                window ``window``, no key-dimension mask.
``dpe``         DPE: ``config`` (a :class:`~dpe_kernels.DPEConfig`) and optional ``mask``.
=============== =============================================================================

``pi`` / ``ntk`` / ``yarn`` replace the ``inv_freq`` buffer (and ``yarn`` the
``attention_scaling`` attribute) of the model's rotary embedding instance;
the model's own attention code runs unchanged. ``self_extend`` / ``dpe`` use
:func:`dpe_kernels.integrations.hf.apply_dpe`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..config import DPEConfig
from .hf import (DPEHandle, apply_dpe, check_not_patched, check_transformers, find_rotary_embedding,
                 register_handle, rope_type, train_length)

__all__ = ["apply_method", "METHODS", "pi_inv_freq", "ntk_inv_freq", "yarn_inv_freq"]

METHODS = ("rope", "pi", "ntk", "yarn", "self_extend", "dpe")


# --------------------------------------------------------------------------- frequency formulas
def pi_inv_freq(inv_freq: torch.Tensor, factor: float) -> torch.Tensor:
    return inv_freq / float(factor)


def ntk_inv_freq(inv_freq: torch.Tensor, factor: float) -> torch.Tensor:
    """``base' = base * factor^(R/(R-2))`` expressed on the given frequencies (``R = 2 * len(inv_freq)``)."""
    r = 2 * inv_freq.shape[-1]
    if r <= 2:
        raise ValueError("NTK scaling needs rotary_dim > 2")
    i = torch.arange(inv_freq.shape[-1], dtype=torch.float64, device=inv_freq.device)
    mult = torch.as_tensor(float(factor), dtype=torch.float64).pow(-2.0 * i / (r - 2))
    return (inv_freq.to(torch.float64) * mult).to(inv_freq.dtype)


def yarn_inv_freq(inv_freq: torch.Tensor, factor: float, base: float, original_max_position_embeddings: int,
                  beta_fast: float = 32.0, beta_slow: float = 1.0, truncate: bool = True):
    """YaRN as ``transformers.modeling_rope_utils._compute_yarn_parameters`` computes it.

    ``inv_freq`` plays HF's "extrapolation" frequencies (``base^(-2i/R)`` for
    plain RoPE, so the result equals HF's exactly then). Returns
    ``(inv_freq, attention_factor)``.
    """
    dim = 2 * inv_freq.shape[-1]
    factor = float(factor)
    attention_factor = 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0

    def correction_dim(num_rotations):
        return (dim * math.log(original_max_position_embeddings / (num_rotations * 2 * math.pi))) / (
            2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrap = (1 - ramp).to(inv_freq.device)
    inv_extrap = inv_freq.to(torch.float32)
    inv_interp = inv_extrap / factor
    return inv_interp * (1 - extrap) + inv_extrap * extrap, attention_factor


# --------------------------------------------------------------------------- patching
def _rope_theta(model, rotary) -> float:
    cfg = getattr(rotary, "config", None) or getattr(model, "config", None)
    params = getattr(cfg, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    if theta is None:
        theta = getattr(cfg, "rope_theta", None)
    if theta is None:
        raise ValueError("cannot find rope_theta in the model config (needed by yarn)")
    return float(theta)


def _apply_frequencies(model, name: str, inv_freq: torch.Tensor, attention_scaling: Optional[float], **info):
    _, rotary = find_rotary_embedding(model)
    rt = rope_type(rotary)
    if "dynamic" in rt or rt in ("longrope", "per-layer"):
        raise ValueError(f"rope_type={rt!r} recomputes its frequencies per call; {name} needs fixed ones")
    handle = DPEHandle(model, name, None, **info)
    old_inv = rotary.inv_freq
    had_scaling = "attention_scaling" in rotary.__dict__
    old_scaling = rotary.__dict__.get("attention_scaling")
    rotary.inv_freq = inv_freq.to(device=old_inv.device, dtype=old_inv.dtype)  # buffer, this instance only
    if attention_scaling is not None:
        rotary.attention_scaling = attention_scaling

    def undo():
        rotary.inv_freq = old_inv
        if had_scaling:
            rotary.attention_scaling = old_scaling
        else:
            rotary.__dict__.pop("attention_scaling", None)
    handle.add_undo(undo)
    return register_handle(model, handle)


def apply_method(model: torch.nn.Module, name: str, *, allow_untested_transformers: bool = False,
                 **kw) -> DPEHandle:
    """Apply one long-context method to this model instance; ``handle.remove()`` undoes it.

    Keyword arguments per method:
        ``rope``: none.
        ``pi``, ``ntk``: ``factor`` (> 0, the extension factor ``s``).
        ``yarn``: ``factor``; optional ``original_max_position_embeddings`` (default: the
            model's training length from its config), ``beta_fast=32``, ``beta_slow=1``.
        ``self_extend``: ``group_size`` (int ``G``), ``window`` (int ``w``); optional backends.
        ``dpe``: ``config`` (DPEConfig), optional ``mask``; optional backends.
        (backends: ``attention_backend``, ``rope_backend`` as for :func:`dpe_kernels.integrations.hf.apply_dpe`.)

    ``allow_untested_transformers``: as for :func:`~dpe_kernels.integrations.hf.apply_dpe` (a
    transformers release outside the tested range is refused otherwise).
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {METHODS}")
    if name not in ("self_extend", "dpe"):  # those two go through apply_dpe, which checks it once
        check_transformers(allow_untested_transformers)
    check_not_patched(model)

    def take(*allowed, required=()):
        extra = set(kw) - set(allowed)
        if extra:
            raise TypeError(f"method {name!r} got unexpected arguments {sorted(extra)}; it takes {list(allowed)}")
        for r in required:
            if r not in kw:
                raise TypeError(f"method {name!r} needs {r}=")

    def factor_arg():
        f = kw["factor"]
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not f > 0:
            raise ValueError(f"factor must be a positive number, got {f!r}")
        return float(f)

    if name == "rope":
        take()
        find_rotary_embedding(model)  # same model check as the others
        return register_handle(model, DPEHandle(model, "rope"))
    if name in ("pi", "ntk"):
        take("factor", required=("factor",))
        f = factor_arg()
        _, rotary = find_rotary_embedding(model)
        fn = pi_inv_freq if name == "pi" else ntk_inv_freq
        return _apply_frequencies(model, name, fn(rotary.inv_freq, f), None, factor=f)
    if name == "yarn":
        take("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", required=("factor",))
        f = factor_arg()
        _, rotary = find_rotary_embedding(model)
        orig = kw.get("original_max_position_embeddings") or train_length(model)
        bf, bs = kw.get("beta_fast", 32), kw.get("beta_slow", 1)
        inv, att = yarn_inv_freq(rotary.inv_freq, f, _rope_theta(model, rotary), int(orig), bf, bs)
        base_scaling = float(getattr(rotary, "attention_scaling", 1.0) or 1.0)
        return _apply_frequencies(model, "yarn", inv, base_scaling * att, factor=f,
                                  original_max_position_embeddings=int(orig), beta_fast=bf, beta_slow=bs)
    backends = ("attention_backend", "rope_backend")
    if name == "self_extend":
        take("group_size", "window", *backends, required=("group_size", "window"))
        _, rotary = find_rotary_embedding(model)
        npairs = int(rotary.inv_freq.shape[-1])
        cfg = DPEConfig(window=kw["window"], group_boundaries=(0, npairs), scales=(kw["group_size"],))
        extra = {k: kw[k] for k in backends if k in kw}
        return apply_dpe(model, cfg, method="self_extend", allow_untested_transformers=allow_untested_transformers,
                         **extra)
    take("config", "mask", *backends, required=("config",))
    extra = {k: kw[k] for k in backends if k in kw}
    return apply_dpe(model, kw["config"], kw.get("mask"), allow_untested_transformers=allow_untested_transformers,
                     **extra)
