"""Quality of DPE and the baselines on SmolLM2-135M-Instruct (8K pre-training length):
passkey retrieval and loss by position, written to bench/results/<name>.md.

    python bench/eval_quality.py                  # run (or resume) every step, then write the report
    python bench/eval_quality.py --dry-run        # print the `dpe eval` commands only
    python bench/eval_quality.py --device cuda --name quality_smollm2   # the committed GPU run
    python bench/eval_quality.py --report-only    # rebuild the table and plots from the JSONL

Every step is one `dpe eval` command over one shared JSONL (bench/results/<name>/results.jsonl);
an interrupted run resumes where it stopped when started again. A method that scores 0 at a
length is skipped at longer lengths of that task (the table says "skipped (scored 0 at L)").

Steps (all six methods: rope, pi, ntk, yarn, self_extend, dpe):
  0. the prompt format: plain RoPE at 4K and 8K with the raw prompt and with the model's chat
     template, 5 depths (0, 25, 50, 75, 100 %) x 2 keys each; the format with more correct
     answers is used for every method below (a tie keeps raw, the paper's format);
  1. passkey at 4K, 8K, 16K: 5 depths x 2 keys;
  2. passkey at 32K: 3 depths (0, 50, 100 %) x 1 key on the CPU, 5 depths x 2 keys on a GPU;
  3. loss by position over 32K tokens of the essays (1K buckets): 1 text on the CPU, 3 on a GPU;
  4. (--with-niah, the default on a GPU) 4-needle NIAH at 4K-32K, 3 depths x 1 sample;
  5. the report: markdown table, heatmap PNGs, loss_by_position.png.

Cost on the 2-core CPU (float32, one sample, while other jobs shared it): 4K ~40-50 s,
8K ~110-175 s, 16K ~225 s (rope) / ~375 s (dpe); 32K about 3-4x 16K. Every step without
skipping: about 15 h there. On one H100 the whole set takes minutes.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ["rope", "pi", "ntk", "yarn", "self_extend", "dpe"]
FORMATS = ["raw", "chat"]

NOTES = """\
SmolLM2-135M-Instruct (Q4_1 GGUF de-quantised to float32; Llama architecture, 30 layers, 9 query /
3 KV heads, head_dim 64, RoPE theta 1e5, 8K pre-training length). Produced by
`{command}` (the `dpe eval` commands it prints with --dry-run); the device of every sample is
recorded in the JSONL and named below.

Methods, at each evaluated length L (extension factor f = max(1, L / 8192)): rope = plain RoPE;
pi / ntk / yarn with factor f; self_extend = window 1024, one group of scale 2 * ceil(f);
dpe = window 1024, 8 groups of 4 pairs, {dpe_what}. Greedy decoding; passkey = exact match of
the first number in the answer.

Prompt format: chosen by step 0 of the script (plain RoPE at 4K and 8K, raw prompt vs the
model's chat template, 5 depths x 2 keys each; more correct answers wins, a tie keeps raw):
{format_line}. Every method below uses it.
"""
DPE_STARTING = ("the uncalibrated starting scales of dpe_kernels/eval/methods.py (2 for groups whose "
                "wavelengths fit the window, half the large scale for those that fit the pre-training length, "
                "2 * ceil(f) beyond), no key-dimension mask")


def paths(name: str):
    out = os.path.join(HERE, "results", name)
    return out, os.path.join(out, "results.jsonl"), os.path.join(HERE, "results", name + ".md")


def _passkey_accuracy(jsonl: str, fmt: str):
    """{(method, length): (correct, samples)} of the passkey records in prompt format fmt."""
    from dpe_kernels.tools.eval.runner import read_records

    acc = {}
    for r in read_records(jsonl) if os.path.isfile(jsonl) else []:
        if r.get("task") != "passkey" or r.get("format") != fmt or r.get("skipped"):
            continue
        c = acc.setdefault((r["method"], int(r["length"])), [0, 0])
        c[0] += int(bool(r.get("correct")))
        c[1] += 1
    return acc


def format_choice(jsonl: str):
    """(chosen format, {format: (correct, samples)}) from the step-0 records: rope, passkey, 4K and 8K."""
    counts = {}
    for f in FORMATS:
        acc = _passkey_accuracy(jsonl, f)
        counts[f] = tuple(sum(acc.get(("rope", L), (0, 0))[i] for L in (4096, 8192)) for i in (0, 1))
    best = max(FORMATS, key=lambda f: (counts[f][0], f == "raw"))  # a tie keeps raw
    return best, counts


def verdict(jsonl: str, fmt: str) -> str:
    """The issue's three passkey targets, checked against the records (markdown)."""
    acc = _passkey_accuracy(jsonl, fmt)

    def a(m, L):
        c = acc.get((m, L))
        return None if not c else c[0] / c[1]

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.0f}%"

    ref = a("rope", 4096)
    lines = ["## Targets (computed from the records by bench/eval_quality.py)", "",
             "| target | measured | met |", "|---|---|---|"]
    for L in (16384, 32768):
        d = a("dpe", L)
        ok = d is not None and ref is not None and d >= 0.9 * ref
        lines.append(f"| DPE at {L // 1024}K >= 90% of plain RoPE at 4K ({pct(ref)}) | {pct(d)} | "
                     f"{'yes' if ok else '**no**'} |")
    for L in (4096, 8192):
        d, r = a("dpe", L), a("rope", L)
        ok = d is not None and r is not None and d >= r
        lines.append(f"| DPE not below plain RoPE at {L // 1024}K | DPE {pct(d)}, RoPE {pct(r)} | "
                     f"{'yes' if ok else '**no**'} |")
    lengths = sorted({L for (m, L) in acc})
    for L in lengths:
        d = a("dpe", L)
        others = {m: a(m, L) for m in METHODS if m != "dpe" and a(m, L) is not None}
        best = max(others.items(), key=lambda kv: kv[1]) if others else None
        ok = d is not None and (best is None or d >= best[1])
        lines.append(f"| DPE at least as good as every baseline at {L // 1024}K | DPE {pct(d)}, best baseline "
                     f"{best[0] + ' ' + pct(best[1]) if best else 'n/a'} | {'yes' if ok else '**no**'} |")
    lines.append("")
    lines.append("(A baseline skipped at a length after scoring 0 at a shorter one counts as below DPE there.)")
    return "\n".join(lines) + "\n"


