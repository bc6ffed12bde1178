"""backends/attention_flash.py against the fake ``flash_attn`` (fakes/flash_attn.py): the
fake itself, the two passes the backend makes, what it refuses. Its parity with the float64
oracle runs in test_attention.py (the ``flash`` backend parameter)."""
import pytest
import torch

from conftest import make_attention_inputs as make, run_attention as run
from fakes.flash_attn import make_fake_flash_attn


def test_fake_flash_attn_is_fa2():
    """The double itself: bottom-right causal, window_size, +inf for empty rows."""
    fa = make_fake_flash_attn([])
    q = torch.randn(1, 2, 1, 4, dtype=torch.bfloat16)
    k = torch.randn(1, 5, 1, 4, dtype=torch.bfloat16)
    o, lse, _ = fa.flash_attn_func(q, k, k, causal=True, return_attn_probs=True)
    s = (q[0, :, 0].double() @ k[0, :, 0].double().T) / 2  # [2 queries, 5 keys], scale 1/sqrt(4)
    want = torch.stack([torch.logsumexp(s[0, :4], -1), torch.logsumexp(s[1, :5], -1)]).float()
    assert torch.allclose(lse[0, 0], want)  # query j sits at position 5 - 2 + j
    o, lse, _ = fa.flash_attn_func(q, k[:, :1], k[:, :1], causal=True, return_attn_probs=True)
    assert lse[0, 0, 0] == float("inf") and (o[0, 0] == 0).all()  # query 0 sits before key 0
    o, lse, _ = fa.flash_attn_func(q, k, k, causal=True, window_size=(1, 0), return_attn_probs=True)
    assert torch.allclose(lse[0, 0, 1], torch.logsumexp(s[1, 3:5], -1).float())


def test_flash_backend_orchestration(fake_flash):
    """The flash backend makes a window_size=(w-1, 0) pass and a plain causal pass."""
    ins = make(1, 30, 30, 4, 2, 16, torch.bfloat16)
    run(ins, 8, "flash")
    assert ("func", True, (7, 0)) in fake_flash and ("func", True, (-1, -1)) in fake_flash
    fake_flash.clear()
    run(make(1, 5, 5, 4, 2, 16, torch.bfloat16), 8, "flash")  # S <= w: one pass
    assert fake_flash == [("func", True, (7, 0))]


def test_flash_backend_rejects(fake_flash):
    with pytest.raises(ValueError, match="backend='flash'"):
        run(make(1, 5, 5, 2, 2, 16, torch.float32), 3, "flash")
    with pytest.raises(ValueError, match="backend='flash'"):
        run(make(1, 5, 5, 2, 2, 16, torch.bfloat16, dv=8), 3, "flash")
