"""The ``dpe`` subcommands: each one's validation (everything that needs no model, run before any
model loads), then the command itself. Arguments come from :mod:`.parser`."""
from __future__ import annotations

import argparse
import contextlib
import os
import time
from pathlib import Path
from typing import Optional

from .parser import DEMO_PRESETS, SUBCOMMANDS

__all__ = ["COMMANDS", "VALIDATORS", "CLIError", "demo_preset"]


class CLIError(Exception):
    """A bad argument found after parsing; :func:`main` prints it as ``dpe SUB: error: ...``, exit 2."""


def demo_preset() -> Optional[str]:
    """The demo's default calibrated preset for SmolLM2 (the first of DEMO_PRESETS that is shipped)."""
    from ...config import calibrated_presets

    shipped = calibrated_presets()
    return next((p for p in DEMO_PRESETS if p in shipped), None)


# --------------------------------------------------------------------------- validation (before any model loads)
def _read_config(args):
    """The --config file as a DPEConfig (parsed in the validation step), or None."""
    if not getattr(args, "dpe_config", None):
        return None
    from ...config import DPEConfig

    try:
        return DPEConfig.from_json(Path(args.dpe_config).expanduser())
    except (OSError, ValueError, TypeError) as e:
        raise CLIError(f"--config {args.dpe_config!r} is not a DPEConfig JSON file: {e}") from None


def _read_mask(args):
    """The --mask FILE[:q|kv] of a `dpe select-dims` file, or None."""
    if not getattr(args, "dpe_mask", None):
        return None
    from ..calibrate import load_dims_mask

    path, _, which = args.dpe_mask.partition(":")
    try:
        return load_dims_mask(Path(path).expanduser(), which or "q")
    except Exception as e:  # safetensors raises its own error types for a file that is not one
        raise CLIError(f"--mask {args.dpe_mask!r}: not a `dpe select-dims` file ({e})") from None


def _calibrated_config(args, name: Optional[str], cfg):
    """(what, config) whose calibrated length limits the lengths, or (None, None)."""
    from ...config import DPEConfig, calibrated_presets

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
    from ...config import DPEConfig

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
    from ..eval.runner import parse_depths

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

    from .. import models

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
    from ..eval.methods import model_inv_freq

    return int(model_inv_freq(model).shape[0])


def _check_against_model(model, cfg, mask):
    """The config's pairs and the mask's shape against the loaded model (before anything runs)."""
    from ...integrations.hf import find_attention_modules

    P = _model_pairs(model)
    if cfg is not None and cfg.num_pairs != P:
        raise CLIError(f"--config covers {cfg.num_pairs} pairs, the model rotates {P}")
    if mask is not None:
        layers = len(find_attention_modules(model))
        if mask.shape[0] != layers or mask.shape[-1] != P:
            raise CLIError(f"--mask has shape {list(mask.shape)}, the model has {layers} layers and {P} pairs")


def _check_prompt_length(tok, task: str, length: int, fmt: str, haystack: Optional[str]):
    """A retrieval prompt of ``length`` tokens fits its fixed text (known once the tokenizer is loaded)."""
    from ..eval.niah import niah_prompt, niah_sample
    from ..eval.passkey import passkey_key, passkey_prompt

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
    from ..eval import methods as M
    from ..eval.generate import greedy_generate
    from ..eval.passkey import PASSKEY_MAX_NEW_TOKENS, passkey_key, passkey_prompt, passkey_stop, score_passkey
    from ...integrations.hf import train_length
    from ..models import sdpa_without_native_gqa

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
    from ..eval.report import write_report
    from ..eval.runner import EvalSpec, read_records, run_eval

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
        from ..models import sdpa_without_native_gqa

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

    from .. import benchmarks

    bench = importlib.import_module(f"{benchmarks.__name__}.{args.which}")
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
    from ..calibrate import default_top_k, select_dims

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

    from ..calibrate import detect
    from ...integrations.hf import train_length
    from ..models import sdpa_without_native_gqa

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
        from .. import export_hf

        try:
            export_hf.ship_dpe(args.ship_to, res.config, args.target_length, train_length=T)
        except ValueError as e:
            raise CLIError(f"--ship-to: {e}") from None
        print(f"switched DPE on in {args.ship_to}/config.json (target {args.target_length})")
    return 0


def cmd_export_hf(args) -> int:
    from .. import export_hf

    return int(export_hf.run(args, prog="dpe export-hf"))


def validate_parity(args):
    from .. import parity

    try:
        parity.validate(args)
    except ValueError as e:
        raise CLIError(str(e)) from None


def cmd_parity(args) -> int:
    from .. import parity

    return int(parity.run(args, prog="dpe parity"))


COMMANDS = {"demo": cmd_demo, "eval": cmd_eval, "bench": cmd_bench, "select-dims": cmd_select_dims,
            "detect": cmd_detect, "export-hf": cmd_export_hf, "parity": cmd_parity}
VALIDATORS = {"demo": validate_demo, "eval": validate_eval, "bench": validate_bench,
              "select-dims": validate_select_dims, "detect": validate_detect, "export-hf": validate_export_hf,
              "parity": validate_parity}
assert tuple(COMMANDS) == tuple(VALIDATORS) == SUBCOMMANDS
