"""dpe_kernels/tools/eval/perplexity.py: loss by position equals Hugging Face's loss; buckets;
the perplexity text samples."""
import math

import pytest
import torch

pytest.importorskip("transformers")

from dpe_kernels.tools import models  # noqa: E402
from dpe_kernels.tools.eval.perplexity import bucket_means, loss_by_position, ppl_tokens  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    return models.tiny_random_llama(seed=0)


@pytest.fixture(scope="module")
def tok():
    return models.ByteTokenizer()


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
