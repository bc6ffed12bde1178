"""``dpe``: command-line entry point (demo, eval, bench, select-dims, detect, export-hf).

    dpe demo         passkey retrieval at 16K tokens with plain RoPE and with DPE (SmolLM2-135M, 8K trained)
    dpe eval         passkey / niah / ppl over methods and lengths -> JSONL (resumable), table, plots
    dpe bench        the microbenchmarks (dpe_kernels/tools/benchmarks/)
    dpe select-dims  calibration step 1: key dimensions -> safetensors masks
    dpe detect       calibration step 2: coordinate ascent over the groups' scales -> DPEConfig JSON
    dpe export-hf    write a Hugging Face model directory (for vLLM) from a model loaded offline
    dpe parity       every backend of every op against the float64 oracles; golden vectors (tools/parity.py)

Run ``dpe <command> --help`` for the options.

Bad input never gets far: every argument is checked when it is parsed (``type=`` validators)
or in the command's validation step, which runs before any model is loaded; the few checks
that need the model (its pair count, its tokenizer's prompt length) run right after loading,
before anything is computed. Every failure is ONE line ``dpe SUB: error: ...`` on stderr and
exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

from ..utils import DTYPE_NAMES

__all__ = ["main", "build_parser", "SUBCOMMANDS", "CLIError"]

# The calibrated SmolLM2 presets the demo prefers, first shipped wins (used only up to the length
# each was calibrated for): the issue-12 16K calibration once it is shipped, else the first one.
DEMO_PRESETS = ("smollm2-135m-16k", "smollm2-135m")


def demo_preset() -> Optional[str]:
    """The demo's default calibrated preset for SmolLM2 (the first of DEMO_PRESETS that is shipped)."""
    from ..config import calibrated_presets

    shipped = calibrated_presets()
    return next((p for p in DEMO_PRESETS if p in shipped), None)


