"""The backend registry: for each op (``rope``, ``rope_and_cache``, ``attention``, ``paged``,
``paged_rotary``),
which backends run on a device, which one ``backend="auto"`` picks, and the call that runs it.

Every public op and every ``available_*`` function goes through here. What it is not: no
argument checks (:mod:`dpe_kernels.checks` runs them first) and no kernels (the modules beside
it: ``attention_cpu``, ``attention_flash``, ``attention_triton``, ``paged_cpu``,
``paged_triton``, ``rope_triton``, ``triton_common``; the compiled ones load in
:mod:`dpe_kernels.ops`). Kernel modules are imported on first use, so ``import dpe_kernels``
never imports Triton or flash_attn.
"""
from __future__ import annotations

import torch

from .. import ops
from ..utils import triton_usable

__all__ = ["ROPE_BACKENDS", "ATTENTION_BACKENDS", "PAGED_BACKENDS", "available", "pick", "run_rope",
           "run_rope_and_cache", "run_attention", "run_paged", "run_paged_rotary"]

ROPE_BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
ATTENTION_BACKENDS = ("auto", "reference", "cpu", "flash", "triton")
PAGED_BACKENDS = ("auto", "reference", "cpu", "triton")
_NAMES = {"rope": ROPE_BACKENDS, "rope_and_cache": ROPE_BACKENDS, "attention": ATTENTION_BACKENDS,
          "paged": PAGED_BACKENDS, "paged_rotary": PAGED_BACKENDS}
_TRITON_WHY = "triton needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU) and the triton package"
_WHY = {
    "attention": {
        "cpu": "it needs CPU tensors (and torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)",
        "flash": "it needs CUDA tensors and the flash_attn package (FlashAttention 2)",
        "triton": "it needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU), the triton package "
                  "and dpe_kernels.backends.attention_triton",
    },
    "paged": {
        "cpu": "it needs CPU tensors",
        "triton": "it needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU) and the triton package",
    },
}
_WHY["paged_rotary"] = _WHY["paged"]


def available(op: str, device) -> list:
    """Backends of ``op`` that can run on tensors of ``device`` in this process."""
    device = torch.device(device)
    out = ["reference"]
    if op in ("rope", "rope_and_cache"):
        if device.type == "cpu" and ops.has_kernel(op, "CPU"):
            out.append("cpu")
        if device.type == "cuda" and ops.has_kernel(op, "CUDA"):
            out.append("cuda")
    elif op == "attention":
        from . import attention_cpu, attention_flash

        if attention_cpu.available(device):
            out.append("cpu")
        if attention_flash.available(device):
            out.append("flash")
    elif device.type == "cpu":  # paged, paged_rotary
        out.append("cpu")
    if triton_usable(device):
        out.append("triton")
    return out


def _auto(op, device, dtype, d, dv) -> str:
    """The ``auto`` choice, decided without listing every backend (the decode hot path)."""
    if op in ("rope", "rope_and_cache"):
        if device.type in ("cpu", "cuda") and ops.has_kernel(op, device.type.upper()):
            return device.type
        return "triton" if device.type == "cuda" and triton_usable(device) else "reference"
    if dtype == torch.float64:
        return "reference"
    if device.type == "cpu":
        from . import attention_cpu

        if op in ("paged", "paged_rotary") or attention_cpu.available(device):
            return "cpu"
    if op == "attention" and device.type == "cuda":
        from . import attention_flash

        if attention_flash.available(device) and attention_flash.supports(dtype, d, dv):
            return "flash"
    return "triton" if device.type == "cuda" and triton_usable(device) else "reference"


def pick(op: str, backend, device, dtype=None, d=None, dv=None) -> str:
    """The backend that runs ``op``: ``backend`` checked against what runs here, or the
    ``auto`` choice (rope: cuda > cpu > triton on CUDA > reference; attention: float64 ->
    reference, CPU -> cpu, CUDA -> flash when it takes the dtype / head dims, else triton;
    paged: float64 -> reference, CPU -> cpu, CUDA -> triton)."""
    names = _NAMES[op]
    if not isinstance(backend, str) or backend not in names:
        raise ValueError(f"backend must be one of {names}, got {backend!r}")
    if backend == "auto":
        return _auto(op, device, dtype, d, dv)
    if backend not in available(op, device):
        if op in _WHY:
            why = _WHY[op].get(backend, "")
        else:
            why = {"cpu": "the compiled extension is not loaded" if not ops.HAS_EXT else "q is not a CPU tensor",
                   "cuda": "q is not a CUDA tensor or the extension was built without CUDA",
                   "triton": _TRITON_WHY}.get(backend, "")
        raise ValueError(f"backend={backend!r} is not available for {device.type} tensors: {why}")
    if op in _WHY and dtype == torch.float64 and backend != "reference":
        raise TypeError(f"q_normal is float64, which only backend='reference' supports "
                        f"(got backend={backend!r})")
    if backend == "flash":
        from . import attention_flash

        if not attention_flash.supports(dtype, d, dv):
            raise ValueError(f"backend='flash' needs float16/bfloat16 inputs, head_dim <= 256 and v's "
                             f"head_dim equal to q's; got {dtype}, head_dim={d}, v head_dim={dv}")
    return backend


