"""Microbenchmark of the DPE rotary step (CPU, or a CUDA GPU with --device cuda).

Two ways to run it:

    python -m dpe_kernels.tools.benchmarks.rope [--tokens 4096 16384 65536] [--out bench/results/rope_cpu.md]
    python -m dpe_kernels.tools.benchmarks.rope --device cuda [--out bench/results/rope_h100.md]
        one run over every case, prints a table (time, GB/s, ratios) and
        writes it with the machine description and the command;
    dpe bench rope [ARGS]          the same, from the installed package
    pytest dpe_kernels/tools/benchmarks/rope.py --benchmark-only
        the CPU cases through pytest-benchmark.

Compared in the same run, on the same inputs:
    reference   dpe_rope(backend="reference"): unfused PyTorch, the authors' structure
    cpu         dpe_rope(backend="cpu"), outputs allocated by the call
    cpu_out     dpe_rope(backend="cpu", out=...) into preallocated buffers
    (on a GPU: cuda / cuda_out, the same for the CUDA kernel, and triton, the Triton
    kernel with outputs allocated by the call)
    plain_rope  one plain RoPE rotation of q and k in PyTorch (HF style), allocating
    copy_out    a memory copy of the same bytes into the same preallocated buffers:
                q -> q_normal, q_scaled; k -> k_normal, k_scaled (broadcast over
                the query heads of a KV head when the mask is per query head),
                token-blocked so q and k are read from DRAM once, as the kernel does
    copy        the same copy into freshly allocated outputs (pays the page faults
                that `cpu` pays for its fresh outputs)

Bytes = read q and k once + write the four outputs. Ratios: reference/cpu
(target >= 10), cpu_out/copy_out and cpu/copy (target <= 1.5); on a GPU the same
ratios for cuda and triton. GPU times are the best of several repeats of the mean
over a burst of calls between two synchronisations (one call is tens of microseconds,
so a single synchronised call would mostly time the launch).
"""
from __future__ import annotations

import argparse
import sys

import torch

import dpe_kernels
from dpe_kernels import DPEConfig, dpe_rope

from .common import PAPER_SCALES as SCALES, SCRIPT_NAMES, WINDOW, machine_description, report_preamble, time_min

H_Q, H_K, HEAD_DIM = 32, 8, 128
COPY_BLOCK_TOKENS = 128  # 128 tokens x 20 KiB of q/k = 2.5 MiB: stays in L2/L3 for the second read


def make_case(tokens: int, dtype: torch.dtype, mask_kind: str, seed: int = 0, device="cpu"):
    case = _make_case_cpu(tokens, dtype, mask_kind, seed)
    return tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in case)


def _make_case_cpu(tokens, dtype, mask_kind, seed):
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
    if q.is_cuda:  # one copy kernel per output: no cache blocking on a GPU
        qn.copy_(q)
        qs.copy_(q)
        kn.copy_(k)
        ks.view(k.shape[0], k.shape[1], rep, k.shape[2]).copy_(k[:, :, None])
        return out
    for t0 in range(0, q.shape[0], COPY_BLOCK_TOKENS):
        sl = slice(t0, t0 + COPY_BLOCK_TOKENS)
        qb, kb = q[sl], k[sl]
        qn[sl].copy_(qb)
        qs[sl].copy_(qb)
        kn[sl].copy_(kb)
        ks[sl].view(kb.shape[0], kb.shape[1], rep, kb.shape[2]).copy_(kb[:, :, None])
    return out


def fused_backends(device) -> list:
    """The compiled backends benchmarked on this device: cpu; or cuda and triton."""
    avail = dpe_kernels.available_rope_backends(device)
    want = ["cpu"] if torch.device(device).type == "cpu" else ["cuda", "triton"]
    return [b for b in want if b in avail]


def methods(q, k, pos, inv, cfg, mask):
    fused = fused_backends(q.device)
    bufs = dpe_rope(q, k, pos, inv, cfg, mask, backend=fused[0])
    copy_bufs = tuple(torch.empty_like(b) for b in bufs)
    fns = {"reference": lambda: dpe_rope(q, k, pos, inv, cfg, mask, backend="reference")}
    for b in fused:
        fns[b] = lambda b=b: dpe_rope(q, k, pos, inv, cfg, mask, backend=b)
        if b != "triton":  # the Triton path has no in-place output (out= would add a copy)
            fns[b + "_out"] = lambda b=b: dpe_rope(q, k, pos, inv, cfg, mask, backend=b, out=bufs)
    fns.update({
        "plain_rope": lambda: plain_rope(q, k, pos, inv),
        "copy_out": lambda: copy_into(copy_bufs, q, k),
        "copy": lambda: copy_into(tuple(torch.empty_like(b) for b in bufs), q, k),
    })
    return fns, bufs