class CLIError(Exception):
    """A bad argument found after parsing; :func:`main` prints it as ``dpe SUB: error: ...``, exit 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``PROG: error: MESSAGE (see PROG --help)``, exit 2, no usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


# --------------------------------------------------------------------------- argument types
def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return v


def _needles(text: str) -> int:
    from .eval.multi import MAX_NEEDLES

    v = _positive_int(text)
    if v > MAX_NEEDLES:
        raise argparse.ArgumentTypeError(f"must be 1..{MAX_NEEDLES} (one label per needle), got {text!r}")
    return v


def _non_negative_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return v


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _min_int(lo: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {text!r}")
        return v
    parse.__name__ = f"int>={lo}"
    return parse


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}") from None
    if not 0.0 <= v <= 1.0:  # also false for nan
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}")
    return v


def _depth_item(text: str) -> str:
    """One --depths value: a count N >= 1 (alone) or a fraction in [0, 1]; checked as a whole later."""
    if text.isdigit():
        if int(text) < 1:
            raise argparse.ArgumentTypeError(f"the number of depths must be >= 1, got {text!r}")
        return text
    _fraction(text)
    return text


def _existing_file(text: str) -> str:
    if not Path(text).expanduser().is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    return text


def _preset_name(text: str) -> str:
    from ..config import preset_names

    names = preset_names()
    if text not in names:
        raise argparse.ArgumentTypeError(f"unknown preset {text!r}; choose one of {', '.join(names)}")
    return text


def _mask_spec(text: str) -> str:
    path, _, which = text.partition(":")
    if which not in ("", "q", "kv") or not Path(path).expanduser().is_file():
        raise argparse.ArgumentTypeError(f"must be FILE or FILE:kv with FILE written by `dpe select-dims`; "
                                         f"got {text!r}")
    return text


def _device(text: str) -> str:
    import torch

    if text == "auto":
        return text
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N, got {text!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N, got {text!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device is visible")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return text


def _model_name(text: str) -> str:
    from .models import MODELS

    if text.lower() in MODELS:
        return text
    p = Path(text).expanduser()
    if (p.is_file() and p.suffix == ".gguf") or p.is_dir():
        return text  # the loader checks the directory's contents and says what is missing
    raise argparse.ArgumentTypeError(f"unknown model {text!r}: use one of {', '.join(sorted(MODELS))}, a local "
                                     f"Hugging Face model directory or a .gguf file (nothing is downloaded)")


def _bench_names():
    import pkgutil

    from . import benchmarks

    return sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__) if m.name not in ("common",)
                  and not m.name.startswith("_"))


# --------------------------------------------------------------------------- parser
def _add_model_args(p: argparse.ArgumentParser):
    p.add_argument("--model", default="smollm2", type=_model_name,
                   help="registry name (smollm2, tiny-random-llama), a local HF model directory or a .gguf "
                        "file; nothing is downloaded (default: smollm2)")
    p.add_argument("--dtype", default="float32", choices=DTYPE_NAMES,
                   help="model dtype (default: float32; bfloat16 is faster on CPUs with AMX, see the README)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="auto", type=_device,
                   help="cpu, cuda, cuda:1, ... (default: auto = cuda when available, else cpu)")


def _add_dpe_args(p: argparse.ArgumentParser, default_help: str = "auto"):
    from ..config import PAPER_PRESETS, calibrated_presets

    p.add_argument("--preset", "--dpe-preset", dest="dpe_preset", default=None, type=_preset_name,
                   help="DPE configuration: auto (the uncalibrated starting scales from the model's frequencies "
                        "and the extension factor, see dpe_kernels/config.py), uniform, a published preset "
                        f"({', '.join(PAPER_PRESETS)}; 64-pair models, scales only) or a calibrated preset shipped "
                        f"with its key-dimension mask ({', '.join(calibrated_presets()) or 'none'}) "
                        f"(default: {default_help})")
    p.add_argument("--mask", dest="dpe_mask", default=None, type=_mask_spec,
                   help="key-dimension mask from a `dpe select-dims` file, FILE (per query head) or FILE:kv "
                        "(per KV head); replaces the mask of the preset / config")
    p.add_argument("--config", "--dpe-config", dest="dpe_config", default=None, type=_existing_file,
                   help="DPEConfig JSON file (DPEConfig.to_json); overrides --preset")
    p.add_argument("--target-length", type=_positive_int, default=None,
                   help="length the methods are configured for (default: each evaluated length)")
    p.add_argument("--allow-longer", action="store_true",
                   help="use a calibrated preset / config past the context length it was calibrated for "
                        "(refused otherwise)")


def build_parser() -> argparse.ArgumentParser:
    from .calibrate import SCORERS
    from .eval.methods import METHODS
    from .eval.multi import MAX_NEEDLES
    from .eval.runner import DEFAULT_FORMAT, SCORINGS, TASKS

    parser = _Parser(prog="dpe", description="DPE: training-free long-context extension for RoPE models "
                                             "(demo, eval, bench, calibration, export).")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    sub.required = True

    d = sub.add_parser("demo", help="passkey retrieval beyond the pre-training length: plain RoPE vs DPE",
                       description="Hide a 5-digit pass key in a long filler text and ask for it, with plain "
                                   "RoPE and with DPE; prints both answers and the time each took. The "
                                   "default model is SmolLM2-135M-Instruct (8K pre-training length); "
                                   "16K tokens is twice that.")
    d.add_argument("--length", type=_positive_int, default=16384, help="prompt length in tokens (default: 16384)")
    d.add_argument("--depth", type=_fraction, default=0.5, help="needle depth, 0..1 (default: 0.5)")
    d.add_argument("--key-index", type=_non_negative_int, default=0,
                   help="which reproducible key to hide (default: 0)")
    d.add_argument("--format", dest="fmt", default=DEFAULT_FORMAT, choices=("raw", "chat"),
                   help=f"prompt format (default: {DEFAULT_FORMAT})")
    d.add_argument("--methods", nargs="+", default=["rope", "dpe"], choices=METHODS,
                   help="methods to run (default: rope dpe)")
    _add_model_args(d)
    _add_dpe_args(d, default_help=f"the first shipped of {', '.join(DEMO_PRESETS)} for SmolLM2 (calibrated) up "
                                  "to the length it was calibrated for, else auto")

    e = sub.add_parser("eval", help="passkey / niah / ppl over methods and lengths (resumable JSONL, table, plots)",
                       description="Evaluate methods x lengths x depths x samples. Every sample is one JSONL "
                                   "record; rerunning the same command resumes (done records are skipped). "
                                   "Writes the markdown table and PNG plots from ALL records of the JSONL.")
    e.add_argument("--task", default="passkey", choices=TASKS, help="task (default: passkey)")
    e.add_argument("--scoring", default="generate", choices=SCORINGS,
                   help="passkey / niah: generate (greedy answer), logprob (teacher-forced log-probability "
                        "of the answer and exact match from one forward, no generation) or both "
                        "(default: generate)")
    e.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   help="methods (default: all)")
    e.add_argument("--lengths", nargs="+", type=_positive_int, default=[4096, 8192, 16384],
                   help="prompt lengths in tokens (default: 4096 8192 16384)")
    e.add_argument("--depths", nargs="+", type=_depth_item, default=["5"],
                   help="needle depths: one integer N (N evenly spaced in 0..1) or fractions (default: 5)")
    e.add_argument("--samples", type=_positive_int, default=2,
                   help="keys per (length, depth); texts for ppl; contexts per (length, depth) with --needles "
                        "(default: 2)")
    e.add_argument("--needles", type=_needles, default=None,
                   help=f"with --scoring logprob: N labelled needles per context (1..{MAX_NEEDLES}), each question "
                        "scored as if it alone followed the context (the context runs once); needle j at depth "
                        "(j + depth) / N. Default: the single-needle prompts")
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
    e.add_argument("--bucket", type=_positive_int, default=1024, help="ppl bucket size in tokens (default: 1024)")
    e.add_argument("--seed", type=_int, default=0, help="seed of the keys / needles (default: 0)")
    e.add_argument("--train-length", type=_positive_int, default=None,
                   help="pre-training length (default: from the model config)")
    e.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bar")
    _add_model_args(e)
    _add_dpe_args(e)

    b = sub.add_parser("bench", help="the microbenchmarks (extra arguments go to the benchmark)",
                       description="Run a benchmark of dpe_kernels/tools/benchmarks/ (bench/bench_*.py in the "
                                   "source tree). Arguments after the name go to the benchmark, e.g. `dpe bench "
                                   "rope -- --tokens 4096`; `dpe bench rope -- --help` lists them.")
    b.add_argument("which", choices=_bench_names(), help="which benchmark")
    b.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark")

    s = sub.add_parser("select-dims", help="calibration step 1: score every (layer, head, pair), write top-k masks",
                       description="Run the model over the essays at several lengths; forward hooks on every "
                                   "layer's q_proj / k_proj accumulate C[l,h,i] = mean_t |q_t^(i)| |k_t^(i)| of the "
                                   "pre-RoPE q and k (k from KV head h // n_rep) while streaming. Writes "
                                   "safetensors: scores [L,H_q,P], mask (top-k per query head), scores_kv "
                                   "[L,H_k,P], mask_kv. Pass it to `dpe detect --mask FILE`.")
    s.add_argument("--lengths", nargs="+", type=_min_int(2), default=[1024, 2048, 4096],
                   help="text lengths in tokens, each >= 2 (default: 1024 2048 4096)")
    s.add_argument("--samples", type=_positive_int, default=2, help="texts per length (default: 2)")
    s.add_argument("--top-k", type=_positive_int, default=None,
                   help="pairs kept per head, at most the model's pairs (default: round(0.75 P), the paper's "
                        "48 of 64)")
    s.add_argument("--layout", default="neox", choices=("neox", "gptj"), help="pair layout (default: neox, HF)")
    s.add_argument("--out", default="dims.safetensors", help="output file (default: dims.safetensors)")
    s.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    _add_model_args(s)

    t = sub.add_parser("detect", help="calibration step 2: coordinate ascent over the groups' scales -> config JSON",
                       description="Coordinate ascent from the Self-Extend point (every group at "
                                   "2 * ceil(target / train)) at the target length: each pass sweeps group g "
                                   "over --scales with the other groups at their current best, and accepts a "
                                   "change only when the mean paired gain on the same --samples exceeds its "
                                   "standard error; passes repeat while anything changes (at most "
                                   "--max-passes); the final configuration and the start are then scored on "
                                   "--fresh-samples new samples and the better is kept. One JSONL record per "
                                   "scored (configuration, sample): rerunning resumes. Writes a DPEConfig JSON "
                                   "(with the mask when --mask is given, and calibrated_length = the target) "
                                   "and the ascent's decisions (OUT with .trace.json).")
    t.add_argument("--target-length", type=_positive_int, default=16384, help="target length in tokens (default: 16384)")
    t.add_argument("--ship-to", default=None, metavar="DIR",
                   help="also write the result into the Hugging Face model directory DIR (config.json 'dpe' block, "
                        "max_position_embeddings = --target-length): `vllm serve DIR` then serves DPE")
    t.add_argument("--scales", nargs="+", type=_positive_int, default=[1, 2, 4, 8, 16],
                   help="scales tried per group (default: 1 2 4 8 16)")
    t.add_argument("--scorer", default="passkey-logprob", choices=SCORERS,
                   help="passkey-logprob / niah-logprob: teacher-forced log-probability of the answer (one "
                        "forward, no generation); passkey / niah: retrieval accuracy of the greedy answer; "
                        "ppl: minus the mean loss beyond the pre-training length (default: passkey-logprob)")
    t.add_argument("--samples", type=_min_int(2), default=4,
                   help="samples per configuration in the sweep, >= 2 (the acceptance rule needs a standard "
                        "error) (default: 4)")
    t.add_argument("--fresh-samples", type=_positive_int, default=None,
                   help="fresh samples of the final comparison with the start (default: --samples)")
    t.add_argument("--needles", type=_needles, default=None,
                   help=f"with a -logprob scorer: a sample is a context of N labelled needles (1..{MAX_NEEDLES}), each "
                        "question scored as if it alone followed the context; gains are paired per needle with "
                        "standard errors over contexts (default: single-needle samples)")
    t.add_argument("--max-passes", type=_positive_int, default=3, help="passes over the groups at most (default: 3)")
    t.add_argument("--window", type=_positive_int, default=1024, help="DPE window (default: 1024)")
    t.add_argument("--groups", type=_positive_int, default=8, help="groups of equal size (default: 8)")
    t.add_argument("--mask", dest="dpe_mask", default=None, type=_mask_spec,
                   help="a `dpe select-dims` file; its per-query-head mask is used (FILE:kv for the per-KV-head "
                        "one). Without it the start is exactly Self-Extend")
    t.add_argument("--train-length", type=_positive_int, default=None, help="pre-training length (default: model config)")
    t.add_argument("--out", default="dpe_config.json", help="config JSON (default: dpe_config.json)")
    t.add_argument("--jsonl", default=None, help="records (default: OUT with .jsonl)")
    t.add_argument("--worker", action="store_true",
                   help="help a running `dpe detect` with the same arguments: score the current group's "
                        "candidates from the far end into the same --jsonl (the main process makes the "
                        "decisions and writes OUT); exits when the ascent is complete")
    t.add_argument("--seed", type=_int, default=0, help="seed of the keys / needles (default: 0)")
    t.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    _add_model_args(t)

    x = sub.add_parser("export-hf", help="write a Hugging Face model directory (safetensors, config, tokenizer)",
                       description="Write a Hugging Face model directory from a model loaded offline (the "
                                   "shipped SmolLM2 GGUF de-quantised), for engines that read no GGUF (vLLM).")
    _export_hf().build_parser(x)
    y = sub.add_parser("parity", help="every backend of every op against the float64 oracles; golden vectors",
                       description=_parity().__doc__.split("\n\n")[0])
    _parity().build_parser(y)
    for name, p in sub.choices.items():
        p.set_defaults(command_parser=p)
    return parser


def _export_hf():
    from . import export_hf

    return export_hf


def _parity():
    from . import parity

    return parity


# --------------------------------------------------------------------------- validation (before any model loads)
def _read_config(args):
    """The --config file as a DPEConfig (parsed in the validation step), or None."""
    if not getattr(args, "dpe_config", None):
        return None
    from ..config import DPEConfig

    try:
        return DPEConfig.from_json(Path(args.dpe_config).expanduser())
    except (OSError, ValueError, TypeError) as e:
        raise CLIError(f"--config {args.dpe_config!r} is not a DPEConfig JSON file: {e}") from None


def _read_mask(args):
    """The --mask FILE[:q|kv] of a `dpe select-dims` file, or None."""
    if not getattr(args, "dpe_mask", None):
        return None
    from .calibrate import load_dims_mask

    path, _, which = args.dpe_mask.partition(":")
    try:
        return load_dims_mask(Path(path).expanduser(), which or "q")
    except Exception as e:  # safetensors raises its own error types for a file that is not one
        raise CLIError(f"--mask {args.dpe_mask!r}: not a `dpe select-dims` file ({e})") from None


def _calibrated_config(args, name: Optional[str], cfg):
    """(what, config) whose calibrated length limits the lengths, or (None, None)."""
    from ..config import DPEConfig, calibrated_presets

    if cfg is not None:
        return f"--config {args.dpe_config}", cfg
    if name and name in calibrated_presets():
        return f"preset {name!r}", DPEConfig.from_preset(name)
    return None, None


def _check_calibrated_length(args, name: Optional[str], cfg, length: int):
    what, c = _calibrated_config(args, name, cfg)
    if c is not None and c.exceeds_calibration(length) and not args.allow_longer:
        raise CLIError(f"{what} was calibrated for {c.calibrated_length} tokens, not {length}: its scales were "
                       f"not chosen for this length; calibrate for it (`dpe detect --target-length {length}`) or "
                       f"pass --allow-longer to use it anyway")


def _demo_preset(args) -> str:
    """--preset, else the demo's calibrated SmolLM2 preset when it covers --length, else auto."""
    if args.dpe_preset is not None:
        return args.dpe_preset
    from ..config import DPEConfig

    smol = str(args.model).lower() in ("smollm2", "smollm2-135m-instruct")
    name = demo_preset()
    if smol and name is not None:
        if not DPEConfig.from_preset(name).exceeds_calibration(args.length):
            return name
        print(f"note: preset {name!r} was calibrated for "
              f"{DPEConfig.from_preset(name).calibrated_length} tokens; at {args.length} the demo uses "
              "the starting scales (--preset auto)", flush=True)
    return "auto"


