"""Summary table (markdown) and plots (PNG, matplotlib Agg) from the JSONL records of the runner.

    write_report(records, out_md, plot_dir=None, title=..., notes=...)

* passkey / niah: method x length, cell = accuracy (passkey: exact key; niah: mean fraction of the
  4 needles) with the sample count and the mean seconds per sample, and, for records with a
  teacher-forced score (scoring ``logprob`` / ``both``), the mean answer log-probability with its
  95% Student-t interval over the samples; "skipped (0 at L)" where the runner skipped a method
  after it scored 0 at a shorter length; a heatmap per method (length x depth, like the paper's
  NIAH figure): ``heatmap_<task>.png``, and of the mean log-prob: ``heatmap_<task>_logprob.png``.
  Records of different scorings or model dtypes get separate tables;
* ppl: mean loss per 4K-token segment and overall perplexity per method; the loss-by-position
  curve of every method: ``loss_by_position.png``.
"""
from __future__ import annotations

import datetime
import math
import os
import platform
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from .methods import METHODS
from .stats import cluster_bootstrap, t_interval

__all__ = ["summary_markdown", "plot_heatmaps", "plot_loss", "write_report"]

_TASK_TITLES = {"passkey": "Passkey retrieval", "niah": "4-needle NIAH (essays)", "ppl": "Loss by position"}


def _fmt_len(n: int) -> str:
    return f"{n // 1024}K" if n and n % 1024 == 0 else str(n)


def _method_order(records: Iterable[dict]) -> List[str]:
    seen = OrderedDict()
    for r in records:
        seen.setdefault(r["method"], None)
    return sorted(seen, key=lambda m: (METHODS.index(m) if m in METHODS else len(METHODS), m))


def _groups(records: Iterable[dict], task: str):
    """{(model, format, scoring, dtype): [records of task]} (records from before scoring and dtype
    were recorded: generation, float32)."""
    out: Dict[tuple, List[dict]] = OrderedDict()
    for r in records:
        if r.get("task") == task:
            key = (r.get("model"), r.get("format"), r.get("scoring", "generate"), r.get("dtype", "float32"),
                   r.get("needles"))
            out.setdefault(key, []).append(r)
    return out


def _fmt_interval(values: List[float]) -> str:
    iv = t_interval(values)
    if iv.n < 2:
        return f"{iv.mean:.2f}"
    return f"{iv.mean:.2f} [{iv.low:.2f}, {iv.high:.2f}]"


def _fmt_clustered(done: List[dict], field: str, scale: float = 1.0, digits: int = 2) -> str:
    """Mean of ``field`` over multi-needle records with a 95% bootstrap interval over contexts
    (the needles of one context are not independent samples)."""
    ctx: Dict[tuple, List[float]] = OrderedDict()
    for r in done:
        ctx.setdefault((r.get("depth"), r.get("sample")), []).append(scale * float(r[field]))
    iv = cluster_bootstrap(list(ctx.values()))
    if math.isnan(iv.low):  # fewer than 3 contexts: no interval
        return f"{iv.mean:.{digits}f}"
    return f"{iv.mean:.{digits}f} [{iv.low:.{digits}f}, {iv.high:.{digits}f}]"


