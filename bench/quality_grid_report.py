"""Report of bench/quality_grid.sh: the grid's cells side by side, the paired comparisons the issue's
targets are about, and where a missed target is lost.

    python bench/quality_grid_report.py [--needles N]   # -> bench/results/quality_grid_smollm2_n<N>.md

Reads every record under bench/results/quality_grid_smollm2_n<N>/ (<task>/ holds rope, pi, ntk, yarn,
self_extend and dpe at its starting scales; <task>_<preset>/ the preset at its calibrated length) and
writes, per task:
* each (method, length) cell: exact match and mean answer log-probability, each with a 95% bootstrap
  interval over contexts (a context is one prompt, one forward: with one needle per context, one
  sample's key and label at one depth; contexts of one sample share their key), cells with partial
  records marked by their counts;
* every method's paired difference from self_extend at each length, over the needles both scored
  (the same prompt, so the same key, label and depth), bootstrap over contexts;
* the targets: calibrated DPE (each preset at its length) not below self_extend at 16K and 32K (the
  paired interval's upper end >= 0; the aim: its lower end > 0); at 8K dpe not below plain RoPE; at
  32K the preset's exact match at least 90% of plain RoPE's at 4K. A target without the records it
  needs says "not measured yet"; a missed one gets its paired difference by depth.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from collections import OrderedDict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the checkout's package when run from the source tree

from dpe_kernels.tools.eval.runner import read_records  # noqa: E402
from dpe_kernels.tools.eval.stats import cluster_bootstrap  # noqa: E402

TASKS = ("passkey", "niah")
# Where each shipped SmolLM2 preset comes from (the targets speak of calibrated DPE).
PRESET_ORIGIN = {
    "smollm2-135m": "the first 16K calibration: a per-group sweep on the perplexity proxy and a passkey check, "
                    "bench/results/calibration_smollm2.md",
    "smollm2-135m-16k": "the coordinate ascent at 16K, bench/results/calibration_smollm2_16k_n1.md",
    "smollm2-135m-32k": "the coordinate ascent at 32K, bench/results/calibration_smollm2_32k_n1.md",
}
METHODS = ("rope", "pi", "ntk", "yarn", "self_extend", "dpe")
LENGTHS = (4096, 8192, 16384, 32768)


def _load(root: str, task: str):
    """{(method, length): [records]}; a preset's records under "dpe (PRESET)"."""
    cells = OrderedDict()
    if not os.path.isdir(root):
        return cells
    for sub in sorted(os.listdir(root)):
        if not (sub == task or sub.startswith(task + "_")):
            continue
        name = None if sub == task else f"dpe ({sub[len(task) + 1:]})"
        for r in read_records(os.path.join(root, sub, "results.jsonl")):
            if r.get("skipped"):
                continue
            cells.setdefault((name or r["method"], int(r["length"])), []).append(r)
    return cells


def _ctx(r):
    return (r["sample"], round(float(r["depth"]), 4))


def _key(r):
    return (r["sample"], round(float(r["depth"]), 4), r.get("needle", 0))


def _boot(recs, field):
    by = OrderedDict()
    for r in recs:
        by.setdefault(_ctx(r), []).append(float(r[field]))
    return cluster_bootstrap(list(by.values())), len(by)


def _fmt(iv, pct=False, signed=False):
    f = (lambda x: f"{100 * x:.0f}") if pct else ((lambda x: f"{x:+.2f}") if signed else (lambda x: f"{x:.2f}"))
    if math.isnan(iv.low):
        return f"{f(iv.mean)} [-]"
    return f"{f(iv.mean)} [{f(iv.low)}, {f(iv.high)}]"


def _methods(cells):
    names = [m for m in METHODS if any(k[0] == m for k in cells)]
    return names + sorted({k[0] for k in cells if k[0] not in METHODS})


def _paired(a, b):
    """Paired differences a - b over the needles both scored, grouped by context."""
    ref = {_key(r): float(r["logprob"]) for r in b}
    by = OrderedDict()
    for r in a:
        k = _key(r)
        if k in ref:
            by.setdefault(_ctx(r), []).append(float(r["logprob"]) - ref[k])
    return by


def _paired_iv(a, b):
    by = _paired(a, b)
    return (cluster_bootstrap(list(by.values())), len(by)) if by else (None, 0)


