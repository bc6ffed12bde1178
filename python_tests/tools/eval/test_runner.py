"""dpe_kernels/tools/eval/runner.py: the evaluation loop end to end on a tiny random Llama:
records, resume after an interruption, multi-needle contexts, skip-after-zero, niah / ppl tasks,
teacher-forced scoring, depth parsing."""
import json

import pytest

pytest.importorskip("transformers")

from dpe_kernels.tools import models  # noqa: E402
from dpe_kernels.tools.eval import runner as R  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    return models.tiny_random_llama(seed=0)


def test_parse_depths():
    assert R.parse_depths(["5"]) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert R.parse_depths(["1"]) == [0.5]
    assert R.parse_depths(["0.1", "0.9"]) == [0.1, 0.9]
    with pytest.raises(ValueError):
        R.parse_depths(["1.5", "0.2"])


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
