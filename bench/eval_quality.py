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

The log-prob plan (issue 12), ``--plan logprob`` (default name quality_smollm2_logprob):
every retrieval sample is scored by teacher forcing (``dpe eval --scoring logprob``: the answer's
log-probability and exact match from one forward, no generation), 5 depths x --keys keys (20 per
cell by default):
  1. passkey at 4K, plain RoPE only (the reference of the "90% of RoPE's own 4K accuracy" target);
  2. passkey and 4-needle NIAH at 16K and 32K, all six methods, no skip-after-0;
  3. loss by position over 32K tokens (3 texts), all six methods;
  4. every shipped calibrated preset named by --presets (default: smollm2-135m-16k and
     smollm2-135m-32k, those that exist) as method dpe with that preset, in its own JSONL under
     NAME/preset_<preset>/, at the lengths it was calibrated for (--past-calibration: at 32K too,
     with --allow-longer), and the loss at 32K where allowed;
  5. the report: one table over all records (a preset shows as dpe[PRESET]) and the issue's
     targets computed from the records: calibrated DPE not below Self-Extend nor YaRN on passkey
     log-prob (paired over the same samples, 95% t-interval), at least 90% of plain RoPE's 4K
     exact-match accuracy at 32K, loss beyond 8K not above Self-Extend's, with a per-depth table.
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


# --------------------------------------------------------------------------- the log-prob plan (issue 12)
DEFAULT_PRESETS = ["smollm2-135m-16k", "smollm2-135m-32k"]


def _preset_dir(out: str, preset: str) -> str:
    return os.path.join(out, f"preset_{preset}")


def logprob_commands(name: str, presets, extra=(), keys: int = 4, past_calibration: bool = False):
    """(steps, [(preset, jsonl)]) of the log-prob plan."""
    from dpe_kernels.config import DPEConfig, calibrated_presets

    out, jsonl, _ = paths(name)
    io = ["--out-dir", out, "--jsonl", jsonl, "--no-plots", *extra]
    cell = ["--depths", "5", "--samples", str(keys), "--scoring", "logprob", "--format", "raw", "--no-skip-zero"]
    steps = [["eval", "--task", "passkey", "--lengths", "4096", "--methods", "rope", *cell, *io]]
    for task in ("passkey", "niah"):
        steps.append(["eval", "--task", task, "--lengths", "16384", "32768", "--methods", *METHODS, *cell, *io])
    steps.append(["eval", "--task", "ppl", "--lengths", "32768", "--samples", "3", "--bucket", "1024",
                  "--methods", *METHODS, *io])
    variants = []
    shipped = calibrated_presets()
    for p in presets:
        if p not in shipped:
            print(f"preset {p!r} is not shipped (not calibrated yet): skipped", flush=True)
            continue
        cal = DPEConfig.from_preset(p).calibrated_length
        lengths = [L for L in (16384, 32768) if past_calibration or cal is None or L <= cal]
        pout = _preset_dir(out, p)
        pj = os.path.join(pout, "results.jsonl")
        pio = ["--out-dir", pout, "--jsonl", pj, "--no-plots", "--methods", "dpe", "--preset", p, *extra]
        longer = ["--allow-longer"] if past_calibration else []
        for task in ("passkey", "niah"):
            steps.append(["eval", "--task", task, "--lengths", *map(str, lengths), *cell, *pio, *longer])
        if 32768 in lengths:
            steps.append(["eval", "--task", "ppl", "--lengths", "32768", "--samples", "3", "--bucket", "1024",
                          *pio, *longer])
        variants.append((p, pj))
    return steps, variants


def _paired(a_recs, b_recs):
    """Paired differences a - b of the log-prob over (depth, sample)."""
    b = {(r["depth"], r["sample"]): r["logprob"] for r in b_recs}
    return [r["logprob"] - b[(r["depth"], r["sample"])] for r in a_recs if (r["depth"], r["sample"]) in b]