def commands(name: str, gpu: bool, fmt: str, with_niah: bool, extra=()):
    out, jsonl, table = paths(name)
    io = ["--out-dir", out, "--jsonl", jsonl, *extra]
    common = [*io, "--methods", *METHODS, "--format", fmt]
    fmt_steps = [["eval", "--task", "passkey", "--lengths", "4096", "8192", "--depths", "5", "--samples", "2",
                  "--format", f, *io, "--methods", "rope"] for f in FORMATS]
    steps = [
        ["eval", "--task", "passkey", "--lengths", "4096", "8192", "16384", "--depths", "5", "--samples", "2",
         *common],
        ["eval", "--task", "passkey", "--lengths", "32768", "--depths", *(["5", "--samples", "2"] if gpu else
                                                                         ["3", "--samples", "1"]), *common],
        ["eval", "--task", "ppl", "--lengths", "32768", "--samples", "3" if gpu else "1", "--bucket", "1024",
         *common],
    ]
    if with_niah:
        steps.append(["eval", "--task", "niah", "--lengths", "4096", "8192", "16384", "32768", "--depths", "3",
                      "--samples", "1", *common])
    report = ["eval", "--report-only", "--out-dir", out, "--jsonl", jsonl, "--table", table,
              "--title", "DPE vs baselines on SmolLM2-135M-Instruct (8K trained)"]
    return fmt_steps, steps, report


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="quality_smollm2",
                    help="results name: bench/results/NAME.md and bench/results/NAME/ (default: quality_smollm2)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    ap.add_argument("--with-niah", action="store_true", default=None,
                    help="also run the 4-needle NIAH (default: on a GPU only)")
    ap.add_argument("--report-only", action="store_true", help="only rebuild the table and plots")
    ap.add_argument("--notes", default=None, help="@file: extra text put above the generated notes")
    ap.add_argument("--produced-by", default=None,
                    help="command named in the report (default: this script's command line)")
    args = ap.parse_args(argv)
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    gpu = device == "cuda"
    with_niah = gpu if args.with_niah is None else args.with_niah
    extra = ["--device", device]
    out, jsonl, table = paths(args.name)
    os.makedirs(out, exist_ok=True)
    fmt_steps, _, report = commands(args.name, gpu, "raw", with_niah, extra)
    if args.dry_run:
        for c in fmt_steps:
            print("dpe " + " ".join(shlex.quote(x) for x in c))
        print("# then, with FORMAT = the format with more correct answers above (tie: raw):")
        for c in commands(args.name, gpu, "FORMAT", with_niah, extra)[1] + [report]:
            print("dpe " + " ".join(shlex.quote(x) for x in c))
        return 0
    from dpe_kernels.tools.cli import main as dpe_main

    def run(c):
        print("\n$ dpe " + " ".join(shlex.quote(x) for x in c[:14]) + (" ..." if len(c) > 14 else ""), flush=True)
        return dpe_main(c)

    if not args.report_only:
        for c in fmt_steps:
            if run(c):
                return 1
    fmt, counts = format_choice(jsonl)
    _, steps, report = commands(args.name, gpu, fmt, with_niah, extra)
    if not args.report_only:
        for c in steps:
            if run(c):
                return 1
    format_line = ", ".join(f"{f} {c[0]}/{c[1]}" for f, c in counts.items()) + f" correct -> **{fmt}**"
    cmd = "python bench/eval_quality.py" + (f" --name {args.name}" if args.name != "quality_smollm2" else "") + \
        (f" --device {args.device}" if args.device != "auto" else "")
    notes = NOTES.format(command=args.produced_by or cmd, dpe_what=DPE_STARTING, format_line=format_line)
    if os.path.isfile(jsonl):
        notes += "\n" + verdict(jsonl, fmt)
    if args.notes:
        notes = open(args.notes[1:] if args.notes.startswith("@") else args.notes).read().rstrip() + "\n\n" + notes
    return run(report + ["--notes", notes])


if __name__ == "__main__":
    sys.exit(main())
