"""Teacher-forced answer log-probabilities (dpe_kernels.tools.eval.logprob) against an independent full
forward of the model, and the exact match against greedy decoding, with and without DPE."""
import pytest
import torch

pytest.importorskip("transformers")

from dpe_kernels import DPEConfig  # noqa: E402
from dpe_kernels.integrations.hf import apply_dpe  # noqa: E402
from dpe_kernels.tools.eval import logprob as LP  # noqa: E402
from dpe_kernels.tools.eval.generate import greedy_generate  # noqa: E402
from dpe_kernels.tools.eval.niah import niah_sample  # noqa: E402
from dpe_kernels.tools.eval.passkey import passkey_key  # noqa: E402
from dpe_kernels.tools.models import tiny_random_llama  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    return tiny_random_llama(layers=2)


def _full_logprobs(model, ids):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].double()
    return torch.log_softmax(logits, -1)


@pytest.mark.parametrize("dpe", [False, True], ids=["rope", "dpe"])
def test_matches_full_forward_and_greedy_decoding(tiny, dpe):
    model, tok = tiny
    prompt = torch.randint(3, 250, (1, 200), generator=torch.Generator().manual_seed(1))[0].tolist()
    handle = apply_dpe(model, DPEConfig.uniform(32, [1, 2, 4, 8], 8)) if dpe else None
    try:
        _, greedy, _ = greedy_generate(model, tok, torch.tensor([prompt]), 6)  # decoding through the cache
        lp, am = LP.answer_logprobs(model, prompt, greedy)
        ref = _full_logprobs(model, prompt + greedy)
        other = [t + 1 for t in greedy]
        lp_o, am_o = LP.answer_logprobs(model, prompt, other)
        ref_o = _full_logprobs(model, prompt + other)
    finally:
        if handle:
            handle.remove()
    assert lp.dtype == torch.float32 and lp.shape == (6,)
    # teacher forcing the greedy answer: the argmax is the answer at every position
    assert am.tolist() == greedy
    torch.testing.assert_close(lp.double(), torch.stack([ref[199 + j, t] for j, t in enumerate(greedy)]),
                               atol=1e-4, rtol=0)
    # another answer: its own log-probs, and the argmax where it differs is not the answer
    torch.testing.assert_close(lp_o.double(), torch.stack([ref_o[199 + j, t] for j, t in enumerate(other)]),
                               atol=1e-4, rtol=0)
    assert am_o[0].item() == greedy[0] != other[0]


def test_passkey_and_niah_records(tiny):
    model, tok = tiny
    key = passkey_key(2)
    r = LP.passkey_logprob(model, tok, 400, 0.5, key)
    ids, spans = LP.passkey_answer(tok, key)
    assert r["answer_tokens"] == ids == tok.encode(f" {key}", add_special_tokens=False) and spans == [(0, len(ids))]
    assert r["logprob"] == pytest.approx(sum(r["token_logprobs"]), abs=1e-4) and r["logprob"] < 0
    assert r["score"] == float(r["token_argmax"] == r["answer_tokens"]) and r["prompt_tokens"] == 400
    nkey, values = niah_sample(0)
    n = LP.niah_logprob(model, tok, 1200, 0.5, nkey, values)
    ids, spans = LP.niah_answer(tok, values)
    assert tok.decode(ids) == " " + ", ".join(values)
    assert [tok.decode(ids[a:b]) for a, b in spans] == [f" {v}" for v in values]  # separators not scored
    assert n["span_logprobs"] == pytest.approx([sum(n["token_logprobs"][a:b]) for a, b in spans], abs=1e-4)
    assert n["logprob"] == pytest.approx(sum(n["span_logprobs"]) / 4)
    assert n["score"] == sum(n["span_exact"]) / 4 and len(n["needle_positions"]) == 4


def test_bad_input(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="non-empty"):
        LP.answer_logprobs(model, [1, 2], [])
    with pytest.raises(ValueError, match="non-empty"):
        LP.answer_logprobs(model, [], [1])
