"""bfloat16 against float32 for SmolLM2-135M-Instruct on this machine: speed of one forward at 8K
and 16K tokens, and agreement of the teacher-forced passkey score on the same samples.

    python bench/bf16_smollm2.py --threads 1                 # speed, then agreement (resumes)
    python bench/bf16_smollm2.py --report-only               # rebuild the report from the records

Records (one JSONL line per forward, resumable): bench/results/bf16_smollm2/records.jsonl;
report: bench/results/bf16_smollm2.md.

1. speed: one forward (the passkey-logprob scorer of `dpe detect`: one teacher-forced pass over a
   prompt of L tokens) at 8K and 16K, plain RoPE and Self-Extend-scaled DPE (every group at
   2 * ceil(L / 8K): the calibration's start), float32 and bfloat16, in the order
   fp32, bf16 per (method, length), so the two dtypes of a pair run back to back under the same load
   (after one unrecorded 1K warm-up forward per dtype);
2. agreement at 16K, DPE at the Self-Extend point: samples 0..N-1 of the scorer (depth (i % 5) / 4,
   key passkey_key(i)), each sample in float32 then bfloat16 (paired, so a partial run is still
   paired): the log-prob difference and exact-match flips. A float32 forward that the 16K
   calibration already made (its Self-Extend start on the same sample: the same computation) is
   taken from its records (marked "source") instead of being run again.

The model is loaded once per dtype (bfloat16: the GGUF de-quantised to float32 and cast). Times
are wall-clock seconds of the forward on a machine other jobs share: the report gives the load
average around each pair.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results", "bf16_smollm2")
RECORDS = os.path.join(OUT, "records.jsonl")
REPORT = os.path.join(HERE, "results", "bf16_smollm2.md")
DTYPES = ("float32", "bfloat16")


def _key(r):
    return (r["phase"], r["method"], r["length"], r["dtype"], r["sample"])


def run(args):
    import torch

    from dpe_kernels import DPEConfig
    from dpe_kernels.integrations.hf import apply_dpe
    from dpe_kernels.tools.calibrate import score_sample, self_extend_scales
    from dpe_kernels.tools.eval.methods import model_inv_freq
    from dpe_kernels.tools.eval.runner import append_record, resume_records
    from dpe_kernels.integrations.hf import train_length
    from dpe_kernels.tools.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    done = {_key(r) for r in resume_records(RECORDS)}
    models = {}

    def model(dtype):
        if dtype not in models:
            models[dtype] = load_model("smollm2", dtype=getattr(torch, dtype))
        return models[dtype]

    calibration = os.path.join(HERE, "results", "calibration_smollm2_16k", "detect.jsonl")

    def from_calibration(length, sample):
        """The 16K calibration's float32 record of the same forward (its Self-Extend start, same
        scorer and sample), if it has one: the same computation, not repeated."""
        from dpe_kernels.tools.eval.runner import read_records

        for r in read_records(calibration):
            if (r.get("target_length") == length and r.get("scorer") == "passkey-logprob" and not r.get("masked")
                    and r.get("dtype", "float32") == "float32" and r["sample"] == sample and r.get("window") == 1024
                    and r["scales"] == self_extend_scales(length, r["train_length"], 8)):
                return r
        return None

    def one(phase, method, length, dtype, sample):
        k = (phase, method, length, dtype, sample)
        if k in done:
            return
        if phase == "agreement" and dtype == "float32":
            r = from_calibration(length, sample)
            if r is not None:
                keep = {k2: v for k2, v in r.items() if k2 not in ("phase", "scales", "target_length", "scorer")}
                append_record(RECORDS, {**keep, "phase": phase, "method": method, "length": length, "dtype": dtype,
                                        "sample": sample, "source": "calibration_smollm2_16k/detect.jsonl"})
                done.add(k)
                print(f"{phase} {method} {length} {dtype} sample {sample}: from the calibration's records", flush=True)
                return
        m, tok = model(dtype)
        T = train_length(m)
        handle = None
        if method == "dpe_self_extend":
            P = int(model_inv_freq(m).shape[0])
            handle = apply_dpe(m, DPEConfig.uniform(1024, self_extend_scales(length, T, 8), P))
        load0 = os.getloadavg()[0]
        try:
            res = score_sample(m, tok, "passkey-logprob", length, sample, T)
        finally:
            if handle is not None:
                handle.remove()
        rec = {"phase": phase, "method": method, "length": length, "dtype": dtype, "sample": sample,
               "threads": torch.get_num_threads(), "load_before": round(load0, 2),
               "load_after": round(os.getloadavg()[0], 2), **res, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        append_record(RECORDS, rec)
        done.add(k)
        print(f"{phase} {method} {length} {dtype} sample {sample}: {res['seconds']:.1f} s, log-prob "
              f"{res['score']:.4f}, exact {res['exact']}", flush=True)

    if not args.skip_speed:
        for dtype in DTYPES:  # warm-up (first calls build the haystack, pick kernels): not recorded
            m, tok = model(dtype)
            score_sample(m, tok, "passkey-logprob", 1024, 0, train_length(m))
        for length in args.speed_lengths:
            for method in ("rope", "dpe_self_extend"):
                for dtype in DTYPES:
                    one("speed", method, length, dtype, 0)
    for i in range(args.samples):
        for dtype in DTYPES:
            one("agreement", "dpe_self_extend", args.agreement_length, dtype, i)
    return 0


def micro(threads):
    """Kernel-level context for the model numbers: a 2048^3 matmul and causal SDPA at 4K tokens
    (9 query heads, head_dim 64), float32 vs bfloat16, best of 5 after a warm-up."""
    import torch
    import torch.nn.functional as F

    from dpe_kernels.tools.eval.runner import append_record

    if threads:
        torch.set_num_threads(threads)

    def best(fn, n=5):
        fn()
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return min(out)

    g = torch.Generator().manual_seed(0)
    for dtype in DTYPES:
        dt = getattr(torch, dtype)
        a = torch.randn(2048, 2048, generator=g).to(dt)
        b = torch.randn(2048, 2048, generator=g).to(dt)
        q = torch.randn(1, 9, 4096, 64, generator=g).to(dt)
        k = torch.randn(1, 9, 4096, 64, generator=g).to(dt)
        v = torch.randn(1, 9, 4096, 64, generator=g).to(dt)
        for name, fn in (("matmul_2048", lambda: a @ b),
                         ("causal_sdpa_4k", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))):
            sec = best(fn)
            append_record(RECORDS, {"phase": "micro", "method": name, "length": 4096 if "sdpa" in name else 2048,
                                    "dtype": dtype, "sample": 0, "seconds": sec, "threads": torch.get_num_threads(),
                                    "load_before": round(os.getloadavg()[0], 2), "load_after": round(os.getloadavg()[0], 2),
                                    "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
            print(f"micro {name} {dtype}: {1e3 * sec:.1f} ms", flush=True)


def report():
    from dpe_kernels.tools.benchmarks.common import machine_description
    from dpe_kernels.tools.eval.runner import read_records
    from dpe_kernels.tools.eval.stats import t_interval

    recs = read_records(RECORDS)
    by = {_key(r): r for r in recs}
    lines = ["# bfloat16 vs float32, SmolLM2-135M-Instruct (CPU)", "",
             "Produced by `python bench/bf16_smollm2.py` (method in its docstring). Machine (the report "
             f"generator's view): {machine_description('cpu')}. Threads per forward and the load average "
             "before / after each forward are in the records (the machine was shared with other jobs).", "",
             "## Speed: one forward (teacher-forced passkey prompt)", "",
             "| method | length | float32 s | bfloat16 s | fp32 / bf16 | load avg (fp32, bf16) | threads |",
             "|---|---|---|---|---|---|---|"]
    lengths = sorted({r["length"] for r in recs if r["phase"] == "speed"})
    for method in ("rope", "dpe_self_extend"):
        for L in lengths:
            a, b = by.get(("speed", method, L, "float32", 0)), by.get(("speed", method, L, "bfloat16", 0))
            if not a and not b:
                continue
            fa = f"{a['seconds']:.1f}" if a else "not run"
            fb = f"{b['seconds']:.1f}" if b else "not run"
            ratio = f"{a['seconds'] / b['seconds']:.2f}x" if a and b else "-"
            la = f"{a['load_before']}-{a['load_after']}" if a else "-"
            lb = f"{b['load_before']}-{b['load_after']}" if b else "-"
            th = ", ".join(sorted({str(r['threads']) for r in (a, b) if r}))
            lines.append(f"| {method} | {L // 1024}K | {fa} | {fb} | {ratio} | {la}; {lb} | {th} |")
    lines += ["", "rope = the unpatched model (HF SDPA attention); dpe_self_extend = DPE with every group at "
              "Self-Extend's scale (the calibration's start; DPE attention backend auto).", ""]
    micro_rows = [(m, by.get(("micro", m, L, "float32", 0)), by.get(("micro", m, L, "bfloat16", 0)))
                  for m, L in (("matmul_2048", 2048), ("causal_sdpa_4k", 4096))]
    if any(a and b for _, a, b in micro_rows):
        lines += ["Kernels alone (`--micro`: best of 5 after a warm-up; torch's CPU kernels):", "",
                  "| kernel | float32 ms | bfloat16 ms | fp32 / bf16 | threads |", "|---|---|---|---|---|"]
        for m, a, b in micro_rows:
            if a and b:
                lines.append(f"| {m} | {1e3 * a['seconds']:.1f} | {1e3 * b['seconds']:.1f} | "
                             f"{a['seconds'] / b['seconds']:.2f}x | {a['threads']} |")
        lines.append("")
    pairs = []
    for r in recs:
        if r["phase"] == "agreement" and r["dtype"] == "float32":
            b = by.get(("agreement", r["method"], r["length"], "bfloat16", r["sample"]))
            if b:
                pairs.append((r, b))
    alen = sorted({a["length"] for a, _ in pairs})
    lines += [f"## Agreement at {', '.join(f'{L // 1024}K' for L in alen) or '16K'} (DPE at the Self-Extend "
              "point, passkey-logprob scorer)", ""]
    if pairs:
        d = [b["score"] - a["score"] for a, b in pairs]
        iv = t_interval(d) if len(d) > 1 else None
        flips = sum(a["exact"] != b["exact"] for a, b in pairs)
        absd = sorted(abs(x) for x in d)
        lines += [f"Paired samples: **{len(pairs)}** (of the 20 planned; samples 0..{len(pairs) - 1}).", "",
                  "| | value |", "|---|---|",
                  f"| mean log-prob float32 | {sum(a['score'] for a, _ in pairs) / len(pairs):.4f} |",
                  f"| mean log-prob bfloat16 | {sum(b['score'] for _, b in pairs) / len(pairs):.4f} |",
                  f"| mean difference bf16 - fp32 (95% t-interval) | {sum(d) / len(d):+.4f}"
                  + (f" [{iv.low:+.4f}, {iv.high:+.4f}]" if iv else "") + " |",
                  f"| median / max absolute difference | {absd[len(absd) // 2]:.4f} / {absd[-1]:.4f} |",
                  f"| exact-match flips | {flips} of {len(pairs)} |",
                  f"| exact matches float32 / bfloat16 | {sum(a['exact'] for a, _ in pairs):g} / "
                  f"{sum(b['exact'] for _, b in pairs):g} |", "",
                  "| sample | depth | fp32 log-prob | bf16 log-prob | difference | exact fp32 / bf16 |",
                  "|---|---|---|---|---|---|"]
        for a, b in pairs:
            lines.append(f"| {a['sample']} | {a['depth']} | {a['score']:.4f} | {b['score']:.4f} | "
                         f"{b['score'] - a['score']:+.4f} | {a['exact']:g} / {b['exact']:g} |")
    else:
        lines.append("No paired sample yet.")
    lines.append("")
    with open(REPORT, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {REPORT}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--speed-lengths", type=int, nargs="+", default=[8192, 16384])
    ap.add_argument("--agreement-length", type=int, default=16384)
    ap.add_argument("--samples", type=int, default=20, help="agreement samples (default: 20)")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--micro", action="store_true", help="only the kernel-level matmul / SDPA comparison")
    args = ap.parse_args(argv)
    for name in ("threads", "samples", "agreement_length"):
        v = getattr(args, name)
        if v is not None and v < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if any(x < 1 for x in args.speed_lengths):
        ap.error("--speed-lengths must be >= 1")
    os.makedirs(OUT, exist_ok=True)
    if args.micro:
        micro(args.threads)
    elif not args.report_only:
        rc = run(args)
        if rc:
            return rc
    report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
