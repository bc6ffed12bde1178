"""Report of bench/needle_signal.sh: does the retrieval signal survive many needles per context?

    python bench/needle_signal_report.py      # -> bench/results/needles_smollm2_16k.md

Reads the records under bench/results/needles_smollm2_16k/ (single/, single_preset/, and the two
multi-needle settings: N=10 in multi/, multi_preset/; N=4 in multi4/, multi4_preset/) and writes, for
rope, self_extend, dpe (starting scales) and dpe (preset):
* per-depth mean answer log-probability, one needle per context vs N per context, and the Pearson
  correlation of those per-depth means over all (method, depth) cells. N=10 uses the single-needle
  depths themselves; the N=4 depths (0.125 .. 0.875) are not single-needle depths, so each is compared
  with the mean of the single-needle depths within +-0.125 of it;
* for each N: each method's mean with a 95% interval (single: Student-t over the samples; N needles:
  bootstrap over contexts), exact-match counts, the ranking of the methods next to single's, and every
  method's paired difference from self_extend (single: paired over depths; N needles: paired per
  needle, bootstrap over contexts);
* where each method's difference from self_extend lies: per depth (single and N=10) and by thirds of
  the depth;
* the cost: seconds per scored needle for each setting, from the same run;
* "Choosing N": for each N, self_extend's mean log-probability and exact-match rate vs single, whether
  the ranking equals single's, and the cost; which N keeps the ranking with the smaller degradation.
Partial records give a partial report (cells with no records show "-"; the counts say how many).
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
SINGLE_DEPTHS = 10                            # single: depths (s + 0.5) / 10, s = 0 .. 9
KINDS = OrderedDict([("multi", 10), ("multi4", 4)])  # record directory -> needles per context
NAN = float("nan")


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
    """{method: [records]} of single / multi / multi4 (the preset run under the name "dpe (preset)")."""
    out = OrderedDict((m, []) for m in METHODS)
    for sub, rename in ((kind, None), (kind + "_preset", "dpe (preset)")):
        for r in read_records(os.path.join(OUT, sub, "results.jsonl")):
            if r.get("skipped"):
                continue
            out[rename or r["method"]].append(r)
    return out


def _label(kind: str) -> str:
    return f"N={KINDS[kind]}"


def _mean(xs):
    return sum(xs) / len(xs) if xs else NAN


def _pearson(xs, ys) -> float:
    n = len(xs)
    if n < 3:
        return NAN
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else NAN


def _slot(r) -> int:
    """The depth slot of a needle: multi needle j (depth (j + 0.5) / N), single depth (s + 0.5) / 10 -> s."""
    if r.get("needles", 1) > 1:
        return int(r["needle"])
    return int(round(float(r["depth"]) * SINGLE_DEPTHS - 0.5))


def _single_window(kind: str, j: int):
    """The single-needle slots compared with needle j of N: the same depth when the depths coincide
    (N=10), else the single depths within +-0.5 / N (half the N-needle spacing) of (j + 0.5) / N."""
    n = KINDS[kind]
    d = (j + 0.5) / n
    half = 0.0 if n == SINGLE_DEPTHS else 0.5 / n
    return [s for s in range(SINGLE_DEPTHS) if abs((s + 0.5) / SINGLE_DEPTHS - d) <= half + 1e-9]


def _exact(recs) -> str:
    return f"{sum(float(r['score']) for r in recs):g}/{len(recs)}" if recs else "-"


def _contexts(recs):
    """Log-probabilities grouped by context (sample), in record order."""
    ctx = OrderedDict()
    for r in recs:
        ctx.setdefault(r["sample"], []).append(float(r["logprob"]))
    return ctx


def _fmt_boot(iv, n_ctx: int, signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    if math.isnan(iv.low):
        return f"{f.format(iv.mean)} [no interval: {n_ctx} contexts] ({iv.n}, {n_ctx})"
    return f"{f.format(iv.mean)} [{f.format(iv.low)}, {f.format(iv.high)}] ({iv.n}, {n_ctx})"


def depth_section(kind: str, single, multi):
    """Per-depth table (single / N) and the Pearson correlation of the per-depth means."""
    n = KINDS[kind]
    lab = _label(kind)
    same = n == SINGLE_DEPTHS
    head = [f"slot {j}" for j in range(n)] if same else [f"depth {(j + 0.5) / n:g}" for j in range(n)]
    lines = [f"## Per-depth mean log-probability (single / {lab})", ""]
    if not same:
        lines += [f"The {lab} depths are not single-needle depths: each {lab} depth is compared with the mean of "
                  f"the single-needle per-depth means within +-{0.5 / n:g} of it (" +
                  "; ".join(f"{(j + 0.5) / n:g}: " + ", ".join(f"{(s + 0.5) / SINGLE_DEPTHS:g}"
                                                              for s in _single_window(kind, j))
                            for j in range(n)) +
                  "; the windows share their edge depths). Only depths with records count.", ""]
    lines += ["| method | " + " | ".join(head) + " |", "|---|" + "---|" * n]
    xs, ys = [], []
    per_method_r = OrderedDict()
    for m in METHODS:
        by_slot = OrderedDict()
        for r in single[m]:
            by_slot.setdefault(_slot(r), []).append(float(r["logprob"]))
        cells, mx, my = [], [], []
        for j in range(n):
            s = [_mean(by_slot[k]) for k in _single_window(kind, j) if k in by_slot]
            u = [float(r["logprob"]) for r in multi[m] if _slot(r) == j]
            a = f"{_mean(s):.2f}" if s else "-"
            b = f"{_mean(u):.2f}" if u else "-"
            cells.append(f"{a} / {b}")
            if s and u:
                mx.append(_mean(s))
                my.append(_mean(u))
        xs += mx
        ys += my
        per_method_r[m] = (_pearson(mx, my), len(mx))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    what = "single" if same else "single (window means)"
    lines += ["", f"Pearson correlation of the per-depth means, {what} vs {lab}, over {len(xs)} (method, depth) "
                  f"cells: **{_pearson(xs, ys):.3f}**; within each method: " +
              ", ".join(f"{m} {r:.2f} (n {k})" for m, (r, k) in per_method_r.items()) + ".", ""]
    return lines


def methods_section(kind: str, single, multi):
    """Per-method table (single next to N) and the two rankings. Returns (lines, summary) with
    summary = {"means": {method: (single, N)}, "rank_single", "rank_multi", "same"}."""
    lab = _label(kind)
    lines = [f"## Methods: single vs {lab}", "",
             f"| method | single: mean [95% t] (n) | {lab}: mean [95% bootstrap over contexts] (needles, contexts) "
             f"| single exact | {lab} exact |", "|---|---|---|---|---|"]
    means = OrderedDict()
    complete = []  # ranked only with every single depth run (a partial run holds the shallow depths
    # first, which are easier) and >= 2 multi-needle contexts
    for m in METHODS:
        s = [float(r["logprob"]) for r in single[m]]
        ctx = _contexts(multi[m])
        if len(s) >= SINGLE_DEPTHS and len(ctx) >= 2:
            complete.append(m)
        si = t_interval(s) if s else None
        mi = cluster_bootstrap(list(ctx.values())) if ctx else None
        means[m] = (si.mean if si else NAN, mi.mean if mi else NAN)
        fs = (f"{si.mean:.3f} [{si.low:.3f}, {si.high:.3f}] ({si.n})" if si and not math.isnan(si.low)
              else f"{si.mean:.3f} [no interval] ({si.n})" if si else "-")
        fm = _fmt_boot(mi, len(ctx)) if mi else "-"
        lines.append(f"| {m} | {fs} | {fm} | {_exact(single[m])} | {_exact(multi[m])} |")
    have = [m for m in complete if not any(math.isnan(x) for x in means[m])]
    rank_s = sorted(have, key=lambda m: -means[m][0])
    rank_m = sorted(have, key=lambda m: -means[m][1])
    if len(have) < 2:
        verdict = (f"not decidable yet: {len(have)} method(s) with complete records under both scorers "
                   f"(all {SINGLE_DEPTHS} single depths, >= 2 contexts: {', '.join(have) or 'none'})")
        same = None
    else:
        same = rank_s == rank_m
        verdict = ("the same order" if same else "a DIFFERENT order") + f" (over the {len(have)} methods with complete records under both)"
    rank_all = sorted((m for m in METHODS if not math.isnan(means[m][1])), key=lambda m: -means[m][1])
    lines += ["", f"Ranking (best first), single: {' > '.join(rank_s) or '-'}; {lab}: {' > '.join(rank_m) or '-'}; "
                  f"{verdict}. {lab} over all its methods with records: {' > '.join(rank_all) or '-'}.", ""]
    return lines, {"means": means, "rank_single": rank_s, "rank_multi": rank_m, "same": same, "have": have}


def paired_section(kind: str, single, multi):
    """Paired differences from self_extend: single over depths, N per needle (bootstrap over contexts)."""
    lab = _label(kind)
    lines = [f"## Paired differences from self_extend, single vs {lab} (mean log-probability)", "",
             f"| method | single: paired over depths [95% t] | {lab}: paired per needle [95% bootstrap over contexts] |",
             "|---|---|---|"]
    ref_s = {_slot(r): float(r["logprob"]) for r in single["self_extend"]}
    ref_m = {(r["sample"], r["needle"]): float(r["logprob"]) for r in multi["self_extend"]}
    for m in METHODS:
        if m == "self_extend":
            continue
        d_s = [float(r["logprob"]) - ref_s[_slot(r)] for r in single[m] if _slot(r) in ref_s]
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
    lines.append("")
    return lines


THIRDS = (("shallow 0.05-0.25", range(0, 3)), ("middle 0.35-0.65", range(3, 7)), ("deep 0.75-0.95", range(7, 10)))


def where_section(single, multi):
    """Where each method's difference from self_extend lies: per depth slot, single (one context per
    depth) and N=10 (the mean over its contexts), and by thirds of the depth (single, t-interval)."""
    lines = ["## Where the difference from self_extend lies (paired log-probability by depth)", "",
             "Single: one context per depth, so a depth's cell is one paired difference; N=10: the mean over its "
             "contexts of the paired difference of needle j (the same label and key under both methods). The question "
             "follows the context, so depth d puts the needle about (1 - d) x 16K tokens before it: 0.05 is the "
             "farthest (about 15.5K), 0.95 the nearest (about 0.8K, inside the 1024-token window).", "",
             "| method | " + " | ".join(f"{(s + 0.5) / SINGLE_DEPTHS:.2f}" for s in range(SINGLE_DEPTHS)) + " |",
             "|---|" + "---|" * SINGLE_DEPTHS]
    ref_s = {_slot(r): float(r["logprob"]) for r in single["self_extend"]}
    ref_m = {(r["sample"], r["needle"]): float(r["logprob"]) for r in multi["self_extend"]}
    thirds = []
    for m in METHODS:
        if m in ("self_extend", "rope"):
            continue
        d_s = {_slot(r): float(r["logprob"]) - ref_s[_slot(r)] for r in single[m] if _slot(r) in ref_s}
        d_m = {}
        for r in multi[m]:
            if (r["sample"], r["needle"]) in ref_m:
                d_m.setdefault(int(r["needle"]), []).append(float(r["logprob"]) - ref_m[(r["sample"], r["needle"])])
        cells = []
        for s in range(SINGLE_DEPTHS):
            a = f"{d_s[s]:+.2f}" if s in d_s else "-"
            b = f"{_mean(d_m[s]):+.2f}" if s in d_m else "-"
            cells.append(f"{a} / {b}")
        lines.append(f"| {m} (single / N=10) | " + " | ".join(cells) + " |")
        row = []
        for name, slots in THIRDS:
            xs = [d_s[s] for s in slots if s in d_s]
            if len(xs) >= 2:
                iv = t_interval(xs)
                row.append(f"{iv.mean:+.2f} [{iv.low:+.2f}, {iv.high:+.2f}] (n {iv.n})")
            else:
                row.append("-")
        thirds.append(f"| {m} | " + " | ".join(row) + " |")
    lines += ["", "Single, by thirds of the depth (mean paired difference from self_extend [95% t]):", "",
              "| method | " + " | ".join(name for name, _ in THIRDS) + " |", "|---|---|---|---|", *thirds, ""]
    return lines


def _single_cost(single):
    """Seconds per scored needle of the one-needle contexts and how many needles, or None."""
    secs = [float(r["seconds"]) for m in METHODS for r in single[m]]
    return (_mean(secs), len(secs)) if secs else None


def _multi_cost(multi):
    """(seconds per scored needle, seconds of the context's forward, contexts) of N-needle contexts, or None:
    per context its records' `seconds` (per needle) and `context_seconds`, averaged over the contexts."""
    ctx = OrderedDict()
    for m in METHODS:
        for r in multi[m]:
            ctx[(m, r["sample"])] = (float(r["context_seconds"]), float(r["seconds"]))
    if not ctx:
        return None
    return (_mean([v[1] for v in ctx.values()]), _mean([v[0] for v in ctx.values()]), len(ctx))


def cost_section(single, multis):
    lines = ["## Cost (this run)", ""]
    sc = _single_cost(single)
    if sc:
        lines.append(f"- One needle per context: {sc[0]:.1f} s per scored needle (one 16K forward each; "
                     f"{sc[1]} needles).")
    else:
        lines.append("- One needle per context: - (no records yet)")
    for kind, multi in multis.items():
        n, mc = KINDS[kind], _multi_cost(multi)
        if not mc:
            lines.append(f"- {n} needles per context: - (no records yet)")
            continue
        ratio = f" Ratio: **{sc[0] / mc[0]:.1f}x** fewer seconds per scored needle." if sc and mc[0] > 0 else ""
        lines.append(f"- {n} needles per context: {mc[0]:.1f} s per scored needle; the context's forward "
                     f"{mc[1]:.1f} s, shared by its {n} questions ({mc[2]} contexts).{ratio}")
    lines += ["- Forwards per decision of the ascent (one candidate configuration): the old scorer used 5 "
              "one-needle samples (5 forwards, 5 needles); the multi-needle scorer with 2 contexts of 10 "
              "needles uses 2 forwards for 20 needles (10x the needles per forward); one needle per context, "
              "the choice below, uses 20 forwards for 20 needles (4x the old scorer's forwards, for 4x its "
              "needles; a group of 4 candidate scales: 80 forwards).",
              "- Seconds include the machine's other load at the time (2 cores shared with tests); the "
              "ratio compares needles scored in the same run.", ""]
    return lines


def choosing_section(single, multis, summaries):
    """For each N: self_extend's mean and exact-match rate vs single, ranking kept or not, cost; the verdict."""
    lines = ["## Choosing N", ""]
    se_s = single["self_extend"]
    mean_s = _mean([float(r["logprob"]) for r in se_s])
    rate_s = _mean([float(r["score"]) for r in se_s])
    sc = _single_cost(single)
    drops = OrderedDict()
    for kind, multi in multis.items():
        lab, summ = _label(kind), summaries[kind]
        se_m = multi["self_extend"]
        mean_m = _mean([float(r["logprob"]) for r in se_m])
        rate_m = _mean([float(r["score"]) for r in se_m])
        drop = mean_s - mean_m
        if not math.isnan(drop):
            drops[kind] = drop
        fm = (f"self_extend {mean_m:.2f} vs {mean_s:.2f} single (drop {drop:.2f}), exact {_exact(se_m)} "
              f"({rate_m:.0%}) vs {_exact(se_s)} ({rate_s:.0%}) single" if se_m and se_s
              else f"self_extend {'-' if not se_m else f'{mean_m:.2f}'} vs {'-' if not se_s else f'{mean_s:.2f}'} "
                   f"single, exact {_exact(se_m)} vs {_exact(se_s)} single")
        if summ["same"] is None:
            rank = (f"ranking vs single's undecided ({len(summ['have'])} method(s) with records under both: "
                    f"{', '.join(summ['have']) or 'none'})")
        else:
            rank = (("ranking the same as single's" if summ["same"] else "ranking DIFFERENT from single's") +
                    f" ({' > '.join(summ['rank_multi'])} vs {' > '.join(summ['rank_single'])})")
        mc = _multi_cost(multi)
        cost = (f"{mc[0]:.1f} s per scored needle" + (f" vs {sc[0]:.1f} single ({sc[0] / mc[0]:.1f}x fewer)"
                                                      if sc and mc[0] > 0 else "") if mc else "cost -")
        lines.append(f"- {lab}: {fm}; {rank}; {cost}.")
    keep = [k for k in multis if summaries[k]["same"] is True]
    undecided = [k for k in multis if summaries[k]["same"] is None]
    if drops:
        best = min(drops, key=lambda k: drops[k])
        smaller = (f"{_label(best)} degrades self_extend less (mean log-probability drop {drops[best]:.2f}"
                   + "".join(f" vs {drops[k]:.2f} at {_label(k)}" for k in drops if k != best) + ")")
        if len(drops) < len(multis):
            smaller += " (the other N has no self_extend records yet)"
    else:
        best, smaller = None, "no N has self_extend records under both scorers yet, so no degradation to compare"
    if keep:
        kept = " and ".join(_label(k) for k in keep) + (" keeps" if len(keep) == 1 else " keep") + " single's ranking"
    elif undecided:
        kept = ("neither N is shown to keep single's ranking yet (" +
                ", ".join(f"{_label(k)} undecided" for k in undecided) +
                "".join(f", {_label(k)} different" for k in multis if summaries[k]["same"] is False) + ")")
    else:
        kept = "neither N keeps single's ranking"
    lines += ["", f"**Verdict (from the records so far):** {kept}; {smaller}."]
    if keep and best is not None:
        lines[-1] += (f" {_label(best)} keeps the ranking with the smaller degradation." if best in keep else
                      f" The N with the smaller degradation ({_label(best)}) does not keep the ranking.")
    lines.append("")
    return lines


def main() -> int:
    single = _load("single")
    multis = OrderedDict((k, _load(k)) for k in KINDS)
    n_ctx = {k: sorted({len(_contexts(multis[k][m])) for m in METHODS if multis[k][m]}) for k in KINDS}
    ctx_txt = "; ".join(f"{_label(k)}: {'/'.join(map(str, v)) if v else 'no'} contexts per method so far"
                        for k, v in n_ctx.items())
    lines = ["# Does the signal survive many needles? SmolLM2-135M-Instruct, passkey at 16K", "",
             f"Machine: {_cpu()}, {os.cpu_count()} cores, float32, `bench/needle_signal.sh` (records in "
             f"`bench/results/needles_smollm2_16k/`, one JSONL record per scored needle). Score: the teacher-forced "
             "log-probability of the 5-digit key after \"The pass key for LABEL is\".", "",
             "Single: one labelled needle per context at depth d (10 depths, one context each). Multi: N labelled "
             "needles per context (needle j at depth (j + 0.5) / N), each question scored from the context's cache "
             "as if it alone followed the context; N=10 (`multi/`, `multi_preset/`) and N=4 (`multi4/`, "
             f"`multi4_preset/`), 3 contexts per method planned ({ctx_txt}).", ""]
    summaries = OrderedDict()
    for kind, multi in multis.items():
        lines += depth_section(kind, single, multi)
    for kind, multi in multis.items():
        sec, summaries[kind] = methods_section(kind, single, multi)
        lines += sec
    for kind, multi in multis.items():
        lines += paired_section(kind, single, multi)
    lines += where_section(single, multis["multi"])
    lines += cost_section(single, multis)
    lines += choosing_section(single, multis, summaries)
    with open(REPORT, "w") as f:
        f.write("\n".join(lines).rstrip("\n") + "\n")
    print(f"wrote {REPORT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