def _retrieval_table(recs: List[dict]) -> List[str]:
    lengths = sorted({int(r["length"]) for r in recs})
    methods = _method_order(recs)
    lines = ["| method | " + " | ".join(_fmt_len(L) for L in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    params: Dict[tuple, str] = {}
    for m in methods:
        cells = []
        for L in lengths:
            rs = [r for r in recs if r["method"] == m and int(r["length"]) == L]
            done = [r for r in rs if not r.get("skipped")]
            skip = [r for r in rs if r.get("skipped")]
            if done:
                acc = sum(float(r["score"]) for r in done) / len(done)
                secs = sum(float(r["seconds"]) for r in done) / len(done)
                n_ok = sum(float(r["score"]) for r in done)
                n_ok_s = f"{n_ok:g}" if n_ok == int(n_ok) else f"{n_ok:.2f}"
                lps = [float(r["logprob"]) for r in done if r.get("logprob") is not None]
                if done[0].get("needles") is not None:  # multi-needle: intervals over contexts
                    n_ctx = len({(r.get("depth"), r.get("sample")) for r in done})
                    cells.append(f"{_fmt_clustered(done, 'score', 100, 0)}% ({n_ok_s}/{len(done)} needles, "
                                 f"{n_ctx} contexts), {secs:.1f} s; log-prob {_fmt_clustered(done, 'logprob')}")
                else:
                    lp = f"; log-prob {_fmt_interval(lps)}" if lps else ""
                    cells.append(f"{100 * acc:.0f}% ({n_ok_s}/{len(done)}), {secs:.1f} s{lp}")
                params[(m, L)] = done[-1].get("params", "")
            elif skip:
                cells.append(f"skipped ({skip[-1].get('reason', '')})")
            else:
                cells.append("-")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    scoring = recs[0].get("scoring", "generate")
    how = {"generate": "accuracy (correct / samples) of the greedy answer, mean seconds per sample "
                       "(prefill + greedy decode)",
           "logprob": "exact match (correct / samples) of the teacher-forced answer (argmax at every answer "
                      "token), mean seconds per sample (one forward)",
           "both": "accuracy (correct / samples) of the greedy answer, mean seconds per sample (prefill + "
                   "greedy decode; the teacher-forced pass is extra)"}[scoring]
    if recs[0].get("needles") is not None:
        how = (f"{recs[0]['needles']} labelled needles per context, each question scored as if it alone followed "
               "the context: exact match of the teacher-forced answer (correct / needles) and mean answer "
               "log-probability, each with a 95% bootstrap interval that resamples whole contexts [low, high] "
               "(none with fewer than 3 contexts); "
               "seconds per needle (the context's forward shared by its needles)")
    elif any(r.get("logprob") is not None for r in recs):
        how += ("; log-prob: mean teacher-forced log-probability of the answer (passkey: the key's tokens; "
                "NIAH: mean over the 4 values) with its 95% Student-t interval over the samples [low, high]")
    lines += ["", f"Cells: {how}.", "",
              "Parameters per length:", "",
              "| method | " + " | ".join(_fmt_len(L) for L in lengths) + " |",
              "|---|" + "---|" * len(lengths)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(params.get((m, L), "") for L in lengths) + " |")
    return lines


def _ppl_table(recs: List[dict], segment: int = 4096) -> List[str]:
    max_len = max(int(r["length"]) for r in recs)
    nseg = math.ceil(max_len / segment)
    head = [f"{_fmt_len(i * segment)}-{_fmt_len(min((i + 1) * segment, max_len))}" for i in range(nseg)]
    lines = ["| method | length | " + " | ".join(head) + " | mean loss | ppl | s/sample |",
             "|---|---|" + "---|" * (nseg + 3)]
    for m in _method_order(recs):
        for L in sorted({int(r["length"]) for r in recs if r["method"] == m}):
            rs = [r for r in recs if r["method"] == m and int(r["length"]) == L and not r.get("skipped")]
            if not rs:
                continue
            b = int(rs[0]["bucket"])
            curve = _mean_curve(rs)
            cells = []
            for i in range(nseg):
                lo, hi = i * segment // b, (i + 1) * segment // b
                seg = curve[lo:hi]
                cells.append(f"{sum(seg) / len(seg):.3f}" if seg else "")
            mean = sum(float(r["loss"]) for r in rs) / len(rs)
            secs = sum(float(r["seconds"]) for r in rs) / len(rs)
            lines.append(f"| {m} | {_fmt_len(L)} | " + " | ".join(cells) +
                         f" | {mean:.3f} | {math.exp(mean):.2f} | {secs:.1f} |")
    lines += ["", "Mean next-token loss of the positions in each segment (one forward over the essays; "
              "averaged over samples)."]
    return lines


def _mean_curve(rs: List[dict]) -> List[float]:
    n = min(len(r["bucket_losses"]) for r in rs)
    return [sum(r["bucket_losses"][i] for r in rs) / len(rs) for i in range(n)]


def summary_markdown(records: Sequence[dict], title: str = "DPE evaluation", notes: str = "") -> str:
    out = [f"# {title}", ""]
    if notes:
        out += [notes.rstrip(), ""]
    models = sorted({str(r.get("model")) for r in records})
    devices = sorted({str(r["device"]) for r in records if r.get("device")})
    out += [f"Generated {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} on {platform.machine()} "
            f"({os.cpu_count()} CPUs), model(s): {', '.join(models)}; samples run on: "
            f"{'; '.join(devices) or 'not recorded'}.", ""]
    for task in ("passkey", "niah", "ppl"):
        for (model, fmt, scoring, dtype, needles), recs in _groups(records, task).items():
            trains = {r.get("train_length") for r in recs}
            extra = f", prompt format `{fmt}`, scoring `{scoring}`" if task != "ppl" else ""
            extra += f", {needles} needles per context" if needles is not None else ""
            extra += f", {dtype}"
            out += [f"## {_TASK_TITLES[task]} ({model}{extra}, pre-training length "
                    f"{', '.join(str(t) for t in trains)})", ""]
            out += _retrieval_table(recs) if task != "ppl" else _ppl_table(recs)
            out.append("")
    return "\n".join(out)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_heatmaps(records: Sequence[dict], task: str, path, value: str = "score") -> Optional[Path]:
    """One panel per method: depth (rows) x length (columns), colour = mean ``value`` ("score", or
    "logprob": the mean teacher-forced answer log-probability, colour scale from the lowest cell
    (at least -20) to 0)."""
    recs = [r for r in records if r.get("task") == task and (value == "score" or r.get("skipped")
                                                          or r.get(value) is not None)]
    if not any(not r.get("skipped") for r in recs):
        return None
    plt = _plt()
    import numpy as np

    methods = _method_order(recs)
    lengths = sorted({int(r["length"]) for r in recs})
    depths = sorted({round(float(r["depth"]), 4) for r in recs if r.get("depth") is not None})
    if not depths:
        return None
    fig, axes = plt.subplots(1, len(methods), figsize=(1.2 + 0.9 * len(lengths) * len(methods) + len(methods),
                                                     1.2 + 0.45 * len(depths) + 1), squeeze=False)
    cmap = plt.get_cmap("RdYlGn").with_extremes(bad="#d0d0d0")
    im = None
    grids = []
    for m in methods:
        grid = np.full((len(depths), len(lengths)), np.nan)
        for j, L in enumerate(lengths):
            for i, d in enumerate(depths):
                rs = [float(r[value]) for r in recs if r["method"] == m and int(r["length"]) == L
                      and not r.get("skipped") and r.get("depth") is not None and round(float(r["depth"]), 4) == d]
                if rs:
                    grid[i, j] = sum(rs) / len(rs)
        grids.append(grid)
    if value == "score":
        vmin, vmax = 0.0, 1.0
    else:
        finite = [g[~np.isnan(g)] for g in grids]
        low = min((float(f.min()) for f in finite if f.size), default=-1.0)
        vmin, vmax = max(-20.0, min(low, -1.0)), 0.0
    for ax, m, grid in zip(axes[0], methods, grids):
        im = ax.imshow(grid, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
        for j, L in enumerate(lengths):
            skipped = any(r.get("skipped") for r in recs if r["method"] == m and int(r["length"]) == L)
            for i in range(len(depths)):
                v = grid[i, j]
                ax.text(j, i, "skip" if (np.isnan(v) and skipped) else ("" if np.isnan(v) else f"{v:.2g}"),
                        ha="center", va="center", fontsize=7)
        ax.set_title(m)
        ax.set_xticks(range(len(lengths)), [_fmt_len(L) for L in lengths], fontsize=8)
        ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths], fontsize=8)
        ax.set_xlabel("context length")
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8,
                 label="score" if value == "score" else "mean answer log-prob (teacher-forced)")
    what = "" if value == "score" else ", answer log-prob"
    fig.suptitle(f"{_TASK_TITLES[task]} ({recs[0].get('model')}, {recs[0].get('format')} prompt{what})", y=1.04)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_loss(records: Sequence[dict], path) -> Optional[Path]:
    """Mean loss per bucket against position, one line per method (its longest run)."""
    recs = [r for r in records if r.get("task") == "ppl" and not r.get("skipped")]
    if not recs:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    trains = set()
    for m in _method_order(recs):
        rs = [r for r in recs if r["method"] == m]
        L = max(int(r["length"]) for r in rs)
        rs = [r for r in rs if int(r["length"]) == L]
        curve = _mean_curve(rs)
        b = int(rs[0]["bucket"])
        xs = [min((i + 1) * b, L) / 1024 for i in range(len(curve))]
        ax.plot(xs, curve, marker=".", label=m)
        trains.update(r.get("train_length") for r in rs)
    for t in trains:
        if t:
            ax.axvline(t / 1024, color="grey", linestyle="--", linewidth=1)
            ax.text(t / 1024, ax.get_ylim()[1], " pre-training length", va="top", fontsize=8, color="grey")
    ax.set_xlabel("position (K tokens, end of bucket)")
    ax.set_ylabel("mean next-token loss")
    ax.set_title("Loss by position")
    ax.legend()
    ax.grid(alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def write_report(records: Sequence[dict], out_md, plot_dir=None, title: str = "DPE evaluation",
                 notes: str = "") -> List[Path]:
    """Write the markdown summary (and, with ``plot_dir``, the PNGs); returns the files written."""
    written = []
    plots = []
    if plot_dir is not None:
        for task in ("passkey", "niah", "ppl"):
            groups = _groups(records, task)
            for (model, fmt, scoring, dtype, needles), recs in groups.items():
                # one figure per (model, prompt format, scoring, dtype); a suffix only when a file
                # holds several (scoring and dtype named only when not the default generate / float32)
                tag = f"{Path(str(model)).name}_{fmt}"
                tag += "" if scoring == "generate" else f"_{scoring}"
                tag += "" if dtype == "float32" else f"_{dtype}"
                tag += "" if needles is None else f"_{needles}needles"
                suffix = "" if len(groups) == 1 else "_" + "".join(
                    c if c.isalnum() or c in "-." else "-" for c in tag)
                if task == "ppl":
                    found = [plot_loss(recs, Path(plot_dir) / f"loss_by_position{suffix}.png")]
                else:
                    found = [plot_heatmaps(recs, task, Path(plot_dir) / f"heatmap_{task}{suffix}.png"),
                             plot_heatmaps(recs, task, Path(plot_dir) / f"heatmap_{task}{suffix}_logprob.png",
                                           value="logprob")]
                plots += [p for p in found if p]
    md = summary_markdown(records, title=title, notes=notes)
    out_md = Path(out_md)
    if plots:
        md += "\n## Plots\n\n" + "\n".join(
            f"![{p.stem}]({os.path.relpath(p, out_md.parent)})" for p in plots) + "\n"
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(md)
    written.append(out_md)
    return written + plots
