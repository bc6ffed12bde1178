"""The case grid of ``dpe parity``: every op's cases, their inputs, and how each is run.

A :class:`Case` names an op ``kind`` (``rope``, ``rope_and_cache``, ``attention``,
``cache_step``, ``paged``), a table ``op`` label, JSON-able ``params`` and flags:

* ``quick``: part of ``dpe parity --quick``;
* ``tiny``: small enough for the Triton interpreter (``TRITON_INTERPRET=1`` on
  a CPU): interpreted Triton runs only the tiny cases.

:func:`build_inputs` makes a case's tensors (deterministic: seeded by the case
name), :func:`run_kind` runs one backend, :func:`reference_outputs` the
same-dtype PyTorch reference or (``float64=True``) the float64 oracle of
:mod:`dpe_kernels.reference`, and :func:`authors_outputs` the authors'
formulation (``--reference authors``). Inputs and outputs are plain dicts of
tensors so the golden-vector files map one to one onto them.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Dict, List

import torch

from ..attention import dpe_attention
from ..cache import DPEKVCache, dpe_attention_step
from ..config import DPEConfig
from ..paged_attention import dpe_paged_attention
from ..reference import attention_reference, decode_rerotate_reference, rope_cos_sin, rope_reference, rotate_pairs
from ..rope import MAX_EXACT_POSITION, dpe_rope, dpe_rope_and_cache

__all__ = ["Case", "all_cases", "golden_cases", "build_inputs", "run_kind", "reference_outputs",
           "authors_outputs", "config_of", "KINDS"]

KINDS = ("rope", "rope_and_cache", "attention", "cache_step", "paged")
PAPER_SCALES = [4, 4, 2, 16, 32, 32, 16, 128]
POS_MAX = 1 << 20  # positions up to 2^20 (1M tokens)


@dataclass
class Case:
    kind: str
    op: str
    name: str
    params: dict = field(default_factory=dict)
    quick: bool = False
    tiny: bool = False


# --------------------------------------------------------------------------- helpers
def _gen(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def _inv_freq(npairs: int, base: float = 10000.0) -> torch.Tensor:
    r = 2 * npairs
    return 1.0 / (base ** (torch.arange(0, r, 2, dtype=torch.float32) / r))


def config_of(p: dict) -> DPEConfig:
    """The DPEConfig of a case's params (window, group_boundaries, scales)."""
    return DPEConfig(window=int(p["window"]), group_boundaries=tuple(p["group_boundaries"]),
                     scales=tuple(p["scales"]))


def _uniform(window, scales, npairs) -> dict:
    cfg = DPEConfig.uniform(window, scales, npairs)
    return {"window": window, "group_boundaries": list(cfg.group_boundaries), "scales": list(cfg.scales)}


def _mask(kind, hq, hk, npairs, g):
    if kind == "none":
        return None
    rows = hq if kind == "per_q" else hk
    return torch.rand(rows, npairs, generator=g) > 0.3


def _strided(x: torch.Tensor, g, pad: int = 8) -> torch.Tensor:
    """x as a non-contiguous view (a slice of a wider buffer, stride 1 on the last dim)."""
    buf = torch.randn(*x.shape[:-1], x.shape[-1] + pad, generator=g).to(x.dtype)
    buf[..., : x.shape[-1]] = x
    return buf[..., : x.shape[-1]]