def validate_demo(args):
    args.config_obj = _read_config(args)
    args.mask_obj = _read_mask(args)
    if "dpe" in args.methods:
        args.dpe_preset = _demo_preset(args)
        _check_calibrated_length(args, args.dpe_preset, args.config_obj, args.length)


def validate_eval(args):
    from .eval.runner import parse_depths

    out_dir = Path(args.out_dir)
    args.jsonl_path = Path(args.jsonl) if args.jsonl else out_dir / "results.jsonl"
    args.table_path = Path(args.table) if args.table else out_dir / "summary.md"
    notes = args.notes
    if notes.startswith("@"):
        f = Path(notes[1:]).expanduser()
        if not f.is_file():
            raise CLIError(f"--notes {notes!r}: no such file {str(f)!r}")
        notes = f.read_text()
    args.notes_text = notes
    if args.report_only:
        if not args.jsonl_path.is_file():
            raise CLIError(f"--report-only: no records file {str(args.jsonl_path)!r}")
        return
    try:
        args.depth_values = parse_depths(args.depths)
    except ValueError as e:
        raise CLIError(f"--depths {' '.join(args.depths)}: {e}") from None
    args.config_obj = _read_config(args)
    args.mask_obj = _read_mask(args)
    if "dpe" in args.methods:
        _check_calibrated_length(args, args.dpe_preset, args.config_obj, max(args.lengths))
    if args.needles is not None and (args.task == "ppl" or args.scoring != "logprob"):
        raise CLIError(f"--needles applies to --task passkey / niah with --scoring logprob (got --task {args.task}, "
                       f"--scoring {args.scoring})")


