"""Benchmark of DPE attention (CPU, or a CUDA GPU with --device cuda): prefill, decode with the
rotate-once cache, peak memory.

Two ways to run it:

    python -m dpe_kernels.tools.benchmarks.attention [--seqlens 4096 16384] [--cache-lens 16384 65536]
                                                     [--configs 9/3/64 32/8/128] [--out bench/results/attention_cpu.md]
        one run over every case, prints the tables and writes them with the
        machine description, the date, the commit and the command;
    python -m dpe_kernels.tools.benchmarks.attention --device cuda --dtype bfloat16 [--out bench/results/attention_h100.md]
        the same on a GPU: DPE attention with backend "flash" (FlashAttention 2, when installed)
        or "triton" (the fused kernel), dpe_rope with backend "cuda"; plain = SDPA on the GPU;
    python -m dpe_kernels.tools.benchmarks.attention --quick
        tiny sizes (CI smoke run, well under a minute);
    pytest dpe_kernels/tools/benchmarks/attention.py --benchmark-only
        a few of the same cases through pytest-benchmark.

Compared in the same run, on the same inputs (B = 1, [B, S, H, D] tensors):

Prefill (causal, S queries over S keys)
    plain        F.scaled_dot_product_attention(is_causal=True, enable_gqa=True) on RoPE'd q, k
    dpe          dpe_attention(backend="cpu") on pre-rotated q_normal, q_scaled, k_normal, k_scaled
    plain_total  plain RoPE (PyTorch, HF style) + plain
    dpe_total    dpe_rope(backend="cpu") + dpe
    Target: dpe / plain <= 1.3.

Decode (one new token; the cache holds L - 1 tokens, the step appends the L-th)
    plain        plain RoPE of the token, append to a preallocated k/v cache, SDPA of 1 query over L keys
    dpe          dpe_attention_step: dpe_rope of the token, DPEKVCache.update, dpe_attention (S_q = 1)
    dpe_attn     dpe_attention alone on the cached views (q already rotated)
    rerotate     decode_rerotate_reference: the authors' decode, re-rotating all L cached keys
    Target: dpe / plain <= 1.15 (mask none or per KV head; a per-query-head mask stores k_scaled with
    H_q heads, so the DPE cache then reads more bytes than a plain one by construction).

Peak memory (prefill): each case runs once in a fresh child process after a small warm-up;
the child resets its RSS high-water mark (/proc/self/clear_refs), records its RSS with the
inputs allocated, runs, and reports the high-water mark minus that baseline (the output included).
On a GPU: torch.cuda.max_memory_allocated() after a reset, minus the memory allocated with the
inputs in place, in this process.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import site
import subprocess
import tempfile
import sys

import torch
import torch.nn.functional as F

import dpe_kernels
from dpe_kernels import DPEConfig, dpe_rope
from dpe_kernels.attention import dpe_attention
from dpe_kernels.cache import DPEKVCache, dpe_attention_step
from dpe_kernels.reference import decode_rerotate_reference

from .common import PAPER_SCALES as SCALES, SCRIPT_NAMES, WINDOW, machine_description, report_preamble, time_min

ROPE_BASE = 500000.0
TOP_K_FRACTION = 0.75                    # the paper's top 48 of 64 pairs per query head
FULL = dict(seqlens=[4096, 16384], cache_lens=[16384, 65536], mem_seqlens=[16384], window=WINDOW, repeats=3)
QUICK = dict(seqlens=[512], cache_lens=[1024], mem_seqlens=[512], window=128, repeats=1)


# ----------------------------------------------------------------------------- cases
def parse_config(text: str):
    try:
        hq, hk, d = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"config must be H_q/H_k/D, e.g. 32/8/128, got {text!r}") from None
    if hq % hk or d % 16:
        raise argparse.ArgumentTypeError(f"need H_q % H_k == 0 and D % 16 == 0 (8 groups of pairs), got {text}")
    return hq, hk, d


def make_case(s, hq, hk, d, dtype, mask_kind, window, seed=0, device="cpu"):
    """Unrotated q [1, S, H_q, D], k, v [1, S, H_k, D], positions 0..S-1, frequencies, config, mask."""
    case = _make_case_cpu(s, hq, hk, d, dtype, mask_kind, window, seed)
    return tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in case)


def backends(x: torch.Tensor, dtype=None):
    """(dpe_rope backend, dpe_attention backend) benchmarked for tensors like x."""
    if x.device.type == "cpu":
        return "cpu", "cpu"
    attn = dpe_kernels.available_attention_backends(x.device)
    half = (dtype or x.dtype) in (torch.float16, torch.bfloat16)
    return "cuda", ("flash" if "flash" in attn and half else "triton")


def _make_case_cpu(s, hq, hk, d, dtype, mask_kind, window, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, s, hq, d, generator=g, dtype=dtype)
    k = torch.randn(1, s, hk, d, generator=g, dtype=dtype)
    v = torch.randn(1, s, hk, d, generator=g, dtype=dtype)
    pos = torch.arange(s)[None]
    npairs = d // 2
    inv = 1.0 / (ROPE_BASE ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    cfg = DPEConfig.uniform(window, SCALES, npairs)
    mask = None
    if mask_kind in ("per_q", "per_kv"):
        rows = hq if mask_kind == "per_q" else hk
        mask = torch.zeros(rows, npairs, dtype=torch.bool)
        for h in range(rows):
            mask[h, torch.randperm(npairs, generator=g)[: int(TOP_K_FRACTION * npairs)]] = True
    return q, k, v, pos, inv, cfg, mask


def rope_one(x, pos, inv):
    """Plain RoPE as Hugging Face applies it (neox layout) to one [B, S, H, D] tensor."""
    ang = pos.float()[..., None] * inv
    emb = torch.cat([ang, ang], -1)
    cos, sin = emb.cos()[..., None, :].to(x.dtype), emb.sin()[..., None, :].to(x.dtype)
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def plain_rope(q, k, pos, inv):
    return rope_one(q, pos, inv), rope_one(k, pos, inv)


def sdpa(q, k, v, causal):
    """Plain SDPA on [B, S, H, D] tensors (transposed views, as HF passes them)."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=causal, enable_gqa=True).transpose(1, 2)