# --------------------------------------------------------------------------- the grid
def _rope_cases() -> List[Case]:
    out = []
    paper = _uniform(1024, PAPER_SCALES, 32)
    for layout in ("neox", "gptj"):
        for mask in ("none", "per_q", "per_kv"):
            out.append(Case("rope", "rope", f"rope/gqa8:2-{layout}-mask_{mask}-pos2^20",
                            dict(T=37, hq=8, hk=2, d=64, rotary_dim=64, layout=layout, mask=mask,
                                 positions="random", **paper),
                            quick=(layout, mask) in (("neox", "per_q"), ("gptj", "per_kv"), ("neox", "none"))))
    for hq, hk, mask in ((4, 4, "per_kv"), (8, 1, "per_q"), (6, 3, "per_q")):
        out.append(Case("rope", "rope", f"rope/gqa{hq}:{hk}-neox-mask_{mask}",
                        dict(T=29, hq=hq, hk=hk, d=32, rotary_dim=32, layout="neox", mask=mask,
                             positions="random", **_uniform(64, [2, 3, 5, 8], 16))))
    for layout in ("neox", "gptj"):  # partial rotary, uneven groups, window not divisible by the scales
        out.append(Case("rope", "rope", f"rope/partial24of40-{layout}-uneven",
                        dict(T=23, hq=4, hk=2, d=40, rotary_dim=24, layout=layout, mask="per_q",
                             positions="random", window=10, group_boundaries=[0, 3, 8, 12], scales=[3, 4, 7]),
                        quick=layout == "gptj"))
    out.append(Case("rope", "rope", "rope/batched-strided-qkv-view",
                    dict(B=2, S=13, hq=4, hk=2, d=32, rotary_dim=32, layout="neox", mask="per_kv",
                         positions="random", strided=True, **_uniform(16, [2, 4], 16)), quick=True))
    out.append(Case("rope", "rope", "rope/window-edge",
                    dict(T=32, hq=4, hk=2, d=32, rotary_dim=32, layout="gptj", mask="per_q",
                         positions="window_edge", **_uniform(20, [3, 4], 16))))
    out.append(Case("rope", "rope", "rope/top-2^20",
                    dict(T=16, hq=4, hk=2, d=64, rotary_dim=64, layout="neox", mask="per_q",
                         positions="top", **paper), quick=True))
    out.append(Case("rope", "rope", "rope/empty",
                    dict(T=0, hq=4, hk=2, d=32, rotary_dim=32, layout="neox", mask="per_q",
                         positions="random", **_uniform(16, [2, 4], 16)), quick=True, tiny=True))
    out.append(Case("rope", "rope", "rope/tiny-neox-mask_q",
                    dict(T=5, hq=4, hk=2, d=16, rotary_dim=16, layout="neox", mask="per_q",
                         positions="random", **_uniform(6, [2, 3], 8)), quick=True, tiny=True))
    out.append(Case("rope", "rope", "rope/tiny-gptj-partial",
                    dict(T=5, hq=2, hk=1, d=20, rotary_dim=12, layout="gptj", mask="per_kv",
                         positions="random", **_uniform(5, [3, 2], 6)), tiny=True))
    return out


def _rope_cache_cases() -> List[Case]:
    out = []
    for bs, layout, mask in ((4, "neox", "per_q"), (16, "gptj", "per_kv"), (3, "neox", "none")):
        out.append(Case("rope_and_cache", "rope_and_cache", f"rope_and_cache/bs{bs}-{layout}-mask_{mask}",
                        dict(T=11, hq=4, hk=2, d=32, dv=24, rotary_dim=32, layout=layout, mask=mask, block_size=bs,
                             num_blocks=8, positions="random", **_uniform(8, [2, 5], 16)),
                        quick=bs == 4))
    out.append(Case("rope_and_cache", "rope_and_cache", "rope_and_cache/strided-partial",
                    dict(T=9, hq=4, hk=2, d=40, dv=40, rotary_dim=24, layout="gptj", mask="per_q", block_size=8,
                         num_blocks=4, positions="random", strided=True, window=10, group_boundaries=[0, 3, 8, 12],
                         scales=[3, 4, 7])))
    out.append(Case("rope_and_cache", "rope_and_cache", "rope_and_cache/tiny",
                    dict(T=4, hq=2, hk=1, d=16, dv=16, rotary_dim=16, layout="neox", mask="per_q", block_size=2,
                         num_blocks=4, positions="random", **_uniform(6, [2, 3], 8)), quick=True, tiny=True))
    return out


