"""Multi-needle scoring (dpe_kernels.tools.eval.multi): each question's answer log-probabilities
equal one full forward of context + that question + answer, for every method; prompts and samples."""
import pytest
import torch

pytest.importorskip("transformers")

from dpe_kernels import DPEConfig  # noqa: E402
from dpe_kernels.integrations.baselines import METHODS, apply_method  # noqa: E402
from dpe_kernels.tools.eval import multi as MN  # noqa: E402
from dpe_kernels.tools.models import tiny_random_llama  # noqa: E402

KW = {"rope": {}, "pi": dict(factor=4), "ntk": dict(factor=4),
      "yarn": dict(factor=4, original_max_position_embeddings=64),
      "self_extend": dict(group_size=4, window=32), "dpe": dict(config=DPEConfig.uniform(32, [1, 2, 4, 8], 8))}


@pytest.fixture(scope="module")
def tiny():
    return tiny_random_llama(layers=2, max_position_embeddings=64)


def _full(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float(), -1)


@pytest.mark.parametrize("method", METHODS)
def test_branch_equals_full_forward(tiny, method):
    """The branched score of every question equals the full forward of context + question + answer
    (float32: 1e-4 absolute on log-probabilities, the tolerance of the single-needle scorer)."""
    model, tok = tiny
    items = MN.multi_sample("passkey", 0, 3)
    ctx, branches = MN.multi_context(tok, "passkey", 600, 0.5, items)
    # random answers as well as the true ones: the argmax check must be able to fail
    branches = branches + [(branches[0][0], [7, 8, 9])]
    with apply_method(model, method, **KW[method]):
        got, _, _ = MN.score_branches(model, ctx.input_ids, branches)
        for (q, a), (lp, am) in zip(branches, got):
            ids = ctx.input_ids + list(q) + list(a)
            ref = _full(model, ids)
            start = len(ctx) + len(q) - 1  # the row predicting a[0]
            want = torch.stack([ref[start + j, t] for j, t in enumerate(a)])
            torch.testing.assert_close(lp, want, atol=1e-4, rtol=0)
            assert am.tolist() == ref[start:start + len(a)].argmax(-1).tolist()


def test_questions_do_not_see_each_other(tiny):
    """Scoring a question alone or after others gives the same numbers (the cache is cropped back)."""
    model, tok = tiny
    items = MN.multi_sample("niah", 1, 4)
    ctx, branches = MN.multi_context(tok, "niah", 700, 0.25, items)
    with apply_method(model, "dpe", config=DPEConfig.uniform(16, [1, 2, 4, 8], 8)):
        together, _, _ = MN.score_branches(model, ctx.input_ids, branches)
        alone, _, _ = MN.score_branches(model, ctx.input_ids, branches[2:3])
    torch.testing.assert_close(together[2][0], alone[0][0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("task", MN.MULTI_TASKS)
@pytest.mark.parametrize("fmt", ["raw", "chat"])
def test_context_layout(tiny, task, fmt):
    _, tok = tiny
    n = 5
    items = MN.multi_sample(task, 3, n, seed=2)
    assert len({lab for lab, _ in items}) == n and len({v for _, v in items}) == n
    assert all(len(v) == (5 if task == "passkey" else 7) for _, v in items)
    assert items == MN.multi_sample(task, 3, n, seed=2) != MN.multi_sample(task, 4, n, seed=2)
    ctx, branches = MN.multi_context(tok, task, 1500, 0.5, items, fmt)
    assert max(len(ctx) + len(q) for q, _ in branches) == 1500
    text = tok.decode(ctx.input_ids)
    pos = ctx.needle_positions
    assert pos == sorted(pos)  # needle j at depth (j + 0.5) / n: in order
    for j, (label, value) in enumerate(items):
        assert text.count(value) == 2 if task == "passkey" else text.count(value) == 1
        assert label in tok.decode(list(branches[j][0])) and tok.decode(list(branches[j][1])) == f" {value}"
        assert abs(pos[j] / len(ctx) - (j + 0.5) / n) < 0.12
        assert value in tok.decode(ctx.input_ids[pos[j]:pos[j] + 90])


def test_records(tiny):
    model, tok = tiny
    recs = MN.multi_logprob(model, tok, "passkey", 800, 0.5, 3, sample=0)
    assert [r["needle"] for r in recs] == [0, 1, 2] and all(r["needles"] == 3 for r in recs)
    for r in recs:
        assert r["logprob"] == pytest.approx(sum(r["token_logprobs"]), abs=1e-4) and r["logprob"] < 0
        assert r["score"] == float(r["token_argmax"] == r["answer_tokens"])
        assert r["prompt_tokens"] <= 800 and r["context_tokens"] < r["prompt_tokens"]


def test_series_context_covers_the_haystack():
    # one needle per context: sample 0 walks ten depths, then sample 1; ten or more needles: sample i at 0.5
    got = [MN.series_context(i, 1) for i in range(12)]
    assert [c[0] for c in got] == [0] * 10 + [1, 1]
    assert [c[1] for c in got] == pytest.approx([0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95, 0.05, 0.15])
    assert [MN.series_context(i, 10) for i in range(3)] == [(0, 0.5), (1, 0.5), (2, 0.5)] == \
        [MN.series_context(i, 24) for i in range(3)]
    for n in (1, 2, 3, 4, 7):  # N needles x the shifts: at least 10 distinct depths, evenly spaced
        m = MN.series_shifts(n)
        assert {MN.series_context(i, n)[0] for i in range(m)} == {0}
        depths = sorted((j + MN.series_context(i, n)[1]) / n for i in range(m) for j in range(n))
        assert len(depths) >= 10 and max(b - a for a, b in zip(depths, depths[1:])) == pytest.approx(1 / (n * m))
    with pytest.raises(ValueError, match="index"):
        MN.series_context(-1, 1)
    with pytest.raises(ValueError, match="needles"):
        MN.series_context(0, 0)


@pytest.mark.parametrize("bad", [0, 25, 2.0, True, "3"])
def test_bad_needles(tiny, bad):
    with pytest.raises(ValueError, match="needles"):
        MN.multi_sample("passkey", 0, bad)


def test_bad_task():
    with pytest.raises(ValueError, match="task"):
        MN.multi_sample("ppl", 0, 2)
