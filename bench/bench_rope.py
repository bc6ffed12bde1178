"""Microbenchmark of the DPE rotary step on the CPU.

Two ways to run it:

    python bench/bench_rope.py [--tokens 4096 16384 65536] [--out bench/results/rope_cpu.md]
        one run over every case, prints a table (time, GB/s, ratios) and
        writes it with the machine description and the command;
    pytest bench/bench_rope.py --benchmark-only
        the same cases through pytest-benchmark.

Compared in the same run, on the same inputs:
    reference   dpe_rope(backend="reference"): unfused PyTorch, the authors' structure
    cpu         dpe_rope(backend="cpu"), outputs allocated by the call
    cpu_out     dpe_rope(backend="cpu", out=...) into preallocated buffers
    plain_rope  one plain RoPE rotation of q and k in PyTorch (HF style), allocating
    copy_out    a memory copy of the same bytes into the same preallocated buffers:
                q -> q_normal, q_scaled; k -> k_normal, k_scaled (broadcast over
                the query heads of a KV head when the mask is per query head),
                token-blocked so q and k are read from DRAM once, as the kernel does
    copy        the same copy into freshly allocated outputs (pays the page faults
                that `cpu` pays for its fresh outputs)

Bytes = read q and k once + write the four outputs. Ratios: reference/cpu
(target >= 10), cpu_out/copy_out and cpu/copy (target <= 1.5).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time

import torch

import dpe_kernels
from dpe_kernels import DPEConfig, dpe_rope

H_Q, H_K, HEAD_DIM = 32, 8, 128
SCALES = [4, 4, 2, 16, 32, 32, 16, 128]  # Llama-3-8B preset of the paper, w = 1024
WINDOW = 1024
COPY_BLOCK_TOKENS = 128  # 128 tokens x 20 KiB of q/k = 2.5 MiB: stays in L2/L3 for the second read


def make_case(tokens: int, dtype: torch.dtype, mask_kind: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(tokens, H_Q, HEAD_DIM, generator=g).to(dtype)
    k = torch.randn(tokens, H_K, HEAD_DIM, generator=g).to(dtype)
    pos = torch.arange(tokens, dtype=torch.int64)
    inv = 1.0 / (500000.0 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM))
    npairs = HEAD_DIM // 2
    mask = None
    if mask_kind == "per_q":  # the paper's top-48-of-64 key dimensions per query head
        mask = torch.zeros(H_Q, npairs, dtype=torch.bool)
        for h in range(H_Q):
            mask[h, torch.randperm(npairs, generator=g)[:48]] = True
    cfg = DPEConfig.uniform(WINDOW, SCALES, npairs)
    return q, k, pos, inv, cfg, mask


def plain_rope(q, k, pos, inv):
    """Plain RoPE as Hugging Face applies it: one rotation of q and k."""
    ang = pos.float()[:, None] * inv
    emb = torch.cat([ang, ang], -1)
    cos, sin = emb.cos()[:, None].to(q.dtype), emb.sin()[:, None].to(q.dtype)

    def rot(x):
        x1, x2 = x.chunk(2, -1)
        return x * cos + torch.cat([-x2, x1], -1) * sin

    return rot(q), rot(k)


def copy_into(out, q, k):
    """Copy q/k into the four outputs, token-blocked so each input row is read from DRAM once."""
    qn, kn, qs, ks = out
    rep = ks.shape[-2] // k.shape[-2]
    for t0 in range(0, q.shape[0], COPY_BLOCK_TOKENS):
        sl = slice(t0, t0 + COPY_BLOCK_TOKENS)
        qb, kb = q[sl], k[sl]
        qn[sl].copy_(qb)
        qs[sl].copy_(qb)
        kn[sl].copy_(kb)
        ks[sl].view(kb.shape[0], kb.shape[1], rep, kb.shape[2]).copy_(kb[:, :, None])
    return out


def methods(q, k, pos, inv, cfg, mask):
    bufs = dpe_rope(q, k, pos, inv, cfg, mask, backend="cpu")
    copy_bufs = tuple(torch.empty_like(b) for b in bufs)
    return {
        "reference": lambda: dpe_rope(q, k, pos, inv, cfg, mask, backend="reference"),
        "cpu": lambda: dpe_rope(q, k, pos, inv, cfg, mask, backend="cpu"),
        "cpu_out": lambda: dpe_rope(q, k, pos, inv, cfg, mask, backend="cpu", out=bufs),
        "plain_rope": lambda: plain_rope(q, k, pos, inv),
        "copy_out": lambda: copy_into(copy_bufs, q, k),
        "copy": lambda: copy_into(tuple(torch.empty_like(b) for b in bufs), q, k),
    }, bufs


def moved_bytes(q, k, outs) -> int:
    return (q.numel() + k.numel() + sum(o.numel() for o in outs)) * q.element_size()


def time_min(fn, repeats: int, budget_s: float) -> float:
    """Best of `repeats` timed calls after one warm-up (fewer if past the time budget)."""
    fn()
    best, start = float("inf"), time.perf_counter()
    for i in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s and i >= 1:
            break
    return best


def report_preamble(title: str, script: str, argv, machine: str) -> str:
    """Heading and the machine / date / commit / command lines of a results file."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip() or "unknown"
        if subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "dpe_kernels", "csrc"]).returncode:
            commit += " (with uncommitted changes)"
    except OSError:
        commit = "unknown"
    cmd = "python " + " ".join([os.path.relpath(script)] + (argv if argv is not None else sys.argv[1:]))
    return (f"# {title}\n\n- Machine: {machine}\n"
            f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, commit {commit}\n"
            f"- Command: `{cmd}`\n")