def _attention_cases() -> List[Case]:
    out = []
    base = dict(B=2, hq=8, hk=2, d=32, dv=32, window=5)
    for ks in ("kv", "q"):
        out.append(Case("attention", "attention/prefill", f"attention/prefill-gqa8:2-ks_{ks}",
                        dict(base, sq=37, sk=37, ks_heads=ks), quick=ks == "q"))
    out.append(Case("attention", "attention/prefill", "attention/prefill-window-beyond-seq",
                    dict(base, sq=20, sk=20, window=64, ks_heads="kv")))
    out.append(Case("attention", "attention/prefill", "attention/prefill-left-padding-empty-row",
                    dict(base, B=3, sq=24, sk=24, ks_heads="kv", padding=[24, 11, 0]), quick=True))
    out.append(Case("attention", "attention/prefill", "attention/prefill-strided-dv24",
                    dict(base, sq=19, sk=19, dv=24, ks_heads="q", strided=True)))
    out.append(Case("attention", "attention/prefill", "attention/packed-varlen-empty",
                    dict(hq=4, hk=2, d=16, dv=16, window=4, ks_heads="kv", cu_q=[0, 5, 5, 14], cu_k=[0, 20, 23, 35])))
    for ks in ("kv", "q"):
        out.append(Case("attention", "attention/chunked", f"attention/chunked-9of37-ks_{ks}",
                        dict(base, sq=9, sk=37, ks_heads=ks), quick=ks == "kv"))
    out.append(Case("attention", "attention/chunked", "attention/chunked-padding",
                    dict(base, sq=6, sk=30, ks_heads="kv", padding=[30, 8])))
    for sk in (37, 40):
        out.append(Case("attention", "attention/decode", f"attention/decode-sk{sk}",
                        dict(base, B=3, sq=1, sk=sk, ks_heads="q"), quick=sk == 37))
    out.append(Case("attention", "attention/decode", "attention/decode-padding",
                    dict(base, sq=1, sk=26, ks_heads="kv", padding=[26, 3])))
    out.append(Case("attention", "attention/prefill", "attention/tiny-prefill",
                    dict(B=1, hq=2, hk=1, d=16, dv=16, window=3, sq=9, sk=9, ks_heads="q"), quick=True, tiny=True))
    out.append(Case("attention", "attention/decode", "attention/tiny-decode",
                    dict(B=2, hq=2, hk=1, d=16, dv=16, window=3, sq=1, sk=9, ks_heads="kv"), quick=True, tiny=True))
    return out


def _cache_step_cases() -> List[Case]:
    out = []
    for mask, (hq, hk), offset in (("per_q", (8, 2), 0), ("per_kv", (4, 2), 70_001), ("none", (4, 4), 0),
                                   ("per_q", (4, 2), POS_MAX - 16)):
        out.append(Case("cache_step", "cache_step", f"cache_step/gqa{hq}:{hk}-mask_{mask}-at{offset}",
                        dict(hq=hq, hk=hk, d=32, rotary_dim=32, layout="neox", mask=mask, prompt=7, steps=5,
                             offset=offset, **_uniform(6, [2, 4, 3, 8], 16)),
                        quick=offset in (0, POS_MAX - 16) and mask == "per_q"))
    out.append(Case("cache_step", "cache_step", "cache_step/tiny",
                    dict(hq=2, hk=1, d=16, rotary_dim=16, layout="gptj", mask="per_q", prompt=4, steps=2,
                         offset=0, **_uniform(3, [2, 3], 8)), quick=True, tiny=True))
    return out


