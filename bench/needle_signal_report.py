"""Report of bench/needle_signal.sh: does the retrieval signal survive 10 needles per context?

    python bench/needle_signal_report.py      # -> bench/results/needles_smollm2_16k.md

Reads the records under bench/results/needles_smollm2_16k/ (single/, single_preset/, multi/,
multi_preset/) and writes, for rope, self_extend, dpe (starting scales) and dpe (preset):
* per-depth mean answer log-probability, one needle per context vs 10 per context (the same 10
  depths), and the Pearson correlation of those per-depth means over all (method, depth) cells;
* each method's mean with a 95% interval (single: Student-t over the samples; multi: bootstrap
  over contexts), the ranking of the methods under each scorer, and every method's paired
  difference from self_extend (single: paired over depths; multi: paired per needle, bootstrap
  over contexts);
* the cost: seconds per scored needle and forwards per decision of the ascent, from the same run.
Partial records give a partial report (it says how many samples each cell has).
"""
from __future__ import annotations

import math
import os
import platform
import sys
from collections import OrderedDict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the checkout's package when run from the source tree

from dpe_kernels.tools.eval.runner import read_records  # noqa: E402
from dpe_kernels.tools.eval.stats import cluster_bootstrap, t_interval  # noqa: E402

OUT = os.path.join(HERE, "results", "needles_smollm2_16k")
REPORT = OUT + ".md"
METHODS = ("rope", "self_extend", "dpe", "dpe (preset)")


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load(kind: str):
    """{method: [records]} of single / multi (the preset run under the name "dpe (preset)")."""
    out = OrderedDict((m, []) for m in METHODS)
    for sub, rename in ((kind, None), (kind + "_preset", "dpe (preset)")):
        for r in read_records(os.path.join(OUT, sub, "results.jsonl")):
            if r.get("skipped"):
                continue
            out[rename or r["method"]].append(r)
    return out


def _depth(r) -> float:
    return round(float(r["needle_depth"] if r.get("needles", 1) > 1 else r["depth"]), 2)


def _pearson(xs, ys) -> float:
    n = len(xs)
    if n < 3:
        return float("nan")
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def _slot(r) -> int:
    """The depth slot 0..9 a needle belongs to: multi needle j, single depth (j + 0.5) / 10."""
    if r.get("needles", 1) > 1:
        return int(r["needle"])
    return int(round(float(r["depth"]) * 10 - 0.5))