def machine_description() -> str:
    cpu = platform.processor() or "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = ""
    try:
        text = open("/proc/cpuinfo").read()
        flags = ", ".join(f for f in ("avx2", "fma", "f16c", "avx512f") if f" {f}" in text)
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu}; {os.cpu_count()} logical cores; {mem:.0f} GiB RAM; ISA flags: {flags or 'n/a'}; "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads); "
            f"dpe_kernels {dpe_kernels.__version__}; Python {platform.python_version()}")


def run_table(token_counts, dtypes, mask_kinds, repeats):
    rows = []
    for tokens in token_counts:
        for dtype in dtypes:
            for mask_kind in mask_kinds:
                q, k, pos, inv, cfg, mask = make_case(tokens, dtype, mask_kind)
                fns, bufs = methods(q, k, pos, inv, cfg, mask)
                nbytes = moved_bytes(q, k, bufs)
                times = {}
                for name, fn in fns.items():
                    times[name] = time_min(fn, repeats if name != "reference" else max(2, repeats // 2),
                                           budget_s=20.0)
                rows.append((tokens, dtype, mask_kind, nbytes, times))
                print(format_row(rows[-1]), flush=True)
                del q, k, bufs, fns
    return rows


HEADER = ("| T | dtype | mask | MB moved | reference ms | cpu ms | cpu_out ms | plain_rope ms | "
          "copy ms | copy_out ms | cpu_out GB/s | reference/cpu | cpu/copy | cpu_out/copy_out |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def format_row(row) -> str:
    tokens, dtype, mask_kind, nbytes, t = row
    ms = {k: v * 1e3 for k, v in t.items()}
    return (f"| {tokens} | {str(dtype).replace('torch.', '')} | {mask_kind} | {nbytes / 1e6:.0f} | "
            f"{ms['reference']:.1f} | {ms['cpu']:.1f} | {ms['cpu_out']:.1f} | {ms['plain_rope']:.1f} | "
            f"{ms['copy']:.1f} | {ms['copy_out']:.1f} | {nbytes / t['cpu_out'] / 1e9:.1f} | "
            f"{t['reference'] / t['cpu']:.1f}x | {t['cpu'] / t['copy']:.2f} | "
            f"{t['cpu_out'] / t['copy_out']:.2f} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--masks", nargs="+", default=["none", "per_q"], choices=["none", "per_q"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", help="write the markdown report here (e.g. bench/results/rope_cpu.md)")
    args = ap.parse_args(argv)
    if "cpu" not in dpe_kernels.available_backends("cpu"):
        sys.exit(f"the CPU extension is not loaded: {dpe_kernels._ext.EXT_ERROR}")
    dtypes = [getattr(torch, d) for d in args.dtypes]
    machine = machine_description()
    print(machine)
    print(HEADER)
    rows = run_table(args.tokens, dtypes, args.masks, args.repeats)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report_preamble("DPE rotary step on the CPU: fused kernel vs unfused reference vs memory copy",
                                    __file__, argv, machine))
            f.write(f"- Shapes: q [T, {H_Q}, {HEAD_DIM}], k [T, {H_K}, {HEAD_DIM}], positions 0..T-1, "
                    f"window {WINDOW}, scales {SCALES}; mask `per_q` = 48 of 64 pairs per query head "
                    f"(k_scaled then has {H_Q} heads), `none` = every pair scaled.\n")
            f.write("- Each time is the best of several calls after a warm-up, all measured in this one run. "
                    "`cpu`/`copy` allocate their outputs (and pay first-touch page faults); "
                    "`cpu_out`/`copy_out` write preallocated buffers. GB/s counts q and k read once plus the "
                    "four outputs written.\n\n")
            f.write(HEADER + "\n")
            for row in rows:
                f.write(format_row(row) + "\n")
        print(f"wrote {args.out}")


# ----------------------------------------------------------------------------- pytest-benchmark
try:
    import pytest
except ImportError:  # the script path needs no pytest
    pytest = None

if pytest is not None:

    @pytest.mark.parametrize("tokens", [4096, 16384])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("method", ["reference", "cpu", "cpu_out", "plain_rope", "copy_out"])
    def test_bench_rope(benchmark, tokens, dtype, method):
        q, k, pos, inv, cfg, mask = make_case(tokens, dtype, "per_q")
        fns, bufs = methods(q, k, pos, inv, cfg, mask)
        benchmark.extra_info["bytes"] = moved_bytes(q, k, bufs)
        benchmark.pedantic(fns[method], rounds=3 if method == "reference" else 10, warmup_rounds=1)


if __name__ == "__main__":
    main()
