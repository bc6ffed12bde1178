"""Benchmark of DPE decode over a PAGED KV cache on the CPU (dpe_paged_attention, backend "cpu").

    python -m dpe_kernels.tools.benchmarks.paged [--contexts 16384] [--batches 1 4]
        [--block-sizes 128 16] [--dtypes float32 bfloat16] [--configs 9/3/64] [--out FILE]
    python -m dpe_kernels.tools.benchmarks.paged --quick      (tiny sizes, a smoke run)

One decode step (one query per sequence, every sequence L keys long), on the same keys and
values laid out two ways, compared in one run:

    paged        dpe_paged_attention(backend="cpu", check_inputs=False, max_seqlen_* given) on a
                 head-major engine buffer [num_blocks, H_k, block_size, 2D + Dv] (vLLM's CPU
                 cache layout, k_normal | k_scaled | v side by side) with a shuffled block table:
                 the compiled paged_decode kernel (K and V read in place)
    chunked      the cpu backend's decode without the compiled extension (backends.paged_cpu.
                 decode_chunked: aten's CPU flash op over gathered chunks of blocks, lse merge)
    gather       the naive paged decode: gather every sequence's pages into contiguous tensors,
                 then dpe_attention(backend="cpu") (what the cpu backend avoids)
    dpe_contig   dpe_attention(backend="cpu") on contiguous [B, L, H_k, D] caches
    sdpa         plain decode: F.scaled_dot_product_attention(enable_gqa=True) of the normal
                 query over the contiguous [B, H_k, L, D] keys (no DPE)

Ratios: paged / dpe_contig, paged / sdpa and paged / chunked (lower is better for paged). The best of
--repeats timed calls after one warm-up (common.time_min). vLLM's CPU backend uses
block_size 128 by default (vllm/platforms/cpu.py), 16 is the GPU default.
"""
from __future__ import annotations

import argparse
import math
import os

import torch
import torch.nn.functional as F

from dpe_kernels import dpe_attention, dpe_paged_attention
from dpe_kernels.backends.paged_cpu import decode_chunked

from .common import WINDOW, machine_description, report_preamble, time_min

