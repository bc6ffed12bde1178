"""Benchmark of DPE decode over a paged cache of UNROTATED keys on the CPU (the compiled
paged_decode_rotary op) against the compiled paged_decode over a ROTATED cache.

    python -m dpe_kernels.tools.benchmarks.paged_rotary [--contexts 4096 16384] [--batches 1 8]
        [--dtypes float32 bfloat16] [--masks none preset] [--out FILE]
    python -m dpe_kernels.tools.benchmarks.paged_rotary --quick      (tiny sizes, a smoke run)

One decode step (one query per sequence, every sequence L keys long) with SmolLM2-135M's shapes
(H_q 9, H_k 3, D 64, rope_theta 100000) and its shipped preset (window 1024, groups of 4 pairs at
scales 16 1 8 8 4 4 2 2; "preset" mask: layer 0's per-query-head key dimensions, "none": every
pair a key dimension), on head-major blocks of 128 like vLLM's CPU cache, shuffled block table:

    compact   torch.ops.dpe_kernels.paged_decode_rotary: the unrotated query and an engine buffer
              [num_blocks, H_k, 128, 2D] (k | v), every key rotated as it is read from the float32
              cos/sin table (dpe_kernels.rotary_table) at its own positions
    rotated   torch.ops.dpe_kernels.paged_decode: the rotated queries q_normal / q_scaled and an
              engine buffer [num_blocks, H_k, 128, 3D] (k_normal | k_scaled | v); with the preset
              mask k_scaled has H_q heads (a second buffer [num_blocks, H_q, 128, D]), as
              dpe_rope_and_cache writes it

Both ops are called directly (no Python validation), one run, same process; the ratio
compact / rotated is what to read (lower is better for compact; other jobs may share the
machine). The rotated path's per-step cost of rotating q and the new key (dpe_rope_and_cache) is
not counted; nor is the compact path's smaller cache (D fewer values per key and KV head, H_q - H_k
fewer with the mask). The best of --repeats timed calls after one warm-up (common.time_min).
"""
from __future__ import annotations

import argparse
import math
import os

import torch

from dpe_kernels import DPEConfig, rotary_table

from .common import machine_description, report_preamble, time_min

HEADER = ("| dtype | mask | B | L | compact ms | rotated ms | compact/rotated | max abs diff |\n"
          "|---|---|---|---|---|---|---|---|")
H_Q, H_K, D, BLOCK, THETA = 9, 3, 64, 128, 100000.0


def smollm2_inv_freq():
    """SmolLM2-135M's rotary frequencies (float32 [D / 2])."""
    return 1.0 / (THETA ** (torch.arange(0, D, 2, dtype=torch.float32) / D))


