"""The ``dpe`` argument parser: every subcommand's options, each value checked as it is parsed
(``type=`` validators: a bad value is one line ``dpe SUB: error: ...``, exit 2). What runs is in
:mod:`.commands`; :func:`dpe_kernels.tools.cli.main` joins the two."""
from __future__ import annotations

import argparse
from pathlib import Path

from ...utils import DTYPE_NAMES

__all__ = ["build_parser", "SUBCOMMANDS", "DEMO_PRESETS"]

# The subcommands, in the order `dpe --help` lists them (commands.COMMANDS runs each).
SUBCOMMANDS = ("demo", "eval", "bench", "select-dims", "detect", "export-hf", "parity")

# The calibrated SmolLM2 presets the demo prefers, first shipped wins (used only up to the length
# each was calibrated for): the issue-12 16K calibration once it is shipped, else the first one.
DEMO_PRESETS = ("smollm2-135m-16k", "smollm2-135m")


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
    from ..eval.multi import MAX_NEEDLES

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
    from ...config import preset_names

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
    from ..models import MODELS

    if text.lower() in MODELS:
        return text
    p = Path(text).expanduser()
    if (p.is_file() and p.suffix == ".gguf") or p.is_dir():
        return text  # the loader checks the directory's contents and says what is missing
    raise argparse.ArgumentTypeError(f"unknown model {text!r}: use one of {', '.join(sorted(MODELS))}, a local "
                                     f"Hugging Face model directory or a .gguf file (nothing is downloaded)")


def _bench_names():
    import pkgutil

    from .. import benchmarks

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
    from ...config import PAPER_PRESETS, calibrated_presets

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
    from ..calibrate import SCORERS
    from ..eval.methods import METHODS
    from ..eval.multi import MAX_NEEDLES
    from ..eval.runner import DEFAULT_FORMAT, SCORINGS, TASKS

    parser = _Parser(prog="dpe", description="DPE: training-free long-context extension for RoPE models "
                                             "(demo, eval, bench, calibration, export).")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
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
                       description="Run a benchmark of dpe_kernels/tools/benchmarks/ (also `python -m "
                                   "dpe_kernels.tools.benchmarks.NAME`). Arguments after the name go to the benchmark, e.g. `dpe bench "
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
    from .. import export_hf

    return export_hf


def _parity():
    from .. import parity

    return parity
