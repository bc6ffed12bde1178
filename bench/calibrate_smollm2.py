"""Calibrate DPE for SmolLM2-135M-Instruct (8K pre-training length) at a target length with the
teacher-forced passkey score, measure the key-dimension mask alone, and ship the preset:
bench/results/calibration_smollm2_<16k|32k>.md.

    python bench/calibrate_smollm2.py --target 16384 --threads 1     # run or resume every step, then the report
    python bench/calibrate_smollm2.py --target 32768 --device cuda   # the 32K calibration (GPU recommended)
    python bench/calibrate_smollm2.py --target 16384 --threads 1 --worker   # a second process helps step 1
    python bench/calibrate_smollm2.py --target 16384 --report-only   # the report from the records so far
    python bench/calibrate_smollm2.py --target 16384 --ship          # after a complete run: write the preset
    python bench/calibrate_smollm2.py --target 16384 --needles 1     # the branched scorer, 20 contexts (own records)

With --needles N a sample is a context of N labelled needles, each question scored as if it alone
followed the context (`dpe detect --needles`): C = max(2, ceil(20 / N)) sweep contexts and C fresh
ones (C forwards and at least 20 needles per candidate: N=4 -> 5 contexts, N=10 -> 2), gains paired
per needle with standard errors over contexts. Context i is `dpe eval --needles N`'s sample i // M
with its needles shifted by (i % M + 0.5) / M, M = ceil(10 / N) (series_context; N=1: sample 0 at
depths 0.05, 0.15, ..., 0.95, then sample 1, ...): the ascent's contexts are the evaluation's
prompts, so the Self-Extend start's scores are those of `dpe eval --methods self_extend` at the
target, and the run takes them from the evaluation records it finds (the quality grid's and the
needle study's: seed_from_eval) instead of scoring them again. The mask step scores the sweep's
contexts with and without the mask. Its files go to calibration_smollm2_<16k|32k>_n<N>/.
For SmolLM2-135M use N=1 (bench/gpu_run.sh's default): bench/results/needles_smollm2_16k.md shows that with 4
or 10 needles per context the calibrated preset falls below self_extend while alone it is above, so
multi-needle scores would steer the calibration by a different question.

Steps (each resumes from its files under bench/results/calibration_smollm2_<16k|32k>/):
  1. dpe detect: coordinate ascent from the Self-Extend point (every group at 2 * ceil(target / 8K)),
     scorer passkey-logprob (the key's teacher-forced log-probability, one forward per sample),
     scales {1, 2, 4, 8, 16}, sweep samples 0-4 (depths 0, 25, 50, 75, 100 %), fresh samples 5-9,
     at most 3 passes, window 1024, 8 groups, no key-dimension mask (so the start is exactly
     Self-Extend and the kept configuration cannot be below it on the fresh samples) ->
     detect.json (calibrated_length = target), detect.jsonl, detect.trace.json;
  2. the key-dimension mask alone: the calibrated scales without and with the select-dims mask
     (bench/results/calibration_smollm2/dims.safetensors: top 24 of 32 pairs per query head from the
     first calibration; select-dims does not depend on the target), passkey teacher-forced at the
     target, 5 depths x 4 keys, the same 20 samples for both -> mask_off/, mask_on/ (with --needles:
     the sweep contexts with the mask -> mask_on/; without it, the ascent's records of the kept scales);
  3. the report: the ascent's decisions (or, for a partial run, its decisions so far and the next
     configuration it will score), the fresh-sample comparison, the mask comparison (paired);
  4. --ship (only after steps 1 and 2 are complete): dpe_kernels/presets/smollm2-135m-<16k|32k>.json,
     the calibrated scales, with the mask only when step 2 measured a paired gain beyond its
     standard error.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DIMS = os.path.join(HERE, "results", "calibration_smollm2", "dims.safetensors")
SCALES = [1, 2, 4, 8, 16]
SAMPLES, FRESH, MAX_PASSES, KEYS = 5, 5, 3, 4
TRAIN = 8192
NEEDLES = None            # --needles N: contexts of N needles (set by main)
MIN_NEEDLES = 20          # per candidate (issue 21): contexts = max(2, ceil(MIN_NEEDLES / N)), sweep and fresh each
CONTEXTS, FRESH_CONTEXTS = 2, 2  # set by main from N


def tag(target: int) -> str:
    return f"{target // 1024}k"


def paths(target: int):
    out = os.path.join(HERE, "results", f"calibration_smollm2_{tag(target)}" + (f"_n{NEEDLES}" if NEEDLES else ""))
    return {"out": out, "report": out + ".md", "cfg": os.path.join(out, "detect.json"),
            "jsonl": os.path.join(out, "detect.jsonl"), "trace": os.path.join(out, "detect.trace.json"),
            "masked": os.path.join(out, "detect_masked.json"), "notes": os.path.join(out, "RUN_NOTES.md"),
            "mask_off": os.path.join(out, "mask_off"), "mask_on": os.path.join(out, "mask_on"),
            "preset": os.path.join(ROOT, "dpe_kernels", "presets", f"smollm2-135m-{tag(target)}.json")}


def detect_argv(target: int, common):
    p = paths(target)
    multi = ["--needles", str(NEEDLES)] if NEEDLES else []
    samples, fresh = (CONTEXTS, FRESH_CONTEXTS) if NEEDLES else (SAMPLES, FRESH)
    return ["detect", "--target-length", str(target), "--scorer", "passkey-logprob", "--samples", str(samples),
            "--fresh-samples", str(fresh), *multi, "--scales", *map(str, SCALES), "--window", "1024", "--groups", "8",
            "--max-passes", str(MAX_PASSES), "--out", p["cfg"], "--jsonl", p["jsonl"], *common]


def mask_argv(target: int, which: str, common):
    p = paths(target)
    cfg = p["cfg"] if which == "mask_off" else p["masked"]
    if NEEDLES:  # the ascent's sweep contexts 0 .. CONTEXTS-1 (series_context: eval's samples x depth shifts)
        from dpe_kernels.tools.eval.multi import series_context, series_shifts

        m = series_shifts(NEEDLES)
        grid = ["--needles", str(NEEDLES), "--depths", *(str(series_context(k, NEEDLES)[1]) for k in range(m)),
                "--samples", str(-(-CONTEXTS // m))]
    else:
        grid = ["--depths", "5", "--samples", str(KEYS)]
    return ["eval", "--task", "passkey", "--scoring", "logprob", "--methods", "dpe", "--lengths", str(target),
            *grid, "--format", "raw", "--no-skip-zero", "--config", cfg,
            "--out-dir", p[which], "--no-plots", *common]


def common_args(args):
    """The dpe command-line options every step shares."""
    common = ["--device", args.device, "--no-progress"] + (["--threads", str(args.threads)] if args.threads else [])
    return common + (["--dtype", args.dtype] if args.dtype != "float32" else [])


def seed_from_eval(target: int, dtype: str = "float32") -> int:
    """With --needles: the Self-Extend start's context scores taken from the `dpe eval` records under
    bench/results/ (the quality grid's, the needle study's: the same prompts and forward,
    dpe_kernels.tools.calibrate.start_records_from_eval) instead of scored again; each copied record
    names its source. Returns how many contexts were added to detect.jsonl."""
    import glob

    from dpe_kernels.tools.calibrate import self_extend_scales, start_records_from_eval
    from dpe_kernels.tools.eval.runner import append_record, read_records

    p = paths(target)
    start = self_extend_scales(target, TRAIN, 8)
    have = {r["sample"] for r in read_records(p["jsonl"])
            if r["scales"] == start and r.get("needles") == NEEDLES and r.get("dtype") == dtype}
    evals = []
    for path in sorted(glob.glob(os.path.join(HERE, "results", "**", "results.jsonl"), recursive=True)):
        evals += [{**r, "source": os.path.relpath(path, ROOT)} for r in read_records(path)]
    recs = start_records_from_eval(evals, scorer="passkey-logprob", target_length=target, train_length=TRAIN,
                                   window=1024, num_groups=8, needles=NEEDLES, samples=CONTEXTS,
                                   fresh_samples=FRESH_CONTEXTS, dtype=dtype, model="smollm2", skip=have)
    for r in recs:
        append_record(p["jsonl"], r)
    return len(recs)


def run(args, dpe_main):
    p = paths(args.target)
    common = common_args(args)
    os.makedirs(p["out"], exist_ok=True)
    if NEEDLES:
        n = seed_from_eval(args.target, args.dtype)
        print(f"the Self-Extend start: {n} context(s) taken from dpe eval records (seed_from_eval)")
    rc = dpe_main(detect_argv(args.target, common))
    if rc:
        return rc
    from dpe_kernels import DPEConfig
    from dpe_kernels.tools.calibrate import load_dims_mask

    DPEConfig.from_json(p["cfg"]).with_mask(load_dims_mask(DIMS, "q")).to_json(p["masked"])
    # With --needles the side without the mask is the ascent's own records of the kept configuration
    # on the sweep contexts (the same prompts): only the side with the mask is scored.
    for which in ("mask_on",) if NEEDLES else ("mask_off", "mask_on"):
        rc = dpe_main(mask_argv(args.target, which, common))
        if rc:
            return rc
    return 0


def _trace(target: int):
    """(trace, complete): the finished run's trace, else the replay of the records so far."""
    from dpe_kernels.tools.calibrate import replay
    from dpe_kernels.tools.eval.runner import read_records

    p = paths(target)
    recs = read_records(p["jsonl"])
    if os.path.isfile(p["trace"]):
        return json.load(open(p["trace"])), True, recs
    samples, fresh = (CONTEXTS, FRESH_CONTEXTS) if NEEDLES else (SAMPLES, FRESH)
    t = replay(recs, target_length=target, train_length=TRAIN, scales=SCALES, samples=samples, fresh_samples=fresh,
               max_passes=MAX_PASSES, num_groups=8, base={"needles": NEEDLES})
    return t, False, recs