def prefill_methods(case):
    q, k, v, pos, inv, cfg, mask = case
    rb, ab = backends(q)
    qr, kr = plain_rope(q, k, pos, inv)
    qn, kn, qs, ks = dpe_rope(q, k, pos, inv, cfg, mask, backend=rb)
    w = cfg.window

    def dpe_total():
        a = dpe_rope(q, k, pos, inv, cfg, mask, backend=rb)
        return dpe_attention(a.q_normal, a.q_scaled, a.k_normal, a.k_scaled, v, w, backend=ab)

    def plain_total():
        a, b = plain_rope(q, k, pos, inv)
        return sdpa(a, b, v, True)

    return {
        "plain": lambda: sdpa(qr, kr, v, True),
        "dpe": lambda: dpe_attention(qn, qs, kn, ks, v, w, backend=ab),
        "plain_total": plain_total,
        "dpe_total": dpe_total,
    }


def decode_setup(case):
    """Caches holding the first L - 1 tokens; step functions that add the L-th (and roll back)."""
    q, k, v, pos, inv, cfg, mask = case
    rb, ab = backends(q)
    L = k.shape[1]
    qt, kt, vt, pt = q[:, -1:], k[:, -1:], v[:, -1:], pos[:, -1:]
    # DPE: rotate-once cache, preallocated for L tokens.
    cache = DPEKVCache(1, initial_capacity=L)
    for i in range(0, L - 1, 4096):  # prefill in chunks: bounded temporaries at 64K
        j = min(i + 4096, L - 1)
        a = dpe_rope(q[:, i:j], k[:, i:j], pos[:, i:j], inv, cfg, mask, backend=rb)
        cache.update(0, a.k_normal, a.k_scaled, v[:, i:j])
    del a
    t = dpe_rope(qt, kt, pt, inv, cfg, mask, backend=rb)
    kn, ks, vv = cache.update(0, t.k_normal, t.k_scaled, vt)  # views over all L tokens
    cache.crop(L - 1)
    # Plain: a preallocated cache of RoPE'd keys and values.
    kbuf, vbuf = torch.empty_like(k), torch.empty_like(v)
    kbuf[:, :-1] = rope_one(k[:, :-1], pos[:, :-1], inv)
    vbuf[:, :-1] = v[:, :-1]

    def plain_step():
        a, b = plain_rope(qt, kt, pt, inv)
        kbuf[:, L - 1:].copy_(b)
        vbuf[:, L - 1:].copy_(vt)
        return sdpa(a, kbuf, vbuf, False)

    def dpe_step():
        out = dpe_attention_step(qt, kt, vt, pt, inv, cfg, cache, 0, mask, rope_backend=rb, backend=ab)
        cache.crop(L - 1)
        return out

    fns = {
        "plain": plain_step,
        "dpe": dpe_step,
        "dpe_attn": lambda: dpe_attention(t.q_normal, t.q_scaled, kn, ks, vv, cfg.window, backend=ab),
        "rerotate": lambda: decode_rerotate_reference(qt, k, v, L - 1, inv, cfg, mask),
    }
    mib = {"plain": (kbuf.nbytes + vbuf.nbytes) / 2**20, "dpe": (kn.nbytes + ks.nbytes + vv.nbytes) / 2**20}
    return fns, mib