def make_inputs(batch, length, dtype, masked, config):
    """The same random unrotated keys in both caches (the rotated one rotated by the method)."""
    from dpe_kernels.reference import rotary_indices, table_rotate

    p = D // 2
    inv_freq = smollm2_inv_freq()
    table = rotary_table(inv_freq, length)
    scales = config.pair_scales()
    w = config.window
    kd = config.layer_mask(0).bool() if masked else None
    n_log = -(-length // BLOCK)
    nb = batch * n_log + 3
    bt = torch.randperm(nb)[: batch * n_log].view(batch, n_log).to(torch.int32)
    seq_lens = torch.full((batch,), length, dtype=torch.int32)
    k = torch.randn(nb, H_K, BLOCK, D)
    v = torch.randn(nb, H_K, BLOCK, D)
    q = torch.randn(batch, H_Q, D)
    # compact engine buffer: k | v
    cbuf = torch.cat([k, v], -1).to(dtype)
    kc, vc = (cbuf[..., i * D: (i + 1) * D].transpose(1, 2) for i in range(2))
    # rotated caches: each physical block's keys rotated at their logical positions
    pos = torch.zeros(nb, BLOCK, dtype=torch.int64)
    for b in range(batch):
        for j in range(n_log):
            pos[bt[b, j]] = j * BLOCK + torch.arange(BLOCK)
    pos = pos.clamp(max=length - 1).reshape(-1)
    kd_k = torch.ones(H_K, p, dtype=torch.bool)
    kd_q = kd if masked else torch.ones(H_Q, p, dtype=torch.bool)
    kt = k.transpose(1, 2).reshape(nb * BLOCK, H_K, D)  # [tokens, H_k, D]
    kn_i, _, _ = rotary_indices(pos, scales, w, kd_k)
    kn = table_rotate(kt, kn_i, table, D, True, torch.float32)
    if masked:
        _, _, ks_i = rotary_indices(pos, scales, w, kd)
        ks = table_rotate(kt.repeat_interleave(H_Q // H_K, 1), ks_i, table, D, True, torch.float32)
    else:
        _, _, ks_i = rotary_indices(pos, scales, w, kd_k)
        ks = table_rotate(kt, ks_i, table, D, True, torch.float32)
    kn = kn.view(nb, BLOCK, H_K, D).transpose(1, 2)
    ks = ks.view(nb, BLOCK, -1, D).transpose(1, 2)
    if masked:
        rbuf = torch.cat([kn, v], -1).to(dtype)
        ksbuf = ks.contiguous().to(dtype)
        rk, rv = rbuf[..., :D].transpose(1, 2), rbuf[..., D:].transpose(1, 2)
        rks = ksbuf.transpose(1, 2)
    else:
        rbuf = torch.cat([kn, ks, v], -1).to(dtype)
        rk, rks, rv = (rbuf[..., i * D: (i + 1) * D].transpose(1, 2) for i in range(3))
    m = torch.full((1,), length - 1)
    qn_i, qs_i, _ = rotary_indices(m, scales, w, kd_q)
    qn = table_rotate(q, qn_i.expand(batch, -1, -1), table, D, True, torch.float32).to(dtype)
    qs = table_rotate(q, qs_i.expand(batch, -1, -1), table, D, True, torch.float32).to(dtype)
    compact = (q.to(dtype), kc, vc, bt, seq_lens, table, scales[None].clone(), torch.tensor([w]),
               torch.zeros(batch, dtype=torch.int32), None if kd is None else kd[None].clone(), D, True)
    rotated = (qn, qs, rk, rks, rv, bt, seq_lens, w)
    return compact, rotated


def run_case(batch, length, dtype, masked, config, repeats, budget):
    compact_args, rotated_args = make_inputs(batch, length, dtype, masked, config)
    scale = 1.0 / math.sqrt(D)

    def compact():
        return torch.ops.dpe_kernels.paged_decode_rotary(*compact_args, scale, length)

    def rotated():
        return torch.ops.dpe_kernels.paged_decode(*rotated_args, scale, length)

    diff = (compact()[0] - rotated()[0]).abs().max().item()
    # interleaved, best of each: the two see the same background load
    t = {"compact": float("inf"), "rotated": float("inf")}
    for _ in range(3):
        for name, fn in (("compact", compact), ("rotated", rotated)):
            t[name] = min(t[name], time_min(fn, repeats, budget / 3) * 1e3)
    return dict(dtype=str(dtype).replace("torch.", ""), mask="preset" if masked else "none", B=batch, L=length,
                diff=diff, **t)


def fmt(r):
    return (f"| {r['dtype']} | {r['mask']} | {r['B']} | {r['L']} | {r['compact']:.2f} | {r['rotated']:.2f} "
            f"| {r['compact'] / r['rotated']:.2f} | {r['diff']:.2e} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", help="keys per sequence L (default 4096 16384)")
    ap.add_argument("--batches", type=int, nargs="+", help="sequences per step (default 1 8)")
    ap.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16", "float16"],
                    help="(default float32 bfloat16)")
    ap.add_argument("--masks", nargs="+", choices=["none", "preset"], help="(default none preset)")
    ap.add_argument("--preset", default="smollm2-135m",
                    help="the configuration's scales (default smollm2-135m); 'auto': the starting scales for "
                         "--target-length, as the vLLM benchmark runs them (no mask of its own: --masks none)")
    ap.add_argument("--target-length", type=int, default=16464, help="for --preset auto (default 16464)")
    ap.add_argument("--repeats", type=int, help="timed calls per method and round (default 15)")
    ap.add_argument("--budget", type=float, default=15.0, help="seconds per method before fewer repeats")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (L 2048, B 1, 2 repeats)")
    ap.add_argument("--out", help="write the markdown table here")
    args = ap.parse_args(argv)
    from dpe_kernels import ops

    if not (ops.has_kernel("paged_decode_rotary", "CPU") and ops.has_kernel("paged_decode", "CPU")):
        raise SystemExit("the compiled CPU ops paged_decode_rotary / paged_decode are not loaded "
                         f"({ops.EXT_ERROR or 'extension built from older sources'})")
    defaults = (dict(contexts=[2048], batches=[1], dtypes=["float32"], masks=["none", "preset"], repeats=2)
                if args.quick else
                dict(contexts=[4096, 16384], batches=[1, 8], dtypes=["float32", "bfloat16"], masks=["none", "preset"],
                     repeats=15))
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if any(x < 1 for x in args.contexts + args.batches):
        ap.error("--contexts and --batches must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    try:
        config = DPEConfig.from_preset(args.preset, inv_freq=smollm2_inv_freq(),
                                       train_length=8192, target_length=args.target_length)
    except ValueError as e:
        ap.error(f"--preset: {e}")
    if config.mask is None and "preset" in args.masks:
        ap.error(f"--masks preset: preset {args.preset!r} has no mask")
    machine = machine_description("cpu")
    load_start = os.getloadavg()[0]
    print(machine)
    print(HEADER)
    rows = []
    for dt in args.dtypes:
        for mk in args.masks:
            for b in args.batches:
                for length in args.contexts:
                    r = run_case(b, length, getattr(torch, dt), mk == "preset", config, args.repeats, args.budget)
                    rows.append(r)
                    print(fmt(r), flush=True)
    if args.out:
        text = report_preamble("DPE paged decode over unrotated keys on the CPU",
                               "-m dpe_kernels.tools.benchmarks.paged_rotary", argv, machine)
        text += (f"- SmolLM2-135M shapes H_q {H_Q} / H_k {H_K} / D {D}, head-major blocks of {BLOCK}, preset "
                 f"{args.preset} (window {config.window}, scales {config.scales}); best of {args.repeats} calls per method and round, 3 "
                 f"interleaved rounds; {torch.get_num_threads()} torch threads; 1-minute load average "
                 f"{load_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end (other jobs share the "
                 f"machine: compare the methods within a row, not across runs).\n\n{HEADER}\n")
        text += "\n".join(fmt(r) for r in rows) + "\n"
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