def _kept_records_as_eval(target: int, dtype: str):
    """With --needles: the kept configuration's records on the sweep contexts, keyed as the mask step's
    eval records are ((depth shift, sample, needle): context i is eval's sample i // M at its shift),
    or {} before the ascent is complete."""
    from dpe_kernels.tools.eval.multi import series_context

    trace, complete, recs = _trace(target)
    if not complete:
        return {}
    out = {}
    for r in recs:
        if (r["scales"] != trace["kept"] or r.get("needles") != NEEDLES or r.get("masked")
                or r.get("dtype", "float32") != dtype or r["sample"] >= CONTEXTS):
            continue
        sample, shift = series_context(r["sample"], NEEDLES)
        for j, (lp, ok) in enumerate(zip(r["needle_scores"], r["needle_exact"])):
            out[(round(shift, 4), sample, j)] = {"logprob": lp, "score": ok}
    return out


def mask_comparison(target: int):
    """[(key, off, on)] of the mask step: the same prompts without and with the mask."""
    from dpe_kernels.tools.eval.runner import read_records

    p = paths(target)
    on = {(round(r["depth"], 4), r["sample"], r.get("needle")): r
          for r in read_records(os.path.join(p["mask_on"], "results.jsonl"))}
    if NEEDLES:
        dtypes = {r.get("dtype", "float32") for r in on.values()}
        off = _kept_records_as_eval(target, dtypes.pop()) if len(dtypes) == 1 else {}
    else:
        off = {(round(r["depth"], 4), r["sample"], r.get("needle")): r
               for r in read_records(os.path.join(p["mask_off"], "results.jsonl"))}
    keys = sorted(set(off) & set(on))
    return [(k, off[k], on[k]) for k in keys]