def logprob_targets(records, variants) -> str:
    """The issue-12 targets from the merged records (markdown)."""
    from dpe_kernels.tools.eval.stats import t_interval

    def sel(method, task, L):
        return [r for r in records if r.get("method") == method and r.get("task") == task
                and int(r.get("length", 0)) == L and not r.get("skipped")
                and (task == "ppl" or r.get("scoring") == "logprob")]

    def acc(rs):
        return sum(float(r["score"]) for r in rs) / len(rs) if rs else None

    def beyond(rs, train=8192):
        vals = [sum(r["bucket_losses"][train // r["bucket"]:]) / len(r["bucket_losses"][train // r["bucket"]:])
                for r in rs]
        return sum(vals) / len(vals) if vals else None

    lines = ["## Targets (computed from the records by bench/eval_quality.py --plan logprob)", "",
             "Log-prob differences are paired over the same (depth, key) samples; interval: 95% Student-t. "
             "'Not below' is met when the interval's upper end is >= 0; 'above' when its lower end is > 0.", "",
             "| target | length | measured | met |", "|---|---|---|---|"]
    rope4k = acc(sel("rope", "passkey", 4096))
    for label, _ in variants or [("dpe", None)]:
        m = f"dpe[{label}]" if _ else "dpe"
        for L in (16384, 32768):
            mine = sel(m, "passkey", L)
            if not mine:
                lines.append(f"| {m} passkey log-prob vs self_extend / yarn | {L // 1024}K | not run | - |")
                continue
            for base in ("self_extend", "yarn"):
                d = _paired(mine, sel(base, "passkey", L))
                if len(d) < 2:
                    lines.append(f"| {m} not below {base} (passkey log-prob) | {L // 1024}K | {len(d)} paired samples | - |")
                    continue
                iv = t_interval(d)
                met = "above" if iv.low > 0 else ("yes (within the interval)" if iv.high >= 0 else "**no**")
                lines.append(f"| {m} not below {base} (passkey log-prob) | {L // 1024}K | {iv.mean:+.3f} "
                             f"[{iv.low:+.3f}, {iv.high:+.3f}], n={iv.n} | {met} |")
        a32 = acc(sel(m, "passkey", 32768))
        if a32 is not None and rope4k is not None:
            lines.append(f"| {m} exact match at 32K >= 90% of rope at 4K ({100 * rope4k:.0f}%) | 32K | "
                         f"{100 * a32:.0f}% | {'yes' if a32 >= 0.9 * rope4k else '**no**'} |")
        lm, ls = beyond(sel(m, "ppl", 32768)), beyond(sel("self_extend", "ppl", 32768))
        if lm is not None and ls is not None:
            lines.append(f"| {m} loss beyond 8K <= self_extend's ({ls:.4f}) | 32K | {lm:.4f} | "
                         f"{'yes' if lm <= ls else '**no**'} |")
    lines += ["", "### Where it is won or lost: passkey log-prob per depth (mean over keys)", ""]
    for L in (16384, 32768):
        methods = [m for m in (["self_extend", "yarn", "dpe"] + [f"dpe[{p}]" for p, _ in variants])
                   if sel(m, "passkey", L)]
        if not methods:
            continue
        depths = sorted({r["depth"] for m in methods for r in sel(m, "passkey", L)})
        lines += [f"{L // 1024}K:", "", "| depth | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
        for dep in depths:
            cells = []
            for m in methods:
                v = [r["logprob"] for r in sel(m, "passkey", L) if r["depth"] == dep]
                cells.append(f"{sum(v) / len(v):.2f}" if v else "-")
            lines.append(f"| {100 * dep:.0f}% | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("Which group a calibrated preset changed, and by how much each change gained, is in its "
                 "calibration report (bench/results/calibration_smollm2_16k.md / _32k.md).")
    return "\n".join(lines) + "\n"


def main_logprob(args, extra) -> int:
    from dpe_kernels.tools.cli import main as dpe_main
    from dpe_kernels.tools.eval.report import write_report
    from dpe_kernels.tools.eval.runner import read_records

    name = args.name if args.name != "quality_smollm2" else "quality_smollm2_logprob"
    out, jsonl, table = paths(name)
    os.makedirs(out, exist_ok=True)
    steps, variants = logprob_commands(name, args.presets, extra, args.keys, args.past_calibration)
    if args.dry_run:
        for c in steps:
            print("dpe " + " ".join(shlex.quote(x) for x in c))
        return 0
    if not args.report_only:
        for c in steps:
            print("\n$ dpe " + " ".join(shlex.quote(x) for x in c[:16]) + " ...", flush=True)
            if dpe_main(c):
                return 1
    records = read_records(jsonl)
    for p, pj in variants:
        records += [{**r, "method": f"dpe[{p}]"} for r in read_records(pj)]
    if not records:
        print(f"no records in {jsonl}", file=sys.stderr)
        return 1
    notes = (f"SmolLM2-135M-Instruct (8K pre-training length). Produced by `python bench/eval_quality.py --plan "
             f"logprob{' --name ' + name if name != 'quality_smollm2_logprob' else ''}` (steps in its docstring). "
             "Retrieval samples are scored by teacher forcing (one forward per sample, no generation): the "
             "answer's log-probability and exact match. dpe = the uncalibrated starting scales; dpe[PRESET] = "
             "a shipped calibrated preset. Each sample's device and dtype are in the JSONL.\n\n"
             + logprob_targets(records, variants))
    for f in write_report(records, table, out, title="DPE vs baselines on SmolLM2-135M-Instruct: teacher-forced "
                          "log-prob (issue 12)", notes=notes):
        print(f"wrote {f}")
    return 0


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
    ap.add_argument("--plan", default="generate", choices=["generate", "logprob"],
                    help="generate: the first quality run (greedy answers); logprob: issue 12's teacher-forced "
                         "plan (see the docstring)")
    ap.add_argument("--presets", nargs="+", default=DEFAULT_PRESETS,
                    help="--plan logprob: calibrated presets to evaluate (those shipped)")
    ap.add_argument("--keys", type=int, default=4, help="--plan logprob: keys per depth (5 depths; default 4 = 20 "
                                                        "samples per cell)")
    ap.add_argument("--past-calibration", action="store_true",
                    help="--plan logprob: also run each preset past its calibrated length (--allow-longer)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="model dtype (default: float32)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)
    if args.keys < 1 or (args.threads is not None and args.threads < 1):
        ap.error("--keys and --threads must be >= 1")
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    gpu = device == "cuda"
    with_niah = gpu if args.with_niah is None else args.with_niah
    extra = ["--device", device]
    if args.dtype != "float32":
        extra += ["--dtype", args.dtype]
    if args.threads:
        extra += ["--threads", str(args.threads)]
    if args.plan == "logprob":
        return main_logprob(args, extra)
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