def validate_select_dims(args):
    out = Path(args.out)
    if out.exists() and out.is_dir():
        raise CLIError(f"--out {args.out!r} is a directory")


def validate_detect(args):
    args.mask_obj = _read_mask(args)
    if Path(args.out).is_dir():
        raise CLIError(f"--out {args.out!r} is a directory")
    if args.train_length and args.target_length <= args.train_length:
        raise CLIError(f"--target-length {args.target_length} is not beyond --train-length {args.train_length}: "
                       "nothing to extend")
    if args.needles is not None and not args.scorer.endswith("-logprob"):
        raise CLIError(f"--needles applies to the -logprob scorers, got --scorer {args.scorer}")


def validate_bench(args):
    pass  # the benchmark checks its own arguments; its errors are one line too (see cmd_bench)


def validate_export_hf(args):
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {args.out!r} exists and is not a directory")
    if str(args.model).lower() == "tiny-random-llama":
        raise CLIError("--model tiny-random-llama has a byte tokenizer that is not a Hugging Face tokenizer; "
                       "export smollm2, a .gguf file or an HF directory")


# --------------------------------------------------------------------------- helpers
def _setup(args):
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ["HF_HUB_OFFLINE"] = "1"


def _load(args):
    import torch

    from . import models

    t0 = time.perf_counter()
    try:
        model, tok = models.load_model(args.model, dtype=getattr(torch, args.dtype))
    except models.ModelNotAvailableError as e:
        raise CLIError(str(e)) from None
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    print(f"loaded {args.model} ({args.dtype}, {device}) in {time.perf_counter() - t0:.1f} s", flush=True)
    return model, tok