def _machine() -> str:
    from dpe_kernels.tools.benchmarks.common import machine_description

    return machine_description("cpu")


def report(target: int):
    from dpe_kernels.tools.eval.stats import t_interval

    p = paths(target)
    trace, complete, recs = _trace(target)
    lines = [f"# DPE calibration on SmolLM2-135M-Instruct (8K trained), target {tag(target).upper()}, "
             "teacher-forced passkey score", "",
             f"Produced by `python bench/calibrate_smollm2.py --target {target}"
             + (f" --needles {NEEDLES}" if NEEDLES else "") + "` (steps in its docstring). Machine "
             f"(the report generator's view): {_machine()}. Each record names its dtype; seconds are per "
             "forward on a shared machine.", ""]
    if os.path.isfile(p["notes"]):
        lines += [open(p["notes"]).read().strip(), ""]
    secs = [r["seconds"] for r in recs]
    lines += ["## State", "",
              f"- records: **{len(recs)}** scored (configuration, sample) pairs"
              + (f", {sum(secs) / len(secs):.0f} s per forward on average" if secs else "")
              + (f", {copied} of them the Self-Extend start's, taken from dpe eval records (seed_from_eval)"
                 if (copied := sum(1 for r in recs if r.get("copied_from"))) else "") + ";",
              f"- ascent: {'complete' if complete else 'in progress'}; start (Self-Extend) {trace.get('start')}; "
              f"passes begun {trace.get('passes')}; decisions so far {len(trace.get('steps', []))} of at least 8;"]
    if not complete and trace.get("pending"):
        pend = trace["pending"]
        lines.append(f"- next to score: scales {pend['scales']}, sample {pend['sample']} (rerun the command above "
                     "to resume);")
    if complete:
        lines.append(f"- result: final of the ascent {trace['final']}, kept **{trace['kept']}** "
                     f"({'converged' if trace['converged'] else 'stopped at the pass bound'} after {trace['passes']} "
                     "pass(es)).")
    lines += ["", "## Decisions (score: teacher-forced log-probability of the key; gain: mean paired difference "
              "over the sweep samples ± its standard error; * = accepted, gain > standard error)", "",
              "| pass | group | incumbent | incumbent mean | candidates: gain ± se | chosen |", "|---|---|---|---|---|---|"]
    for s in trace.get("steps", []):
        cands = ", ".join(f"{c['scale']}: {c['gain']:+.3f} ± {c['se']:.3f}{'*' if c['accepted'] else ''}"
                          for c in s["candidates"])
        lines.append(f"| {s['pass']} | {s['group']} | {s['incumbent']} | {s['incumbent_mean']:.3f} | {cands} | "
                     f"{s['chosen'] if s['chosen'] is not None else 'kept'} |")
    lines.append("")
    f = trace.get("fresh")
    if f:
        lines += [f"## Fresh {'contexts' if NEEDLES else 'samples'}: final of the ascent vs the Self-Extend start", "",
                  f"final {trace['final']}: mean {f['final_mean']:.3f}; start {trace['start']}: mean "
                  f"{f['start_mean']:.3f}; paired gain {f['gain']:+.3f} ± {f['se']:.3f} -> kept the **{f['kept']}**.", ""]
    pairs = mask_comparison(target)
    what = (f"{CONTEXTS} contexts of {NEEDLES} needles; without the mask: the ascent's records of the kept scales"
            if NEEDLES else "20 passkey samples")
    lines += [f"## The key-dimension mask alone (calibrated scales, {what}, teacher-forced)", ""]
    if pairs:
        d = [on["logprob"] - off["logprob"] for _, off, on in pairs]
        iv = t_interval(d)
        if NEEDLES:  # needles of one context are not independent: bootstrap over contexts
            from dpe_kernels.tools.eval.stats import cluster_bootstrap

            ctx = {}
            for k, off, on in pairs:
                ctx.setdefault(k[:2], []).append(on["logprob"] - off["logprob"])
            iv = cluster_bootstrap(list(ctx.values()))
        acc_off = sum(off["score"] for _, off, _ in pairs) / len(pairs)
        acc_on = sum(on["score"] for _, _, on in pairs) / len(pairs)
        lines += [f"Paired samples: {len(pairs)}. Mean log-prob without the mask "
                  f"{sum(off['logprob'] for _, off, _ in pairs) / len(pairs):.3f}, with it "
                  f"{sum(on['logprob'] for _, _, on in pairs) / len(pairs):.3f}; difference (with - without) "
                  f"{iv.mean:+.3f}" + (f" [{iv.low:+.3f}, {iv.high:+.3f}] (95% "
                                       f"{'bootstrap over contexts' if NEEDLES else 't-interval'})" if iv.n > 1 else "")
                  + f". Exact match without / with: {100 * acc_off:.0f}% / {100 * acc_on:.0f}%.", ""]
    else:
        lines += ["Not run yet (step 2 follows the calibration).", ""]
    with open(p["report"], "w") as fh:
        fh.write("\n".join(lines))
    print(f"wrote {p['report']}")