# ----------------------------------------------------------------------------- memory (child process)
def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def memory_child(spec: dict) -> dict:
    """Runs in a fresh process: peak memory increase of one prefill method, in MiB
    (RSS on the CPU, the caching allocator's allocated bytes on a GPU)."""
    torch.set_num_threads(spec["threads"])
    dtype = getattr(torch, spec["dtype"])
    hq, hk, d = spec["config"]
    dev = torch.device(spec["device"])
    # Warm-up on a small case: thread pools, kernels' first-call set-up (JIT), allocator arenas.
    small = make_case(min(256, spec["s"]), hq, hk, d, dtype, spec["mask"], min(64, spec["window"]), device=dev)
    prefill_methods(small)[spec["method"]]()
    del small
    case = make_case(spec["s"], hq, hk, d, dtype, spec["mask"], spec["window"], device=dev)
    q, k, v, pos, inv, cfg, mask = case
    rb, ab = backends(q)
    if spec["method"] == "plain":
        qr, kr = plain_rope(q, k, pos, inv)
        inputs = (qr, kr, v)
        del q, k
        fn = lambda: sdpa(qr, kr, v, True)  # noqa: E731
    elif spec["method"] == "dpe":
        qn, kn, qs, ks = dpe_rope(q, k, pos, inv, cfg, mask, backend=rb)
        inputs = (qn, kn, qs, ks, v)
        del q, k
        fn = lambda: dpe_attention(qn, qs, kn, ks, v, cfg.window, backend=ab)  # noqa: E731
    else:  # dpe_total: from unrotated q, k (the rotated copies count as extra memory)
        inputs = (q, k, v)

        def fn():
            a = dpe_rope(q, k, pos, inv, cfg, mask, backend=rb)
            return dpe_attention(a.q_normal, a.q_scaled, a.k_normal, a.k_scaled, v, cfg.window, backend=ab)
    del case
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        out = fn()
        torch.cuda.synchronize()
        return {"extra_mib": (torch.cuda.max_memory_allocated(dev) - base) / 2**20,
                "inputs_mib": sum(t.nbytes for t in inputs) / 2**20, "output_mib": out.nbytes / 2**20,
                "exact": True}
    exact = True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark to the current RSS
        base = _rss_kib("VmRSS")
    except OSError:  # fall back to ru_maxrss (cannot be reset: an earlier peak may hide part)
        exact, base = False, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = fn()
    peak = _rss_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"extra_mib": (peak - base) / 1024, "inputs_mib": sum(t.nbytes for t in inputs) / 2**20,
            "output_mib": out.nbytes / 2**20, "exact": exact}