def _model_pairs(model) -> int:
    from .eval.methods import model_inv_freq

    return int(model_inv_freq(model).shape[0])


def _check_against_model(model, cfg, mask):
    """The config's pairs and the mask's shape against the loaded model (before anything runs)."""
    from ..integrations.hf import find_attention_modules

    P = _model_pairs(model)
    if cfg is not None and cfg.num_pairs != P:
        raise CLIError(f"--config covers {cfg.num_pairs} pairs, the model rotates {P}")
    if mask is not None:
        layers = len(find_attention_modules(model))
        if mask.shape[0] != layers or mask.shape[-1] != P:
            raise CLIError(f"--mask has shape {list(mask.shape)}, the model has {layers} layers and {P} pairs")


def _check_prompt_length(tok, task: str, length: int, fmt: str, haystack: Optional[str]):
    """A retrieval prompt of ``length`` tokens fits its fixed text (known once the tokenizer is loaded)."""
    from .eval.niah import niah_prompt, niah_sample
    from .eval.passkey import passkey_key, passkey_prompt

    try:
        if task == "passkey":
            passkey_prompt(tok, length, 0.5, passkey_key(0), fmt, haystack or "filler")
        elif task == "niah":
            key, values = niah_sample(0)
            niah_prompt(tok, length, 0.5, key, values, fmt, haystack or "essays")
    except ValueError as e:
        raise CLIError(f"length {length}: {e}") from None