def ship(target: int) -> int:
    from dpe_kernels import DPEConfig
    from dpe_kernels.tools.eval.stats import mean_se

    p = paths(target)
    trace, complete, _ = _trace(target)
    pairs = mask_comparison(target)
    if not complete or len(pairs) < 2 * KEYS:
        print(f"not shipped: the calibration is {'complete' if complete else 'incomplete'} and the mask step has "
              f"{len(pairs)} paired samples; finish both first", file=sys.stderr)
        return 1
    if NEEDLES:
        from dpe_kernels.tools.eval.stats import cluster_paired_gain

        ctx_on, ctx_off = {}, {}
        for k, off, on in pairs:
            ctx_on.setdefault(k[:2], []).append(on["logprob"])
            ctx_off.setdefault(k[:2], []).append(off["logprob"])
        gain, se = cluster_paired_gain(list(ctx_on.values()), [ctx_off[k] for k in ctx_on])
    else:
        gain, se = mean_se([on["logprob"] - off["logprob"] for _, off, on in pairs])
    src = p["masked"] if gain > se else p["cfg"]
    cfg = DPEConfig.from_json(src)
    if cfg.calibrated_length != target:
        print(f"not shipped: {src} says calibrated_length {cfg.calibrated_length}", file=sys.stderr)
        return 1
    os.makedirs(os.path.dirname(p["preset"]), exist_ok=True)
    shutil.copyfile(src, p["preset"])
    print(f"shipped {p['preset']} (scales {list(cfg.scales)}, {'with' if cfg.mask is not None else 'without'} the mask: "
          f"mask gain {gain:+.3f} ± {se:.3f})")
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", type=int, default=16384, choices=[16384, 32768])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--ship", action="store_true", help="write the preset (after a complete run)")
    ap.add_argument("--worker", action="store_true",
                    help="help a running calibration of this target (`dpe detect --worker`: the current "
                         "group's candidates from the far end, into the same records); exits when step 1 is done")
    ap.add_argument("--needles", type=int, default=None,
                    help="the multi-needle scorer: contexts of N needles (own records; see the docstring)")
    args = ap.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        ap.error("--threads must be >= 1")
    if args.needles is not None and not 1 <= args.needles <= 24:
        ap.error("--needles must be in 1..24")
    global NEEDLES, CONTEXTS, FRESH_CONTEXTS
    NEEDLES = args.needles
    if NEEDLES:
        CONTEXTS = FRESH_CONTEXTS = max(2, -(-MIN_NEEDLES // NEEDLES))
    if args.worker:
        from dpe_kernels.tools.cli import main as dpe_main

        return dpe_main(detect_argv(args.target, common_args(args)) + ["--worker"])
    if not args.report_only and not args.ship:
        from dpe_kernels.tools.cli import main as dpe_main

        rc = run(args, dpe_main)
        if rc:
            return rc
    report(args.target)
    return ship(args.target) if args.ship else 0


if __name__ == "__main__":
    sys.exit(main())