HEADER = ("| dtype | B | L | H_q/H_k/D | block | paged ms | chunked ms | gather ms | dpe_contig ms | sdpa ms "
          "| paged/dpe_contig | paged/sdpa | paged/chunked | max abs diff paged vs dpe_contig |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def parse_config(s: str):
    try:
        h_q, h_k, d = (int(x) for x in s.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H_q/H_k/D, got {s!r}") from None
    if h_k < 1 or h_q % h_k:
        raise argparse.ArgumentTypeError(f"H_q must be a multiple of H_k, got {s!r}")
    return h_q, h_k, d


def make_inputs(batch, length, h_q, h_k, d, bs, dtype):
    """Paged cache (head-major engine buffer, shuffled table) and the same keys contiguous."""
    n_log = -(-length // bs)
    nb = batch * n_log + 3
    buf = torch.randn(nb, h_k, bs, 3 * d).to(dtype)
    kc, ksc, vc = (buf[..., i * d: (i + 1) * d].transpose(1, 2) for i in range(3))  # [NB, bs, H_k, D] views
    bt = torch.randperm(nb)[: batch * n_log].view(batch, n_log).to(torch.int32)
    seq_lens = torch.full((batch,), length, dtype=torch.int32)
    qsl = torch.arange(batch + 1, dtype=torch.int32)
    idx = bt.long().reshape(-1)
    contig = [c.index_select(0, idx).reshape(batch, n_log * bs, h_k, d)[:, :length].contiguous()
              for c in (kc, ksc, vc)]
    qn, qs = torch.randn(batch, h_q, d).to(dtype), torch.randn(batch, h_q, d).to(dtype)
    return (qn, qs, kc, ksc, vc, bt, seq_lens, qsl), contig


def run_case(batch, length, cfg, bs, dtype, window, repeats, budget):
    h_q, h_k, d = cfg
    paged_args, (kn, ks, v) = make_inputs(batch, length, h_q, h_k, d, bs, dtype)
    qn, qs = paged_args[:2]
    kc, ksc, vc, bt = paged_args[2:6]

    def paged():
        return dpe_paged_attention(*paged_args, window, max_seqlen_q=1, max_seqlen_k=length,
                                   check_inputs=False, backend="cpu")

    scale = 1.0 / math.sqrt(d)

    def chunked():
        return decode_chunked(qn, qs, kc, ksc, vc, bt, paged_args[6], window, scale, length)[0]

    def gather():
        idx = bt.long().reshape(-1)
        g = [c.index_select(0, idx).reshape(batch, -1, *c.shape[2:])[:, :length] for c in (kc, ksc, vc)]
        return dpe_attention(qn[:, None], qs[:, None], *g, window, backend="cpu")[:, 0]

    def dpe_contig():
        return dpe_attention(qn[:, None], qs[:, None], kn, ks, v, window, backend="cpu")[:, 0]

    k_t, v_t = kn.transpose(1, 2), v.transpose(1, 2)

    def sdpa():
        return F.scaled_dot_product_attention(qn[:, :, None], k_t, v_t, enable_gqa=True)

    diff = (paged().float() - dpe_contig().float()).abs().max().item()
    t = {name: time_min(fn, repeats, budget) * 1e3
         for name, fn in (("paged", paged), ("chunked", chunked), ("gather", gather), ("dpe_contig", dpe_contig),
                          ("sdpa", sdpa))}
    return dict(dtype=str(dtype).replace("torch.", ""), B=batch, L=length, cfg="/".join(map(str, cfg)), bs=bs,
                diff=diff, **t)


def fmt(r):
    return (f"| {r['dtype']} | {r['B']} | {r['L']} | {r['cfg']} | {r['bs']} | {r['paged']:.2f} | {r['chunked']:.2f} "
            f"| {r['gather']:.2f} "
            f"| {r['dpe_contig']:.2f} | {r['sdpa']:.2f} | {r['paged'] / r['dpe_contig']:.2f} "
            f"| {r['paged'] / r['sdpa']:.2f} | {r['paged'] / r['chunked']:.2f} | {r['diff']:.2e} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", help="keys per sequence L (default 16384)")
    ap.add_argument("--batches", type=int, nargs="+", help="sequences per step (default 1 4)")
    ap.add_argument("--block-sizes", type=int, nargs="+", help="block_size (default 128 16)")
    ap.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16", "float16"],
                    help="(default float32 bfloat16)")
    ap.add_argument("--configs", type=parse_config, nargs="+", help="H_q/H_k/D (default 9/3/64, SmolLM2)")
    ap.add_argument("--window", type=int, help=f"DPE window (default {WINDOW})")
    ap.add_argument("--repeats", type=int, help="timed calls per method (default 15)")
    ap.add_argument("--budget", type=float, default=20.0, help="seconds per method before fewer repeats")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (L 2048, B 1, block 16, 2 repeats)")
    ap.add_argument("--out", help="write the markdown table here")
    args = ap.parse_args(argv)
    defaults = (dict(contexts=[2048], batches=[1], block_sizes=[16], dtypes=["float32"], configs=[(9, 3, 64)],
                     window=256, repeats=2) if args.quick else
                dict(contexts=[16384], batches=[1, 4], block_sizes=[128, 16], dtypes=["float32", "bfloat16"],
                     configs=[(9, 3, 64)], window=WINDOW, repeats=15))
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("contexts", "batches", "block_sizes"):
        if any(x < 1 for x in getattr(args, name)):
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.window < 1:
        ap.error("--window must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    machine = machine_description("cpu")
    load_start = os.getloadavg()[0]
    print(machine)
    print(HEADER)
    rows = []
    for dt in args.dtypes:
        for cfg in args.configs:
            for bs in args.block_sizes:
                for b in args.batches:
                    for length in args.contexts:
                        r = run_case(b, length, cfg, bs, getattr(torch, dt), args.window, args.repeats, args.budget)
                        rows.append(r)
                        print(fmt(r), flush=True)
    if args.out:
        text = report_preamble("DPE paged decode on the CPU", "-m dpe_kernels.tools.benchmarks.paged", argv, machine)
        text += (f"- Window {args.window}; best of {args.repeats} calls per method; "
                 f"{torch.get_num_threads()} torch threads; 1-minute load average {load_start:.2f} at the "
                 f"start, {os.getloadavg()[0]:.2f} at the end (other jobs share the machine: compare the "
                 f"methods within a row, not across runs).\n\n{HEADER}\n")
        text += "\n".join(fmt(r) for r in rows) + "\n"
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