def measure_memory(s, config, dtype, mask_kind, window, method, device="cpu"):
    spec = dict(s=s, config=list(config), dtype=str(dtype).replace("torch.", ""), mask=mask_kind,
                window=window, method=method, threads=torch.get_num_threads(), device=str(device))
    # The child must import the same dpe_kernels as this process (with its extension): run it
    # outside any checkout (a cwd holding an unbuilt source tree would shadow the installed one)
    # with this package's parent directory first on its path.
    env = os.environ.copy()
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(dpe_kernels.__file__)))
    if pkg_parent not in site.getsitepackages():  # a source tree: put it first (site-packages need not)
        env["PYTHONPATH"] = os.pathsep.join([pkg_parent] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    res = subprocess.run([sys.executable, "-m", "dpe_kernels.tools.benchmarks.attention", "--_memory-child",
                          json.dumps(spec)], capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    if res.returncode != 0:
        raise RuntimeError(f"memory child failed ({method}, S={s}): {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- tables
def cfg_name(c):
    return f"{c[0]}/{c[1]}, D={c[2]}"


PREFILL_HEADER = ("| S | H_q/H_k, D | mask | plain SDPA ms | DPE attn ms | **dpe/plain** | "
                  "RoPE + SDPA ms | dpe_rope + DPE attn ms | total ratio |\n"
                  "|---|---|---|---|---|---|---|---|---|")
DECODE_HEADER = ("| cache len | H_q/H_k, D | mask | plain step ms | DPE step ms | DPE attn only ms | "
                 "re-rotate ms | **dpe/plain** | re-rotate/dpe | max abs(dpe - re-rotate) | cache MiB plain / DPE |\n"
                 "|---|---|---|---|---|---|---|---|---|---|---|")
MEMORY_HEADER = ("| S | H_q/H_k, D | mask | inputs MiB plain / DPE | output MiB | extra peak MiB plain SDPA | "
                 "DPE attn | dpe_rope + DPE attn | **DPE attn extra - output** |\n"
                 "|---|---|---|---|---|---|---|---|---|")


def fmt_prefill(r):
    t = {k: v * 1e3 for k, v in r["t"].items()}
    return (f"| {r['s']} | {cfg_name(r['config'])} | {r['mask']} | {t['plain']:.1f} | {t['dpe']:.1f} | "
            f"**{t['dpe'] / t['plain']:.2f}x** | {t['plain_total']:.1f} | {t['dpe_total']:.1f} | "
            f"{t['dpe_total'] / t['plain_total']:.2f}x |")


def fmt_decode(r):
    t = {k: v * 1e3 for k, v in r["t"].items()}
    return (f"| {r['L']} | {cfg_name(r['config'])} | {r['mask']} | {t['plain']:.3f} | {t['dpe']:.3f} | "
            f"{t['dpe_attn']:.3f} | {t['rerotate']:.1f} | **{t['dpe'] / t['plain']:.2f}x** | "
            f"{t['rerotate'] / t['dpe']:.0f}x | {r['err']:.1e} | {r['mib']['plain']:.0f} / {r['mib']['dpe']:.0f} |")


def fmt_memory(r):
    m = r["m"]
    flag = "" if all(x["exact"] for x in m.values()) else " (ru_maxrss)"
    return (f"| {r['s']} | {cfg_name(r['config'])} | {r['mask']} | {m['plain']['inputs_mib']:.0f} / "
            f"{m['dpe']['inputs_mib']:.0f} | {m['dpe']['output_mib']:.0f} | {m['plain']['extra_mib']:.0f}{flag} | "
            f"{m['dpe']['extra_mib']:.0f} | {m['dpe_total']['extra_mib']:.0f} | "
            f"**{m['dpe']['extra_mib'] - m['dpe']['output_mib']:.0f}** |")


def run_prefill(seqlens, configs, dtype, masks, window, repeats, budget, device):
    rows = []
    for s in seqlens:
        for c in configs:
            for mk in masks:
                fns = prefill_methods(make_case(s, *c, dtype, mk, window, device=device))
                t = {n: time_min(fn, repeats, budget, device, burst=3) for n, fn in fns.items()}
                rows.append(dict(s=s, config=c, mask=mk, t=t))
                print(fmt_prefill(rows[-1]), flush=True)
                del fns
    return rows


def run_decode(cache_lens, configs, dtype, masks, window, repeats, budget, device):
    rows = []
    for L in cache_lens:
        for c in configs:
            for mk in masks:
                fns, mib = decode_setup(make_case(L, *c, dtype, mk, window, device=device))
                err = (fns["dpe"]().double() - fns["rerotate"]().double()).abs().max().item()
                t = {n: time_min(fn, repeats * (5 if n != "rerotate" else 1), budget, device)
                     for n, fn in fns.items()}
                rows.append(dict(L=L, config=c, mask=mk, t=t, err=err, mib=mib))
                print(fmt_decode(rows[-1]), flush=True)
                del fns
                gc.collect()
    return rows


def run_memory(seqlens, configs, dtype, masks, window, device):
    rows = []
    for s in seqlens:
        for c in configs:
            for mk in masks:
                m = {meth: measure_memory(s, c, dtype, mk, window, meth, device)
                     for meth in ("plain", "dpe", "dpe_total")}
                rows.append(dict(s=s, config=c, mask=mk, m=m))
                print(fmt_memory(rows[-1]), flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlens", type=int, nargs="*", help="prefill lengths (default 4096 16384; none: skip)")
    ap.add_argument("--cache-lens", type=int, nargs="*", help="decode cache lengths (default 16384 65536)")
    ap.add_argument("--mem-seqlens", type=int, nargs="*", help="prefill lengths for peak memory (default 16384)")
    ap.add_argument("--configs", type=parse_config, nargs="+", default=[(9, 3, 64), (32, 8, 128)],
                    help="H_q/H_k/D")
    ap.add_argument("--masks", nargs="+", default=["none", "per_q"], choices=["none", "per_kv", "per_q"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--window", type=int, help=f"DPE window (default {WINDOW})")
    ap.add_argument("--repeats", type=int, help="timed calls per method (default 3; decode: 5x this)")
    ap.add_argument("--budget", type=float, default=60.0, help="seconds per method before fewer repeats")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true",
                    help="tiny sizes for a CI smoke run (S 512, cache 1024, window 128, 1 repeat)")
    ap.add_argument("--out", help="write the markdown report here (e.g. bench/results/attention_cpu.md)")
    ap.add_argument("--_memory-child", dest="memory_child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible")
    if ("cpu" if args.device == "cpu" else "cuda") not in dpe_kernels.available_rope_backends(args.device):
        sys.exit(f"the extension has no {args.device} kernel: {dpe_kernels.extension_error()}")
    defaults = QUICK if args.quick else FULL
    for name, value in defaults.items():  # explicit flags win over --quick
        if getattr(args, name) is None:
            setattr(args, name, value)
    dtype = getattr(torch, args.dtype)
    machine = machine_description(args.device)
    print(machine)
    torch.set_grad_enabled(False)
    sections = []
    if args.seqlens:
        print(PREFILL_HEADER)
        rows = run_prefill(args.seqlens, args.configs, dtype, args.masks, args.window, args.repeats, args.budget,
                           args.device)
        sections.append(("Prefill (causal, B = 1)", PREFILL_HEADER, [fmt_prefill(r) for r in rows]))
    if args.cache_lens:
        print(DECODE_HEADER)
        rows = run_decode(args.cache_lens, args.configs, dtype, args.masks, args.window, args.repeats, args.budget,
                           args.device)
        sections.append(("Decode step (B = 1, one new token)", DECODE_HEADER, [fmt_decode(r) for r in rows]))
    if args.mem_seqlens:
        print(MEMORY_HEADER)
        mem_configs = args.configs[-1:] if args.quick else args.configs  # quick: one config (each child imports torch)
        rows = run_memory(args.mem_seqlens, mem_configs, dtype, args.masks[:1], args.window, args.device)
        sections.append((f"Peak memory of the prefill (fresh process per case, mask {args.masks[0]})", MEMORY_HEADER,
                         [fmt_memory(r) for r in rows]))
    if args.out:
        write_report(args, argv, machine, sections)


def write_report(args, argv, machine, sections):
    with open(args.out, "w") as f:
        where = "the CPU" if args.device == "cpu" else "a GPU"
        probe = torch.empty(0, device=args.device, dtype=getattr(torch, args.dtype))
        rb, ab = backends(probe)
        f.write(report_preamble(f"DPE attention on {where}: prefill, decode with the rotate-once cache, peak memory",
                                SCRIPT_NAMES["attention"], argv, machine))
        f.write(f"- Backends: dpe_rope `{rb}`, dpe_attention `{ab}`; plain = SDPA on the same device.\n")
        f.write(f"- Settings: {args.dtype}, B = 1, window {args.window}, scales {SCALES} (8 groups), "
                f"rope base {ROPE_BASE:g}; mask `none` = every pair scaled, `per_q` = the paper's top 48 of 64 "
                "pairs per query head (k_scaled then has H_q heads), `per_kv` = per KV head. "
                "Plain = `F.scaled_dot_product_attention(enable_gqa=True)` (PyTorch's own kernel choice) on the same "
                "[B, S, H, D] storage. Each time is the best of several calls after a warm-up, all in this one "
                "run.\n")
        f.write("- Targets: prefill dpe/plain <= 1.3; decode dpe/plain <= 1.15 (mask none / per_kv). "
                "Decode `DPE step` = dpe_rope of the token + cache append + dpe_attention; `plain step` = RoPE + "
                "append + SDPA; `re-rotate` = the authors' decode (every cached key rotated at every step). "
                "Memory: RSS high-water mark (GPU: max_memory_allocated) minus the same with the inputs allocated, in a fresh process per "
                "method after a small warm-up.\n\n")
        for title, header, lines in sections:
            f.write(f"## {title}\n\n{header}\n")
            for line in lines:
                f.write(line + "\n")
            f.write("\n")
    print(f"wrote {args.out}")


# ----------------------------------------------------------------------------- pytest-benchmark
try:
    import pytest
except ImportError:  # the script path needs no pytest
    pytest = None

if pytest is not None:

    @pytest.mark.parametrize("config", [(9, 3, 64), (32, 8, 128)], ids=["9-3-64", "32-8-128"])
    @pytest.mark.parametrize("method", ["plain", "dpe", "plain_total", "dpe_total"])
    def test_bench_prefill(benchmark, config, method):
        with torch.no_grad():
            fns = prefill_methods(make_case(4096, *config, torch.float32, "per_q", WINDOW))
            benchmark.pedantic(fns[method], rounds=3, warmup_rounds=1)

    @pytest.mark.parametrize("config", [(9, 3, 64), (32, 8, 128)], ids=["9-3-64", "32-8-128"])
    @pytest.mark.parametrize("method", ["plain", "dpe", "dpe_attn", "rerotate"])
    def test_bench_decode(benchmark, config, method):
        with torch.no_grad():
            fns, _ = decode_setup(make_case(16384, *config, torch.float32, "none", WINDOW))
            benchmark.pedantic(fns[method], rounds=3 if method == "rerotate" else 20, warmup_rounds=1)


if __name__ == "__main__":
    sys.exit(main())