def moved_bytes(q, k, outs) -> int:
    return (q.numel() + k.numel() + sum(o.numel() for o in outs)) * q.element_size()


def run_table(token_counts, dtypes, mask_kinds, repeats, device="cpu"):
    rows = []
    for tokens in token_counts:
        for dtype in dtypes:
            for mask_kind in mask_kinds:
                q, k, pos, inv, cfg, mask = make_case(tokens, dtype, mask_kind, device=device)
                fns, bufs = methods(q, k, pos, inv, cfg, mask)
                nbytes = moved_bytes(q, k, bufs)
                times = {}
                for name, fn in fns.items():
                    times[name] = time_min(fn, repeats if name != "reference" else max(2, repeats // 2),
                                           budget_s=20.0, device=device)
                rows.append((tokens, dtype, mask_kind, nbytes, times))
                print(format_row(rows[-1]), flush=True)
                del q, k, bufs, fns
    return rows


def _columns(t: dict):
    """(method names timed, fused backends) of one row, in table order."""
    fused = [b for b in ("cpu", "cuda", "triton") if b in t]
    timed = ["reference"] + [m for b in fused for m in (b, b + "_out") if m in t] + ["plain_rope", "copy", "copy_out"]
    return timed, fused


def header(device="cpu") -> str:
    t = dict.fromkeys(["reference", "plain_rope", "copy", "copy_out"])
    for b in (["cpu"] if torch.device(device).type == "cpu" else ["cuda", "triton"]):
        t[b] = None
        if b != "triton":
            t[b + "_out"] = None
    timed, fused = _columns(t)
    cols = ["T", "dtype", "mask", "MB moved"] + [f"{m} ms" for m in timed]
    for b in fused:
        best = b + "_out" if b + "_out" in t else b
        cols += [f"{best} GB/s", f"reference/{b}", f"{b}/copy"] + ([f"{best}/copy_out"] if best != b else [])
    return "| " + " | ".join(cols) + " |\n" + "|---" * len(cols) + "|"



def format_row(row) -> str:
    tokens, dtype, mask_kind, nbytes, t = row
    timed, fused = _columns(t)
    ms_digits = 1 if "cpu" in fused else 3
    cells = [str(tokens), str(dtype).replace("torch.", ""), mask_kind, f"{nbytes / 1e6:.0f}"]
    cells += [f"{t[m] * 1e3:.{ms_digits}f}" for m in timed]
    for b in fused:
        best = b + "_out" if b + "_out" in t else b
        cells += [f"{nbytes / t[best] / 1e9:.1f}", f"{t['reference'] / t[b]:.1f}x", f"{t[b] / t['copy']:.2f}"]
        if best != b:
            cells.append(f"{t[best] / t['copy_out']:.2f}")
    return "| " + " | ".join(cells) + " |"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--masks", nargs="+", default=["none", "per_q"], choices=["none", "per_q"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", help="write the markdown report here (e.g. bench/results/rope_cpu.md)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible")
    if not fused_backends(args.device):
        sys.exit(f"no compiled backend for {args.device} (extension: {dpe_kernels.extension_error()})")
    dtypes = [getattr(torch, d) for d in args.dtypes]
    machine = machine_description(args.device)
    print(machine)
    print(header(args.device))
    rows = run_table(args.tokens, dtypes, args.masks, args.repeats, args.device)
    where = "the CPU" if args.device == "cpu" else "a GPU"
    if args.out:
        with open(args.out, "w") as f:
            f.write(report_preamble(f"DPE rotary step on {where}: fused kernel vs unfused reference vs memory copy",
                                    SCRIPT_NAMES["rope"], argv, machine))
            f.write(f"- Shapes: q [T, {H_Q}, {HEAD_DIM}], k [T, {H_K}, {HEAD_DIM}], positions 0..T-1, "
                    f"window {WINDOW}, scales {SCALES}; mask `per_q` = 48 of 64 pairs per query head "
                    f"(k_scaled then has {H_Q} heads), `none` = every pair scaled.\n")
            f.write("- Each time is the best of several calls after a warm-up, all measured in this one run "
                    "(on a GPU: the best of several bursts of 20 calls, each burst's mean). "
                    "`cpu`/`cuda`/`triton`/`copy` allocate their outputs (on the CPU they pay first-touch page "
                    "faults); `*_out`/`copy_out` write preallocated buffers. GB/s counts q and k read once plus "
                    "the four outputs written.\n\n")
            f.write(header(args.device) + "\n")
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
    sys.exit(main())
