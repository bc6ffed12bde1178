"""``dpe``: command-line entry point (demo, eval, bench).

    dpe demo   passkey retrieval at 16K tokens with plain RoPE and with DPE (SmolLM2-135M, 8K trained)
    dpe eval   passkey / niah / ppl over methods and lengths -> JSONL (resumable), table, plots
    dpe bench  the rope / attention microbenchmarks

Run ``dpe <command> --help`` for the options.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

from ..utils import DTYPE_NAMES

__all__ = ["main", "build_parser", "SUBCOMMANDS"]

DEMO_PRESET = "smollm2-135m"  # the calibrated SmolLM2 preset the demo uses


def _add_model_args(p: argparse.ArgumentParser):
    p.add_argument("--model", default="smollm2",
                   help="registry name (smollm2, tiny-random-llama), a local HF model directory or a .gguf "
                        "file; nothing is downloaded (default: smollm2)")
    p.add_argument("--dtype", default="float32", choices=DTYPE_NAMES, help="model dtype (default: float32)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:1, ... (default: auto = cuda when available, else cpu)")


def _add_dpe_args(p: argparse.ArgumentParser, default_help: str = "auto"):
    from .eval.methods import CALIBRATED_PRESETS, DPE_PRESETS

    p.add_argument("--preset", "--dpe-preset", dest="dpe_preset", default=None,
                   help="DPE configuration: auto (the uncalibrated starting scales from the model's frequencies "
                        "and the extension factor, see dpe_kernels/config.py), uniform, a published preset "
                        f"({', '.join(DPE_PRESETS)}; 64-pair models, scales only) or a calibrated preset shipped "
                        f"with its key-dimension mask ({', '.join(CALIBRATED_PRESETS) or 'none'}) "
                        f"(default: {default_help})")
    p.add_argument("--mask", dest="dpe_mask", default=None,
                   help="key-dimension mask from a `dpe select-dims` file, FILE (per query head) or FILE:kv "
                        "(per KV head); replaces the mask of the preset / config")
    p.add_argument("--config", "--dpe-config", dest="dpe_config", default=None,
                   help="DPEConfig JSON file (DPEConfig.to_json); overrides --preset")
    p.add_argument("--target-length", type=int, default=None,
                   help="length the methods are configured for (default: each evaluated length)")


def build_parser() -> argparse.ArgumentParser:
    from .eval.runner import DEFAULT_FORMAT, TASKS
    from .eval.methods import METHODS

    parser = argparse.ArgumentParser(
        prog="dpe", description="DPE: training-free long-context extension for RoPE models (demo, eval, bench).")
    sub = parser.add_subparsers(dest="command", metavar="{demo,eval,bench,select-dims,detect}")
    sub.required = True

    d = sub.add_parser("demo", help="passkey retrieval beyond the pre-training length: plain RoPE vs DPE",
                       description="Hide a 5-digit pass key in a long filler text and ask for it, with plain "
                                   "RoPE and with DPE; prints both answers and the time each took. The "
                                   "default model is SmolLM2-135M-Instruct (8K pre-training length); "
                                   "16K tokens is twice that.")
    d.add_argument("--length", type=int, default=16384, help="prompt length in tokens (default: 16384)")
    d.add_argument("--depth", type=float, default=0.5, help="needle depth, 0..1 (default: 0.5)")
    d.add_argument("--key-index", type=int, default=0, help="which reproducible key to hide (default: 0)")
    d.add_argument("--format", dest="fmt", default=DEFAULT_FORMAT, choices=("raw", "chat"),
                   help=f"prompt format (default: {DEFAULT_FORMAT})")
    d.add_argument("--methods", nargs="+", default=["rope", "dpe"], choices=METHODS,
                   help="methods to run (default: rope dpe)")
    _add_model_args(d)
    _add_dpe_args(d, default_help=f"{DEMO_PRESET} for SmolLM2 (calibrated), auto for other models")

    e = sub.add_parser("eval", help="passkey / niah / ppl over methods and lengths (resumable JSONL, table, plots)",
                       description="Evaluate methods x lengths x depths x samples. Every sample is one JSONL "
                                   "record; rerunning the same command resumes (done records are skipped). "
                                   "Writes the markdown table and PNG plots from ALL records of the JSONL.")
    e.add_argument("--task", default="passkey", choices=TASKS, help="task (default: passkey)")
    e.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   help="methods (default: all)")
    e.add_argument("--lengths", nargs="+", type=int, default=[4096, 8192, 16384],
                   help="prompt lengths in tokens (default: 4096 8192 16384)")
    e.add_argument("--depths", nargs="+", default=["5"],
                   help="needle depths: one integer N (N evenly spaced in 0..1) or fractions (default: 5)")
    e.add_argument("--samples", type=int, default=2,
                   help="keys per (length, depth); texts for ppl (default: 2)")
    e.add_argument("--format", dest="fmt", default=DEFAULT_FORMAT, choices=("raw", "chat"),
                   help=f"prompt format (default: {DEFAULT_FORMAT})")
    e.add_argument("--haystack", default=None, choices=("filler", "essays"),
                   help="haystack text (default: filler for passkey, essays for niah)")
    e.add_argument("--out-dir", default="eval_results", help="folder for the JSONL, table and plots "
                                                             "(default: eval_results)")
    e.add_argument("--jsonl", default=None, help="records file (default: OUT_DIR/results.jsonl)")
    e.add_argument("--table", default=None, help="markdown summary (default: OUT_DIR/summary.md)")
    e.add_argument("--title", default="DPE evaluation", help="title of the markdown summary")
    e.add_argument("--notes", default="", help="text (or @file) put under the title of the summary")
    e.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    e.add_argument("--report-only", action="store_true", help="only rebuild the table and plots from the JSONL")
    e.add_argument("--no-skip-zero", dest="skip_zero", action="store_false",
                   help="run every length even after a method scored 0 at a shorter one")
    e.add_argument("--bucket", type=int, default=1024, help="ppl bucket size in tokens (default: 1024)")
    e.add_argument("--seed", type=int, default=0, help="seed of the keys / needles (default: 0)")
    e.add_argument("--train-length", type=int, default=None,
                   help="pre-training length (default: from the model config)")
    e.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bar")
    _add_model_args(e)
    _add_dpe_args(e)

    b = sub.add_parser("bench", help="rope / attention microbenchmarks (extra arguments go to the script)",
                       description="Run bench/bench_rope.py or bench/bench_attention.py from the source tree "
                                   "(or the copies installed with the package). Arguments after the name go to "
                                   "the script, e.g. `dpe bench rope -- --tokens 4096`; `dpe bench rope -- "
                                   "--help` lists them.")
    b.add_argument("which", choices=("rope", "attention"), help="which benchmark")
    b.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark script")

    from .calibrate import SCORERS

    s = sub.add_parser("select-dims", help="calibration step 1: score every (layer, head, pair), write top-k masks",
                       description="Run the model over the essays at several lengths; forward hooks on every "
                                   "layer's q_proj / k_proj accumulate C[l,h,i] = mean_t |q_t^(i)| |k_t^(i)| of the "
                                   "pre-RoPE q and k (k from KV head h // n_rep) while streaming. Writes "
                                   "safetensors: scores [L,H_q,P], mask (top-k per query head), scores_kv "
                                   "[L,H_k,P], mask_kv. Pass it to `dpe detect --mask FILE`.")
    s.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096],
                   help="text lengths in tokens (default: 1024 2048 4096)")
    s.add_argument("--samples", type=int, default=2, help="texts per length (default: 2)")
    s.add_argument("--top-k", type=int, default=None, help="pairs kept per head (default: round(0.75 P), the "
                                                          "paper's 48 of 64)")
    s.add_argument("--layout", default="neox", choices=("neox", "gptj"), help="pair layout (default: neox, HF)")
    s.add_argument("--out", default="dims.safetensors", help="output file (default: dims.safetensors)")
    s.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    _add_model_args(s)

    t = sub.add_parser("detect", help="calibration step 2: per-group scale sweep at the target length -> config JSON",
                       description="Sweep one group's scale at a time over --scales while the other groups stay "
                                   "at 2 x target / train (rounded up), score each configuration at the target "
                                   "length, keep each group's best scale. Tie-break: higher mean score, then the "
                                   "scale closest (log2) to the others' default, then the smaller scale. One "
                                   "JSONL record per run: rerunning resumes. Writes a DPEConfig JSON (with the "
                                   "mask when --mask is given).")
    t.add_argument("--target-length", type=int, default=16384, help="target length in tokens (default: 16384)")
    t.add_argument("--scales", nargs="+", type=int, default=[1, 2, 4, 8, 16],
                   help="scales tried per group (default: 1 2 4 8 16)")
    t.add_argument("--scorer", default="ppl", choices=SCORERS,
                   help="ppl: minus the mean loss beyond the pre-training length (cheap proxy, one forward); "
                        "passkey / niah: retrieval accuracy (default: ppl)")
    t.add_argument("--samples", type=int, default=1, help="samples per configuration (default: 1)")
    t.add_argument("--window", type=int, default=1024, help="DPE window (default: 1024)")
    t.add_argument("--groups", type=int, default=8, help="groups of equal size (default: 8)")
    t.add_argument("--mask", dest="dpe_mask", default=None, help="a `dpe select-dims` file; its per-query-head mask is used "
                                                "(FILE:kv for the per-KV-head one)")
    t.add_argument("--train-length", type=int, default=None, help="pre-training length (default: model config)")
    t.add_argument("--out", default="dpe_config.json", help="config JSON (default: dpe_config.json)")
    t.add_argument("--jsonl", default=None, help="sweep records (default: OUT with .jsonl)")
    t.add_argument("--seed", type=int, default=0, help="seed of the keys / needles (default: 0)")
    t.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    _add_model_args(t)
    return parser


# --------------------------------------------------------------------------- helpers
def _setup(args):
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ["HF_HUB_OFFLINE"] = "1"


def _load(args):
    import torch

    from .models import ModelNotAvailableError, load_model

    t0 = time.perf_counter()
    try:
        model, tok = load_model(args.model, dtype=getattr(torch, args.dtype))
    except ModelNotAvailableError as e:
        print(f"dpe: {e}", file=sys.stderr)
        raise SystemExit(2)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    print(f"loaded {args.model} ({args.dtype}, {device}) in {time.perf_counter() - t0:.1f} s", flush=True)
    return model, tok


def _dpe_mask(args):
    """The --mask FILE[:q|kv] of a `dpe select-dims` file, or None."""
    if not args.dpe_mask:
        return None
    from .calibrate import load_dims_mask

    path, _, which = args.dpe_mask.partition(":")
    if not Path(path).is_file() or which not in ("", "q", "kv"):
        print(f"dpe: --mask must be FILE or FILE:kv with FILE written by `dpe select-dims`; got "
              f"{args.dpe_mask!r}", file=sys.stderr)
        raise SystemExit(2)
    return load_dims_mask(path, which or "q")


def _dpe_config(args):
    if not args.dpe_config:
        return None
    from ..config import DPEConfig

    return DPEConfig.from_json(args.dpe_config)


# --------------------------------------------------------------------------- commands
def cmd_demo(args) -> int:
    _setup(args)
    t_start = time.perf_counter()
    from .eval import methods as M
    from .eval.generate import greedy_generate
    from .eval.passkey import PASSKEY_MAX_NEW_TOKENS, passkey_key, passkey_prompt, passkey_stop, score_passkey
    from .models import sdpa_without_native_gqa, train_length

    model, tok = _load(args)
    T = train_length(model)
    key = passkey_key(args.key_index)
    prompt = passkey_prompt(tok, args.length, args.depth, key, args.fmt)
    print(f"passkey demo: {len(prompt)} prompt tokens ({len(prompt) / T:.1f}x the {T}-token pre-training "
          f"length), key {key} at depth {args.depth:.0%} (token {prompt.needle_positions[0]}), "
          f"format {args.fmt}", flush=True)
    cfg = _dpe_config(args)
    mask = _dpe_mask(args)
    if args.dpe_preset is None:
        from .eval.methods import CALIBRATED_PRESETS

        smol = str(args.model).lower() in ("smollm2", "smollm2-135m-instruct")
        args.dpe_preset = DEMO_PRESET if smol and DEMO_PRESET in CALIBRATED_PRESETS else "auto"
    results = []
    for name in args.methods:
        kw = M.method_kwargs(model, name, args.length, T, target_length=args.target_length,
                             dpe_preset=args.dpe_preset, dpe_config=cfg, dpe_mask=mask)
        params = M.describe(name, kw)
        print(f"\n[{name}] {params} ... running", flush=True)
        handle = M.apply(model, name, kw)
        try:
            with sdpa_without_native_gqa(model):
                text, _, secs = greedy_generate(model, tok, prompt.tensor(), PASSKEY_MAX_NEW_TOKENS,
                                                stop=passkey_stop)
        finally:
            handle.remove()
        ok = score_passkey(text, key) == 1.0
        results.append((name, text.strip(), ok, secs))
        print(f"[{name}] answer: {text.strip()!r} -> {'CORRECT' if ok else 'wrong'} ({secs:.1f} s)", flush=True)
    print("\nsummary (expected key %d):" % key)
    for name, text, ok, secs in results:
        print(f"  {name:12s} {'CORRECT' if ok else 'wrong  '}  {secs:7.1f} s  answer {text!r}")
    print(f"total {time.perf_counter() - t_start:.1f} s (model load included)")
    return 0


def cmd_eval(args) -> int:
    from .eval.report import write_report
    from .eval.runner import EvalSpec, parse_depths, read_records, run_eval

    out_dir = Path(args.out_dir)
    jsonl = Path(args.jsonl) if args.jsonl else out_dir / "results.jsonl"
    table = Path(args.table) if args.table else out_dir / "summary.md"
    notes = args.notes
    if notes.startswith("@"):
        notes = Path(notes[1:]).read_text()
    if not args.report_only:
        _setup(args)
        spec = EvalSpec(task=args.task, methods=args.methods, lengths=args.lengths,
                        depths=parse_depths(args.depths), samples=args.samples, fmt=args.fmt,
                        haystack=args.haystack, model_name=args.model, train_length=args.train_length,
                        target_length=args.target_length, dpe_preset=args.dpe_preset or "auto",
                        dpe_config=_dpe_config(args), dpe_mask=_dpe_mask(args), skip_zero=args.skip_zero, seed=args.seed,
                        bucket=args.bucket)
        model, tok = _load(args)
        from .models import sdpa_without_native_gqa

        with sdpa_without_native_gqa(model):
            run_eval(model, tok, spec, jsonl, progress=args.progress)
    records = read_records(jsonl)
    if not records:
        print(f"dpe: no records in {jsonl}", file=sys.stderr)
        return 1
    files = write_report(records, table, None if args.no_plots else out_dir, title=args.title, notes=notes)
    for f in files:
        print(f"wrote {f}")
    return 0


def cmd_bench(args) -> int:
    import importlib

    bench = importlib.import_module(f"{__package__}.benchmarks.{args.which}")
    argv = list(args.args)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    try:
        return int(bench.main(argv) or 0)
    except SystemExit as e:  # argparse inside the benchmark (--help, a bad argument)
        return int(e.code or 0) if not isinstance(e.code, str) else 1


def cmd_select_dims(args) -> int:
    from .calibrate import select_dims

    _setup(args)
    model, tok = _load(args)
    t0 = time.perf_counter()
    res = select_dims(model, tok, lengths=args.lengths, samples=args.samples, top_k=args.top_k, out=args.out,
                      layout=args.layout, progress=args.progress)
    L, hq, P = res["scores"].shape
    print(f"wrote {args.out}: scores [{L}, {hq}, {P}], top-{int(res['mask'][0, 0].sum())} masks per query head "
          f"and per KV head ({time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_detect(args) -> int:
    from .calibrate import detect

    _setup(args)
    mask = _dpe_mask(args)
    model, tok = _load(args)
    from .models import sdpa_without_native_gqa

    jsonl = args.jsonl or str(Path(args.out).with_suffix(".jsonl"))
    with sdpa_without_native_gqa(model):
        cfg, records = detect(model, tok, target_length=args.target_length, train_length=args.train_length,
                              scales=args.scales, scorer=args.scorer, samples=args.samples, window=args.window,
                              num_groups=args.groups, mask=mask, jsonl=jsonl, progress=args.progress,
                              seed=args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    cfg.to_json(args.out)
    print(f"wrote {args.out} (scales {list(cfg.scales)}, window {cfg.window}"
          f"{', mask ' + args.dpe_mask if args.dpe_mask else ''}); {len(records)} sweep records in {jsonl}")
    return 0


COMMANDS = {"demo": cmd_demo, "eval": cmd_eval, "bench": cmd_bench, "select-dims": cmd_select_dims,
            "detect": cmd_detect}
SUBCOMMANDS = tuple(COMMANDS)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