def main() -> int:
    single, multi = _load("single"), _load("multi")
    lines = ["# Does the signal survive many needles? SmolLM2-135M-Instruct, passkey at 16K", "",
             f"Machine: {_cpu()}, {os.cpu_count()} cores, float32, `bench/needle_signal.sh` (records in "
             f"`bench/results/needles_smollm2_16k/`, one JSONL record per scored needle). Score: the teacher-forced "
             "log-probability of the 5-digit key after \"The pass key for LABEL is\".", "",
             "Single: one labelled needle per context at depth d (10 depths, one context each). Multi: 10 "
             "labelled needles per context (needle j at depth (j + 0.5) / 10), each question scored from the "
             "context's cache as if it alone followed the context; 3 contexts per method (2 in the first, partial run).", ""]
    # per-depth means
    lines += ["## Per-depth mean log-probability (single / multi)", "",
              "| method | " + " | ".join(f"slot {j}" for j in range(10)) + " |", "|---|" + "---|" * 10]
    xs, ys = [], []
    per_method_r = {}
    for m in METHODS:
        cells, mx, my = [], [], []
        for j in range(10):
            s = [float(r["logprob"]) for r in single[m] if _slot(r) == j]
            u = [float(r["logprob"]) for r in multi[m] if _slot(r) == j]
            a = f"{sum(s) / len(s):.2f}" if s else "-"
            b = f"{sum(u) / len(u):.2f}" if u else "-"
            cells.append(f"{a} / {b}")
            if s and u:
                mx.append(sum(s) / len(s))
                my.append(sum(u) / len(u))
        xs += mx
        ys += my
        per_method_r[m] = (_pearson(mx, my), len(mx))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    r_all = _pearson(xs, ys)
    lines += ["", f"Pearson correlation of the per-depth means, single vs multi, over {len(xs)} (method, depth) "
                  f"cells: **{r_all:.3f}**; within each method: " +
              ", ".join(f"{m} {r:.2f} (n {n})" for m, (r, n) in per_method_r.items()) + ".", ""]
    # method means and ranking
    lines += ["## Methods under each scorer", "",
              "| method | single: mean [95% t] (n) | multi: mean [95% bootstrap over contexts] (needles, contexts) "
              "| single exact | multi exact |", "|---|---|---|---|---|"]
    means = {}
    for m in METHODS:
        s = [float(r["logprob"]) for r in single[m]]
        ctx = OrderedDict()
        for r in multi[m]:
            ctx.setdefault(r["sample"], []).append(float(r["logprob"]))
        si = t_interval(s) if s else None
        mi = cluster_bootstrap(list(ctx.values())) if ctx else None
        means[m] = (si.mean if si else float("nan"), mi.mean if mi else float("nan"))
        fs = f"{si.mean:.3f} [{si.low:.3f}, {si.high:.3f}] ({si.n})" if si else "-"
        fm = (f"{mi.mean:.3f} [{mi.low:.3f}, {mi.high:.3f}] ({mi.n}, {len(ctx)})" if mi and not math.isnan(mi.low)
              else f"{mi.mean:.3f} [no interval: {len(ctx)} contexts] ({mi.n}, {len(ctx)})" if mi else "-")
        es = f"{sum(float(r['score']) for r in single[m]):g}/{len(single[m])}" if single[m] else "-"
        em = f"{sum(float(r['score']) for r in multi[m]):g}/{len(multi[m])}" if multi[m] else "-"
        lines.append(f"| {m} | {fs} | {fm} | {es} | {em} |")
    have = [m for m in METHODS if not any(math.isnan(x) for x in means[m])]
    rank_s = sorted(have, key=lambda m: -means[m][0])
    rank_m = sorted(have, key=lambda m: -means[m][1])
    lines += ["", f"Ranking (best first), single: {' > '.join(rank_s)}; multi: {' > '.join(rank_m)}; "
                  f"{'the same order' if rank_s == rank_m else 'a DIFFERENT order'}.", ""]
    # paired differences from self_extend
    lines += ["## Paired differences from self_extend (mean log-probability)", "",
              "| method | single: paired over depths [95% t] | multi: paired per needle [95% bootstrap over contexts] |",
              "|---|---|---|"]
    for m in METHODS:
        if m == "self_extend":
            continue
        ref_s = {_slot(r): float(r["logprob"]) for r in single["self_extend"]}
        d_s = [float(r["logprob"]) - ref_s[_slot(r)] for r in single[m] if _slot(r) in ref_s]
        ref_m = {(r["sample"], r["needle"]): float(r["logprob"]) for r in multi["self_extend"]}
        ctx = OrderedDict()
        for r in multi[m]:
            k = (r["sample"], r["needle"])
            if k in ref_m:
                ctx.setdefault(r["sample"], []).append(float(r["logprob"]) - ref_m[k])
        fs = "-"
        if len(d_s) >= 2:
            iv = t_interval(d_s)
            fs = f"{iv.mean:+.3f} [{iv.low:+.3f}, {iv.high:+.3f}] (n {iv.n})"
        fm = "-"
        if ctx:
            iv = cluster_bootstrap(list(ctx.values()))
            band = "no interval with < 3 contexts" if math.isnan(iv.low) else f"{iv.low:+.3f}, {iv.high:+.3f}"
            fm = f"{iv.mean:+.3f} [{band}] ({iv.n} needles, {len(ctx)} contexts)"
        lines.append(f"| {m} | {fs} | {fm} |")
    # cost
    s_secs = [float(r["seconds"]) for m in METHODS for r in single[m]]
    m_ctx = OrderedDict()
    for m in METHODS:
        for r in multi[m]:
            m_ctx[(m, r["sample"])] = (float(r["context_seconds"]), float(r["seconds"]), r["needles"])
    lines += ["", "## Cost (this run)", ""]
    if s_secs and m_ctx:
        per_s = sum(s_secs) / len(s_secs)
        per_m = sum(v[1] for v in m_ctx.values()) / len(m_ctx)
        ctx_s = sum(v[0] for v in m_ctx.values()) / len(m_ctx)
        lines += [f"- One needle per context: {per_s:.1f} s per scored needle (one 16K forward each; "
                  f"{len(s_secs)} needles).",
                  f"- 10 needles per context: {per_m:.1f} s per scored needle; the context's forward {ctx_s:.1f} s, "
                  f"shared by its 10 questions ({len(m_ctx)} contexts). Ratio: **{per_s / per_m:.1f}x** fewer "
                  "seconds per scored needle.",
                  "- Forwards per decision of the ascent (one candidate configuration): the old scorer used 5 "
                  "one-needle samples (5 forwards, 5 needles); the multi-needle scorer with 2 contexts of 10 "
                  "needles uses 2 forwards for 20 needles (10x the needles per forward).",
                  "- Seconds include the machine's other load at the time (2 cores shared with tests); the "
                  "ratio compares needles scored in the same run."]
    else:
        lines.append("- (not enough records yet)")
    with open(REPORT, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {REPORT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