def _paged_cases() -> List[Case]:
    out = []
    for bs, ks, layout in ((16, "kv", "contig"), (3, "q", "head_major"), (5, "kv", "head_major")):
        out.append(Case("paged", "paged/decode", f"paged/decode-bs{bs}-ks_{ks}-{layout}",
                        dict(hq=6, hk=2, d=16, dv=16, window=7, block_size=bs, ks_heads=ks, layout=layout,
                             lens=[0, 1, 7, 8, 29, 40], q_lens=[0, 1, 1, 1, 1, 1]), quick=bs == 3))
    out.append(Case("paged", "paged/mixed", "paged/mixed-prefill-decode-bs4",
                    dict(hq=4, hk=2, d=16, dv=16, window=5, block_size=4, ks_heads="q", layout="head_major",
                         lens=[23, 9, 0, 17], q_lens=[23, 1, 0, 6]), quick=True))
    out.append(Case("paged", "paged/mixed", "paged/mixed-bs16-dv8",
                    dict(hq=4, hk=4, d=16, dv=8, window=9, block_size=16, ks_heads="kv", layout="contig",
                         lens=[33, 12], q_lens=[4, 12])))
    out.append(Case("paged", "paged/decode", "paged/tiny-decode",
                    dict(hq=2, hk=1, d=16, dv=16, window=3, block_size=4, ks_heads="q", layout="contig",
                         lens=[0, 6, 9], q_lens=[0, 1, 1]), quick=True, tiny=True))
    return out


def all_cases() -> List[Case]:
    """The whole grid (``--quick``: the cases with ``quick=True``)."""
    return _rope_cases() + _rope_cache_cases() + _attention_cases() + _cache_step_cases() + _paged_cases()


def golden_cases() -> List[Case]:
    """The golden-vector set (``--export``): small, contiguous inputs, ops an engine
    ports first (rope, paged decode, batched attention); kept well under 1 MB."""
    g = []
    for layout, mask, pos in (("neox", "per_q", "random"), ("gptj", "per_kv", "top"), ("neox", "none", "window_edge")):
        g.append(Case("rope", "rope", f"rope-{layout}-mask_{mask}-{pos}",
                      dict(T=9, hq=4, hk=2, d=16, rotary_dim=16, layout=layout, mask=mask, positions=pos,
                           **_uniform(6, [3, 2], 8))))
    g.append(Case("rope", "rope", "rope-partial-uneven-gptj",
                  dict(T=7, hq=2, hk=1, d=20, rotary_dim=12, layout="gptj", mask="per_q", positions="random",
                       window=10, group_boundaries=[0, 2, 6], scales=[3, 4])))
    for bs, ks in ((4, "q"), (3, "kv")):
        g.append(Case("paged", "paged/decode", f"paged-decode-bs{bs}-ks_{ks}",
                      dict(hq=4, hk=2, d=16, dv=16, window=5, block_size=bs, ks_heads=ks, layout="contig",
                           lens=[1, 3, 5, 6, 14], q_lens=[1, 1, 1, 1, 1])))
    g.append(Case("attention", "attention/prefill", "attention-prefill",
                  dict(B=1, hq=4, hk=2, d=16, dv=16, window=4, sq=11, sk=11, ks_heads="kv")))
    return g