# --------------------------------------------------------------------------- running one
def run_rope(name, q, k, positions, inv_freq, config, mask, layout, rotary_dim, out):
    """The rotary step on backend ``name`` (inputs validated): a 4-tuple, ``out`` when given."""
    if name == "reference":
        from ..reference import rope_reference

        res = rope_reference(q, k, positions, inv_freq, config, mask, layout=layout, rotary_dim=rotary_dim)
        if out is None:
            return res
        for o, r in zip(out, res):  # every result is computed before q / k are overwritten
            o.copy_(r)
        return out
    args = (q, k, positions, inv_freq, config.pair_scales(q.device), None if mask is None else mask.contiguous(),
            config.window, rotary_dim, layout == "neox")
    if name == "triton":
        from . import rope_triton

        if out is None:
            return rope_triton.rope_triton(*args)
        rope_triton.rope_out_triton(*args, *out)
        return out
    if out is None:
        return torch.ops.dpe_kernels.rope(*args)
    torch.ops.dpe_kernels.rope_out(*args, *out)
    return out


def run_rope_and_cache(name, q, k, v, positions, inv_freq, config, mask, layout, rotary_dim, k_cache, ks_cache,
                       v_cache, slot_mapping, out) -> None:
    """The rotary step + cache write on backend ``name`` (inputs validated); writes ``out``."""
    if name == "reference":
        from ..reference import rope_reference

        qn, kn, qs, ks = rope_reference(q, k, positions, inv_freq, config, mask, layout=layout,
                                        rotary_dim=rotary_dim)
        keep = slot_mapping >= 0
        slots = slot_mapping[keep]
        bs = k_cache.shape[1]
        idx = (slots // bs, slots % bs)
        k_cache.index_put_(idx, kn[keep])
        ks_cache.index_put_(idx, ks[keep])
        v_cache.index_put_(idx, v[keep])
        out[0].copy_(qn)
        out[1].copy_(qs)
        return
    args = (q, k, v, positions, inv_freq, config.pair_scales(q.device), None if mask is None else mask.contiguous(),
            config.window, rotary_dim, layout == "neox", slot_mapping, k_cache, ks_cache, v_cache, out[0], out[1])
    if name == "triton":
        from . import rope_triton

        rope_triton.rope_and_cache_triton(*args)
    else:
        torch.ops.dpe_kernels.rope_and_cache(*args)


def run_attention(name, qn, qs, kn, ks, v, window: int, scale: float, key_padding_mask, cu_q, cu_k, info,
                  return_lse: bool):
    """DPE attention on backend ``name`` (inputs validated; ``info`` from the checks)."""
    if name == "triton":
        from . import attention_triton

        return attention_triton.attention_triton(qn, qs, kn, ks, v, window, scale, key_padding_mask=key_padding_mask,
                                                 cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=return_lse)
    if name == "reference":
        from ..reference import attention_reference

        out, lse = attention_reference(qn, qs, kn, ks, v, window, scale, key_padding_mask=key_padding_mask,
                                       cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    elif name == "cpu":
        from .attention_cpu import cpu_attention

        out, lse = cpu_attention(qn, qs, kn, ks, v, window, scale, key_padding_mask, info)
    else:
        from .attention_flash import flash_attention

        out, lse = flash_attention(qn, qs, kn, ks, v, window, scale, key_padding_mask, cu_q, cu_k, info)
    return (out, lse) if return_lse else out


def run_paged(name, qn, qs, k_cache, ks_cache, v_cache, block_table, seq_lens, query_start_loc, window: int,
              scale: float, info, out, lse, return_lse: bool) -> None:
    """Paged DPE attention on backend ``name`` (inputs validated); writes ``out`` and ``lse``."""
    if name == "reference":
        from ..reference import paged_attention_reference

        out.zero_()
        lse.fill_(-float("inf"))
        paged_attention_reference(qn, qs, k_cache, ks_cache, v_cache, block_table, seq_lens, query_start_loc,
                                  window, scale, out, lse)
    elif name == "cpu":
        from .paged_cpu import paged_attention_cpu

        paged_attention_cpu(qn, qs, k_cache, ks_cache, v_cache, block_table, seq_lens, query_start_loc, window,
                            scale, info, out, lse)
    else:
        from .paged_triton import paged_attention_triton

        paged_attention_triton(qn, qs, k_cache, ks_cache, v_cache, block_table, seq_lens, query_start_loc, window,
                               scale, info.max_seqlen_q, info.max_seqlen_k, out, lse, return_lse)


def run_paged_rotary(name, q, k_cache, v_cache, block_table, seq_lens, query_start_loc, cos_sin, pair_scale, window,
                     seq_config, mask, rotary_dim: int, neox: bool, scale: float, info, out, lse) -> None:
    """Paged DPE attention over unrotated keys on backend ``name`` (inputs validated; ``pair_scale``
    int64 ``[C, P]``, ``window`` int64 ``[C]``, ``mask`` bool ``[C, H_q, P]`` or None); writes
    ``out`` and ``lse``."""
    if name == "reference":
        from ..reference import paged_attention_rotary_reference

        out.zero_()
        lse.fill_(-float("inf"))
        paged_attention_rotary_reference(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, cos_sin,
                                         pair_scale, window, seq_config, mask, rotary_dim, neox, scale, out, lse)
    elif name == "cpu":
        from .paged_cpu import paged_rotary_cpu

        paged_rotary_cpu(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, cos_sin, pair_scale, window,
                         seq_config, mask, rotary_dim, neox, scale, info, out, lse)
    else:
        from .paged_triton import paged_rotary_triton

        paged_rotary_triton(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, cos_sin, pair_scale,
                            window, seq_config, mask, rotary_dim, neox, scale, info.max_seqlen_q, info.max_seqlen_k,
                            out, lse)