# --------------------------------------------------------------------------- commands
def cmd_demo(args) -> int:
    _setup(args)
    t_start = time.perf_counter()
    from .eval import methods as M
    from .eval.generate import greedy_generate
    from .eval.passkey import PASSKEY_MAX_NEW_TOKENS, passkey_key, passkey_prompt, passkey_stop, score_passkey
    from .models import sdpa_without_native_gqa, train_length

    model, tok = _load(args)
    _check_against_model(model, args.config_obj, args.mask_obj)
    _check_prompt_length(tok, "passkey", args.length, args.fmt, None)
    T = train_length(model)
    key = passkey_key(args.key_index)
    prompt = passkey_prompt(tok, args.length, args.depth, key, args.fmt)
    print(f"passkey demo: {len(prompt)} prompt tokens ({len(prompt) / T:.1f}x the {T}-token pre-training "
          f"length), key {key} at depth {args.depth:.0%} (token {prompt.needle_positions[0]}), "
          f"format {args.fmt}", flush=True)
    results = []
    for name in args.methods:
        kw = M.method_kwargs(model, name, args.length, T, target_length=args.target_length,
                             dpe_preset=args.dpe_preset or "auto", dpe_config=args.config_obj,
                             dpe_mask=args.mask_obj)
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
    from .eval.runner import EvalSpec, read_records, run_eval

    jsonl, table = args.jsonl_path, args.table_path
    if not args.report_only:
        _setup(args)
        spec = EvalSpec(task=args.task, methods=args.methods, lengths=args.lengths, depths=args.depth_values,
                        samples=args.samples, fmt=args.fmt, haystack=args.haystack, model_name=args.model,
                        train_length=args.train_length, target_length=args.target_length,
                        dpe_preset=args.dpe_preset or "auto", dpe_config=args.config_obj, dpe_mask=args.mask_obj,
                        skip_zero=args.skip_zero, seed=args.seed, bucket=args.bucket, scoring=args.scoring,
                        needles=args.needles)
        model, tok = _load(args)
        if "dpe" in args.methods:
            _check_against_model(model, args.config_obj, args.mask_obj)
        _check_prompt_length(tok, args.task, min(args.lengths), args.fmt, args.haystack)
        from .models import sdpa_without_native_gqa

        with sdpa_without_native_gqa(model):
            run_eval(model, tok, spec, jsonl, progress=args.progress)
    records = read_records(jsonl)
    if not records:
        raise CLIError(f"no records in {str(jsonl)!r}")
    files = write_report(records, table, None if args.no_plots else Path(args.out_dir), title=args.title,
                         notes=args.notes_text)
    for f in files:
        print(f"wrote {f}")
    return 0