# --------------------------------------------------------------------------- inputs
def _positions(kind, n, window, g):
    if kind == "random":
        return torch.randint(0, POS_MAX, (n,), generator=g)
    if kind == "top":  # the last positions below 2^20
        return torch.arange(POS_MAX - n, POS_MAX)
    if kind == "window_edge":  # around the window and around multiples of it
        return torch.cat([torch.arange(max(window - n // 2, 0), window + n - n // 2)])[:n]
    raise ValueError(f"positions kind {kind!r}")


def build_inputs(case: Case, dtype: torch.dtype, device="cpu") -> Dict[str, torch.Tensor]:
    """The case's input tensors in ``dtype`` on ``device`` (same values for every backend)."""
    p, g = case.params, _gen(case.name)
    f = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    ins: Dict[str, torch.Tensor] = {}
    if case.kind in ("rope", "rope_and_cache"):
        hq, hk, d, r = p["hq"], p["hk"], p["d"], p["rotary_dim"]
        npairs = r // 2
        lead = (p["B"], p["S"]) if "B" in p else (p["T"],)
        n = math.prod(lead)
        if p.get("strided"):  # q, k (and v) as views of one packed qkv row
            dv = p.get("dv", 0) if case.kind == "rope_and_cache" else 0
            qkv = f(*lead, hq * d + hk * d + hk * dv)
            ins["q"] = qkv[..., : hq * d].unflatten(-1, (hq, d))
            ins["k"] = qkv[..., hq * d: hq * d + hk * d].unflatten(-1, (hk, d))
            if dv:
                ins["v"] = qkv[..., hq * d + hk * d:].unflatten(-1, (hk, dv))
        else:
            ins["q"], ins["k"] = f(*lead, hq, d), f(*lead, hk, d)
            if case.kind == "rope_and_cache":
                ins["v"] = f(*lead, hk, p["dv"])
        ins["positions"] = _positions(p["positions"], n, p["window"], g).reshape(lead)
        ins["inv_freq"] = _inv_freq(npairs)
        ins["pair_scale"] = config_of(p).pair_scales("cpu").to(torch.int64)
        m = _mask(p["mask"], hq, hk, npairs, g)
        if m is not None:
            ins["mask"] = m
        if case.kind == "rope_and_cache":
            nslots = p["num_blocks"] * p["block_size"]
            slots = torch.randperm(nslots, generator=g)[:n]
            slots[n // 2] = -1  # a padding token: no cache write
            ins["slot_mapping"] = slots.to(torch.int64)
    elif case.kind == "attention":
        hq, hk, d, dv = p["hq"], p["hk"], p["d"], p["dv"]
        hks = hq if p["ks_heads"] == "q" else hk
        if "cu_q" in p:
            tq, tk = p["cu_q"][-1], p["cu_k"][-1]
            lq, lk = (tq,), (tk,)
            ins["cu_seqlens_q"] = torch.tensor(p["cu_q"], dtype=torch.int32)
            ins["cu_seqlens_k"] = torch.tensor(p["cu_k"], dtype=torch.int32)
        else:
            lq, lk = (p["B"], p["sq"]), (p["B"], p["sk"])
        ins["q_normal"], ins["q_scaled"] = f(*lq, hq, d), f(*lq, hq, d)
        ins["k_normal"], ins["k_scaled"], ins["v"] = f(*lk, hk, d), f(*lk, hks, d), f(*lk, hk, dv)
        if p.get("strided"):
            for name in ("q_normal", "k_scaled", "v"):
                ins[name] = _strided(ins[name], g)
        if "padding" in p:  # left padding: row b has its last padding[b] keys real
            sk = p["sk"]
            ins["key_padding_mask"] = torch.stack([torch.arange(sk) >= sk - n for n in p["padding"]])
    elif case.kind == "cache_step":
        hq, hk, d = p["hq"], p["hk"], p["d"]
        s = p["prompt"] + p["steps"]
        ins["q"], ins["k"], ins["v"] = f(1, s, hq, d), f(1, s, hk, d), f(1, s, hk, d)
        ins["positions"] = (p["offset"] + torch.arange(s))[None]
        ins["inv_freq"] = _inv_freq(p["rotary_dim"] // 2)
        m = _mask(p["mask"], hq, hk, p["rotary_dim"] // 2, g)
        if m is not None:
            ins["mask"] = m
    elif case.kind == "paged":
        ins.update(_paged_inputs(p, f, g))
    else:
        raise ValueError(f"unknown case kind {case.kind!r}")
    return {k: v.to(device) for k, v in ins.items()}


def _paged_inputs(p, f, g):
    hq, hk, d, dv, bs = p["hq"], p["hk"], p["d"], p["dv"], p["block_size"]
    hks = hq if p["ks_heads"] == "q" else hk
    lens, q_lens = p["lens"], p["q_lens"]
    b = len(lens)
    nblk = [max(1, -(-n // bs)) for n in lens]
    num_blocks = sum(nblk) + 2
    perm = torch.randperm(num_blocks, generator=g)
    table = torch.full((b, max(nblk)), num_blocks + 5, dtype=torch.int32)  # unused entries: garbage
    at = 0
    for i, n in enumerate(nblk):
        table[i, :n] = perm[at: at + n].to(torch.int32)
        at += n
    if p["layout"] == "head_major":  # one engine buffer [NB, H_k, bs, planes] seen through permuted views
        width = 2 * d + dv + 8
        buf = f(num_blocks, max(hk, hks), bs, width)
        k_cache = buf[:, :hk, :, :d].transpose(1, 2)
        ks_cache = buf[:, :hks, :, d: 2 * d].transpose(1, 2)
        v_cache = buf[:, :hk, :, 2 * d: 2 * d + dv].transpose(1, 2)
    else:
        k_cache, ks_cache, v_cache = f(num_blocks, bs, hk, d), f(num_blocks, bs, hks, d), f(num_blocks, bs, hk, dv)
    tq = sum(q_lens)
    return {"q_normal": f(tq, hq, d), "q_scaled": f(tq, hq, d), "k_cache": k_cache, "ks_cache": ks_cache,
            "v_cache": v_cache, "block_table": table, "seq_lens": torch.tensor(lens, dtype=torch.int32),
            "query_start_loc": torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0).tolist()), dtype=torch.int32)}


# --------------------------------------------------------------------------- running
def _rope_kw(p, ins):
    return dict(layout=p["layout"], rotary_dim=p["rotary_dim"])


def _attn_kw(ins):
    return {k: ins[k] for k in ("key_padding_mask", "cu_seqlens_q", "cu_seqlens_k") if k in ins}


def run_kind(case: Case, backend: str, ins: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Run ``backend`` on the case's inputs through the public ops; the outputs by name."""
    p, kind = case.params, case.kind
    if kind == "rope":
        big = bool(ins["positions"].numel()) and int(ins["positions"].max()) >= MAX_EXACT_POSITION
        o = dpe_rope(ins["q"], ins["k"], ins["positions"], ins["inv_freq"], config_of(p), ins.get("mask"),
                     backend=backend, check_inputs=not big, **_rope_kw(p, ins))
        return dict(o._asdict())
    if kind == "rope_and_cache":
        k_cache, ks_cache, v_cache = _empty_caches(p, ins)
        o = dpe_rope_and_cache(ins["q"], ins["k"], ins["v"], ins["positions"], ins["inv_freq"], config_of(p),
                               k_cache, ks_cache, v_cache, ins["slot_mapping"], mask=ins.get("mask"),
                               backend=backend, **_rope_kw(p, ins))
        return {"q_normal": o.q_normal, "q_scaled": o.q_scaled, "k_cache": k_cache, "ks_cache": ks_cache,
                "v_cache": v_cache}
    if kind == "attention":
        out, lse = dpe_attention(ins["q_normal"], ins["q_scaled"], ins["k_normal"], ins["k_scaled"], ins["v"],
                                 p["window"], return_lse=True, backend=backend, **_attn_kw(ins))
        return {"out": out, "lse": lse}
    if kind == "cache_step":
        from ..rope import available_rope_backends

        rope_backend = backend if backend in available_rope_backends(ins["q"].device) else "auto"
        cache = DPEKVCache(1, initial_capacity=4)
        cfg, n0 = config_of(p), p["prompt"]
        kw = dict(layout=p["layout"], rotary_dim=p["rotary_dim"], rope_backend=rope_backend, backend=backend)
        q, k, v, pos = ins["q"], ins["k"], ins["v"], ins["positions"]
        outs = [dpe_attention_step(q[:, :n0], k[:, :n0], v[:, :n0], pos[:, :n0], ins["inv_freq"], cfg, cache, 0,
                                   ins.get("mask"), **kw)]
        for t in range(n0, n0 + p["steps"]):
            outs.append(dpe_attention_step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], pos[:, t:t + 1],
                                           ins["inv_freq"], cfg, cache, 0, ins.get("mask"), **kw))
        return {"prefill_out": outs[0], "decode_out": torch.cat(outs[1:], 1)}
    if kind == "paged":
        out, lse = dpe_paged_attention(ins["q_normal"], ins["q_scaled"], ins["k_cache"], ins["ks_cache"],
                                       ins["v_cache"], ins["block_table"], ins["seq_lens"], ins["query_start_loc"],
                                       p["window"], softmax_scale=p.get("softmax_scale"), return_lse=True,
                                       backend=backend)
        return {"out": out, "lse": lse}
    raise ValueError(f"unknown case kind {kind!r}")


def _empty_caches(p, ins, dtype=None):
    dtype = dtype or ins["q"].dtype
    hk, d, dv = ins["k"].shape[-2], ins["k"].shape[-1], ins["v"].shape[-1]
    hks = ins["mask"].shape[0] if "mask" in ins else hk
    z = lambda h, x: torch.zeros(p["num_blocks"], p["block_size"], h, x, dtype=dtype,  # noqa: E731
                                 device=ins["q"].device)
    return z(hk, d), z(hks, d), z(hk, dv)


def _f64(ins):
    return {k: (v.double() if v.is_floating_point() and k != "inv_freq" else v) for k, v in ins.items()}


def reference_outputs(case: Case, ins: Dict[str, torch.Tensor], *, float64: bool) -> Dict[str, torch.Tensor]:
    """The float64 oracle (``float64=True``; the inputs are widened exactly) or the
    same-dtype PyTorch reference (float32 math, one rounding to the dtype)."""
    p, kind = case.params, case.kind
    src = _f64(ins) if float64 else ins
    cdt = torch.float64 if float64 else torch.float32
    if kind in ("rope", "rope_and_cache"):
        qn, kn, qs, ks = rope_reference(src["q"], src["k"], src["positions"], src["inv_freq"], config_of(p),
                                        src.get("mask"), layout=p["layout"], rotary_dim=p["rotary_dim"],
                                        compute_dtype=cdt)
        if kind == "rope":
            return {"q_normal": qn, "k_normal": kn, "q_scaled": qs, "k_scaled": ks}
        caches = _empty_caches(p, src, dtype=qn.dtype)
        slots = src["slot_mapping"].reshape(-1)
        keep = slots >= 0
        idx = (slots[keep] // p["block_size"], slots[keep] % p["block_size"])
        for c, x in zip(caches, (kn, ks, src["v"])):
            c.index_put_(idx, x.reshape(-1, *x.shape[-2:])[keep].to(c.dtype))
        return {"q_normal": qn, "q_scaled": qs, "k_cache": caches[0], "ks_cache": caches[1], "v_cache": caches[2]}
    if kind == "attention":
        out, lse = attention_reference(src["q_normal"], src["q_scaled"], src["k_normal"], src["k_scaled"], src["v"],
                                       p["window"], None, **_attn_kw(src))
        return {"out": out, "lse": lse}
    if kind == "cache_step":  # rope of every token, then causal attention of all of them
        qn, kn, qs, ks = rope_reference(src["q"], src["k"], src["positions"], src["inv_freq"], config_of(p),
                                        src.get("mask"), layout=p["layout"], rotary_dim=p["rotary_dim"],
                                        compute_dtype=cdt)
        out, _ = attention_reference(qn, qs, kn, ks, src["v"].to(qn.dtype), p["window"], None)
        return {"prefill_out": out[:, : p["prompt"]], "decode_out": out[:, p["prompt"]:]}
    if kind == "paged":
        out, lse = dpe_paged_attention(src["q_normal"], src["q_scaled"], src["k_cache"], src["ks_cache"],
                                       src["v_cache"], src["block_table"], src["seq_lens"], src["query_start_loc"],
                                       p["window"], softmax_scale=p.get("softmax_scale"), return_lse=True,
                                       backend="reference")
        return {"out": out, "lse": lse}
    raise ValueError(f"unknown case kind {kind!r}")


# --------------------------------------------------------------------------- the authors' formulation
def _authors_q_scaled(q, positions, inv_freq, p, mask, compute):
    """q_scaled as the authors' prefill forms it: query index ``m // s + (w - w / s)`` with the
    REAL offset ``w - w / s``, added in float32 as torch promotes ``int64 + float``."""
    cfg = config_of(p)
    w, neox, r = cfg.window, p["layout"] == "neox", p["rotary_dim"]
    pos = positions.to(torch.int64)
    cs, ss = [], []
    for s, b0, b1 in zip(cfg.scales, cfg.group_boundaries, cfg.group_boundaries[1:]):
        idx = (pos // s).to(torch.float32) + torch.tensor(w - w / s, dtype=torch.float32)
        c, si = rope_cos_sin(idx, inv_freq, compute)
        cs.append(c[..., b0:b1])
        ss.append(si[..., b0:b1])
    qr = q[..., :r].to(compute)
    scaled = rotate_pairs(qr, torch.cat(cs, -1), torch.cat(ss, -1), neox)
    cn, sn = rope_cos_sin(pos, inv_freq, compute)
    normal = rotate_pairs(qr, cn, sn, neox)
    if mask is not None:
        hq = q.shape[-2]
        md = torch.cat([mask, mask], -1) if neox else mask.repeat_interleave(2, -1)
        md = md if mask.shape[0] == hq else md.repeat_interleave(hq // mask.shape[0], 0)
        scaled = torch.where(md, scaled, normal)
    return torch.cat([scaled, q[..., r:].to(compute)], -1)


def authors_outputs(case: Case, ins: Dict[str, torch.Tensor]):
    """The authors' formulation in float64, or None where it equals ours (attention and paged
    attention take rotated inputs: no difference there)."""
    p, kind = case.params, case.kind
    if kind not in ("rope", "rope_and_cache", "cache_step"):
        return None
    ours = reference_outputs(case, ins, float64=True)
    src = _f64(ins)
    if kind in ("rope", "rope_and_cache"):
        ours["q_scaled"] = _authors_q_scaled(src["q"], src["positions"], src["inv_freq"], p, src.get("mask"),
                                             torch.float64)
        return ours
    # cache_step: their prefill (real offset) for the prompt rows, their re-rotating decode for each step
    cfg, n0 = config_of(p), p["prompt"]
    q, k, v, pos = src["q"], src["k"], src["v"], src["positions"]
    qn, kn, _, ks = rope_reference(q[:, :n0], k[:, :n0], pos[:, :n0], src["inv_freq"], cfg, src.get("mask"),
                                   layout=p["layout"], rotary_dim=p["rotary_dim"], compute_dtype=torch.float64)
    qs = _authors_q_scaled(q[:, :n0], pos[:, :n0], src["inv_freq"], p, src.get("mask"), torch.float64)
    rows = [attention_reference(qn, qs, kn, ks, v[:, :n0], cfg.window, None)[0]]
    for t in range(n0, n0 + p["steps"]):
        rows.append(decode_rerotate_reference(q[:, t:t + 1], k[:, :t + 1], v[:, :t + 1], int(pos[0, t]),
                                              src["inv_freq"], cfg, src.get("mask"), layout=p["layout"],
                                              rotary_dim=p["rotary_dim"]))
    return {"prefill_out": rows[0], "decode_out": torch.cat(rows[1:], 1)}