def cells_section(task, cells):
    lengths = [n for n in LENGTHS if any(k[1] == n for k in cells)]
    lines = [f"### {task}: cells", "",
             "Exact match % [95%] and mean log-probability [95%], (needles, contexts).", "",
             "| method | " + " | ".join(f"{n // 1024}K" for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
    for m in _methods(cells):
        row = []
        for n in lengths:
            recs = cells.get((m, n))
            if not recs:
                row.append("-")
                continue
            ex, c = _boot(recs, "score")
            lp, _ = _boot(recs, "logprob")
            row.append(f"{_fmt(ex, pct=True)}; {_fmt(lp)} ({len(recs)}, {c})")
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    return lines + [""]


def paired_section(task, cells):
    lengths = [n for n in LENGTHS if (("self_extend", n) in cells)]
    lines = [f"### {task}: paired difference from self_extend (log-probability, same prompts)", "",
             "| method | " + " | ".join(f"{n // 1024}K" for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
    for m in _methods(cells):
        if m == "self_extend":
            continue
        row = []
        for n in lengths:
            iv, c = _paired_iv(cells.get((m, n), []), cells[("self_extend", n)])
            row.append("-" if iv is None else f"{_fmt(iv, signed=True)} ({iv.n}, {c})")
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    return lines + [""]


def _by_depth(a, b):
    by = _paired(a, b)
    depth = OrderedDict()
    for (s, d), xs in sorted(by.items(), key=lambda kv: kv[0][1]):
        depth.setdefault(d, []).extend(xs)
    return " | ".join(f"{d:.2f}: {sum(x) / len(x):+.2f} (n {len(x)})" for d, x in depth.items())


def targets_section(task, cells):
    lines = [f"### {task}: targets", ""]
    presets = sorted({m for m, _ in cells if m.startswith("dpe (")})
    for m in presets:
        lines.append(f"- {m}: {PRESET_ORIGIN.get(m[5:-1], 'a preset of dpe_kernels/presets/')}.")
    for n, tag in ((16384, "16K"), (32768, "32K")):
        here = [m for m in presets if (m, n) in cells]
        if not here or ("self_extend", n) not in cells:
            lines.append(f"- {tag}, calibrated DPE not below self_extend: not measured yet"
                         + ("" if here else " (no preset with records at this length)") + ".")
            continue
        for m in here:
            iv, c = _paired_iv(cells[(m, n)], cells[("self_extend", n)])
            if iv is None or math.isnan(iv.low):
                lines.append(f"- {tag}, {m} vs self_extend: {iv.n if iv else 0} paired needles over {c} contexts, "
                             "too few for an interval.")
                continue
            verdict = ("met, and above (the aim)" if iv.low > 0 else "met (the interval reaches 0)" if iv.high >= 0
                       else "MISSED")
            lines.append(f"- {tag}, {m} vs self_extend: paired {_fmt(iv, signed=True)} nats ({iv.n} needles, "
                         f"{c} contexts): **{verdict}**.")
            if verdict == "MISSED":
                lines.append(f"  By depth (mean paired difference): {_by_depth(cells[(m, n)], cells[('self_extend', n)])}")
    if ("dpe", 8192) in cells and ("rope", 8192) in cells:
        iv, c = _paired_iv(cells[("dpe", 8192)], cells[("rope", 8192)])
        if iv is None or math.isnan(iv.low):
            lines.append("- 8K, dpe not below rope: too few paired needles for an interval.")
        else:
            verdict = "met" if iv.high >= 0 else "MISSED"
            lines.append(f"- 8K, dpe (starting scales) vs rope: paired {_fmt(iv, signed=True)} ({iv.n} needles, "
                         f"{c} contexts): **{verdict}**.")
            if verdict == "MISSED":
                lines.append(f"  By depth: {_by_depth(cells[('dpe', 8192)], cells[('rope', 8192)])}")
    else:
        lines.append("- 8K, dpe not below rope: not measured yet.")
    base = cells.get(("rope", 4096))
    p32 = [m for m in presets if (m, 32768) in cells]
    if base and p32:
        ref = sum(float(r["score"]) for r in base) / len(base)
        for m in p32:
            recs = cells[(m, 32768)]
            acc = sum(float(r["score"]) for r in recs) / len(recs)
            ok = acc >= 0.9 * ref
            lines.append(f"- 32K, {m} exact match {100 * acc:.0f}% ({len(recs)} needles) vs 90% of rope's 4K "
                         f"{100 * ref:.0f}% ({len(base)} needles): **{'met' if ok else 'MISSED'}**.")
    else:
        lines.append("- 32K, at least 90% of rope's 4K exact match: not measured yet.")
    return lines + [""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--needles", type=int, default=int(os.environ.get("DPE_NEEDLES", "1")))
    args = ap.parse_args(argv)
    root = os.path.join(HERE, "results", f"quality_grid_smollm2_n{args.needles}")
    out = root + ".md"
    machines = set()
    lines = [f"# Quality grid: SmolLM2-135M-Instruct (8K pre-training), {args.needles} needle(s) per context", "",
             f"Records: `{os.path.relpath(root, os.path.dirname(HERE))}/` (one JSONL record per scored needle; "
             "`bash bench/quality_grid.sh` runs or resumes them, `python bench/quality_grid_report.py` writes this). "
             "Score: the teacher-forced log-probability of the answer, and its exact match (every answer token the "
             "argmax).", ""]
    notes = os.path.join(root, "RUN_NOTES.md")
    if os.path.isfile(notes):
        lines += [open(notes).read().strip(), ""]
    body = []
    for task in TASKS:
        cells = _load(root, task)
        if not cells:
            body += [f"## {task}", "", "No records yet.", ""]
            continue
        for recs in cells.values():
            machines.update(f"{r.get('device', '?')}, {r.get('dtype', '?')}" for r in recs)
        body += [f"## {task}", ""] + cells_section(task, cells) + paired_section(task, cells) + \
            targets_section(task, cells)
    lines += [f"Devices in the records: {'; '.join(sorted(machines)) or '-'}.", ""] + body
    with open(out, "w") as f:
        f.write("\n".join(lines).rstrip("\n") + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