@contextlib.contextmanager
def _one_line_argparse_errors(which: str):
    """While benchmark ``which`` parses its arguments, argparse errors are one
    ``dpe bench: error: WHICH: ...`` line.

    The benchmarks build their own ArgumentParser (they also run as scripts); patching the class
    for the duration of the call is the one place that reaches them without changing them."""
    original = argparse.ArgumentParser.error

    def error(self, message):
        self.exit(2, f"dpe bench: error: {which}: {message} (see `dpe bench {which} -- --help`)\n")
    argparse.ArgumentParser.error = error
    try:
        yield
    finally:
        argparse.ArgumentParser.error = original


def cmd_bench(args) -> int:
    import importlib

    bench = importlib.import_module(f"{__package__}.benchmarks.{args.which}")
    argv = list(args.args)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    try:
        with _one_line_argparse_errors(args.which):
            return int(bench.main(argv) or 0)
    except SystemExit as e:  # argparse inside the benchmark (--help, a bad argument) or sys.exit("message")
        if isinstance(e.code, str):
            raise CLIError(e.code) from None
        if e.code:
            raise  # its one-line argparse error is printed: exit 2 like every other subcommand
        return 0


def cmd_select_dims(args) -> int:
    from .calibrate import default_top_k, select_dims

    _setup(args)
    model, tok = _load(args)
    P = _model_pairs(model)
    if args.top_k is not None and args.top_k > P:
        raise CLIError(f"--top-k {args.top_k} is more than the model's {P} pairs")
    t0 = time.perf_counter()
    res = select_dims(model, tok, lengths=args.lengths, samples=args.samples, top_k=args.top_k or default_top_k(P),
                      out=args.out, layout=args.layout, progress=args.progress)
    L, hq, P = res["scores"].shape
    print(f"wrote {args.out}: scores [{L}, {hq}, {P}], top-{int(res['mask'][0, 0].sum())} masks per query head "
          f"and per KV head ({time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_detect(args) -> int:
    import json

    from .calibrate import detect
    from .models import sdpa_without_native_gqa, train_length

    _setup(args)
    model, tok = _load(args)
    P = _model_pairs(model)
    if P % args.groups:
        raise CLIError(f"--groups {args.groups}: the model's {P} pairs do not split into {args.groups} equal groups")
    _check_against_model(model, None, args.mask_obj)
    T = args.train_length or train_length(model)
    if args.target_length <= T:
        raise CLIError(f"--target-length {args.target_length} is not beyond the pre-training length {T}: "
                       "nothing to extend")
    if args.scorer != "ppl":
        _check_prompt_length(tok, args.scorer.split("-")[0], args.target_length, "raw", None)
    jsonl = args.jsonl or str(Path(args.out).with_suffix(".jsonl"))
    with sdpa_without_native_gqa(model):
        res = detect(model, tok, target_length=args.target_length, train_length=T, scales=args.scales,
                     scorer=args.scorer, samples=args.samples, fresh_samples=args.fresh_samples,
                     max_passes=args.max_passes, window=args.window, num_groups=args.groups, mask=args.mask_obj,
                     jsonl=jsonl, progress=args.progress, seed=args.seed, worker=args.worker,
                     needles=args.needles)
    if res is None:  # a worker: the main process writes the configuration
        print(f"detect worker: done; records in {jsonl}")
        return 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    res.config.to_json(out)
    trace = out.with_suffix(".trace.json")
    trace.write_text(json.dumps(res.trace, indent=1) + "\n")
    print(f"wrote {out} (scales {list(res.config.scales)}, window {res.config.window}, calibrated for "
          f"{res.config.calibrated_length} tokens{', mask ' + args.dpe_mask if args.dpe_mask else ''}) and {trace}; "
          f"{len(res.records)} records in {jsonl}")
    if args.ship_to:
        try:
            _export_hf().ship_dpe(args.ship_to, res.config, args.target_length, train_length=T)
        except ValueError as e:
            raise CLIError(f"--ship-to: {e}") from None
        print(f"switched DPE on in {args.ship_to}/config.json (target {args.target_length})")
    return 0


def cmd_export_hf(args) -> int:
    return int(_export_hf().run(args, prog="dpe export-hf"))


def validate_parity(args):
    try:
        _parity().validate(args)
    except ValueError as e:
        raise CLIError(str(e)) from None


def cmd_parity(args) -> int:
    return int(_parity().run(args, prog="dpe parity"))


COMMANDS = {"demo": cmd_demo, "eval": cmd_eval, "bench": cmd_bench, "select-dims": cmd_select_dims,
            "detect": cmd_detect, "export-hf": cmd_export_hf, "parity": cmd_parity}
VALIDATORS = {"demo": validate_demo, "eval": validate_eval, "bench": validate_bench,
              "select-dims": validate_select_dims, "detect": validate_detect, "export-hf": validate_export_hf,
              "parity": validate_parity}
SUBCOMMANDS = tuple(COMMANDS)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    sub = args.command_parser
    try:
        VALIDATORS[args.command](args)  # everything that needs no model, before any is loaded
        return COMMANDS[args.command](args)
    except CLIError as e:
        sub.error(str(e))


if __name__ == "__main__":
    sys.exit(main())
