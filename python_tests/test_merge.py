"""dpe_kernels/merge.py: merge_attention against one softmax split into parts, empty rows,
bad input; the lse adapters (FA2, FA3, FlashInfer conventions) and their output fed to the merge."""
import math

import pytest
import torch

from dpe_kernels import (
    lse_from_flash_attn2,
    lse_from_flash_attn3,
    lse_from_flashinfer,
    merge_attention,
)

NEG_INF = float("-inf")


def _softmax_part(logits, v):
    lse = torch.logsumexp(logits, -1)
    p = torch.exp(logits - torch.where(lse == NEG_INF, 0.0, lse)[..., None])
    return (p[..., None] * v).sum(-2), lse


def test_merge_equals_single_softmax():
    """Split the keys of one softmax into disjoint parts: merging the parts in
    any order gives the single softmax."""
    logits = torch.randn(5, 3, 40, dtype=torch.float64) * 3
    v = torch.randn(5, 3, 40, 8, dtype=torch.float64)
    ref_o, ref_l = _softmax_part(logits, v)
    cuts = [(0, 7), (7, 30), (30, 40)]
    parts = [_softmax_part(logits[..., a:b], v[..., a:b, :]) for a, b in cuts]
    parts = [(o.float(), l.float()) for o, l in parts]
    ab = merge_attention(*parts[0], *parts[1])
    o1, l1 = merge_attention(*ab, *parts[2])
    bc = merge_attention(*parts[1], *parts[2])
    o2, l2 = merge_attention(*parts[0], *bc)
    for o, l in ((o1, l1), (o2, l2)):
        assert l.dtype == torch.float32 and o.dtype == torch.float32
        assert torch.allclose(o.double(), ref_o, atol=1e-5)
        assert torch.allclose(l.double(), ref_l, atol=1e-5)


def test_merge_empty_rows():
    o_a = torch.randn(4, 2, 8, dtype=torch.bfloat16)
    l_a = torch.randn(4, 2)
    o_b = torch.randn(4, 2, 8, dtype=torch.bfloat16)
    l_b = torch.randn(4, 2)
    l_b[0] = NEG_INF  # row 0: b empty
    o_b[0] = 0
    l_a[1] = NEG_INF  # row 1: a empty
    o_a[1] = 0
    l_a[2] = NEG_INF  # row 2: both empty
    l_b[2] = NEG_INF
    o_a[2] = 0
    o_b[2] = 0
    o, l = merge_attention(o_a, l_a, o_b, l_b)
    assert o.dtype == torch.bfloat16 and l.dtype == torch.float32
    assert not o.isnan().any() and not l.isnan().any()
    assert torch.equal(o[0], o_a[0]) and torch.equal(l[0], l_a[0])  # exactly the other pass
    assert torch.equal(o[1], o_b[1]) and torch.equal(l[1], l_b[1])
    assert (o[2] == 0).all() and (l[2] == NEG_INF).all()
    # both parts at very different scales: still finite, weights sum to one
    o, l = merge_attention(o_a[3:], torch.full((1, 2), 500.0), o_b[3:], torch.full((1, 2), -500.0))
    assert torch.equal(o, o_a[3:]) and torch.allclose(l, torch.full((1, 2), 500.0))


def test_merge_bad_input():
    o, l = torch.randn(3, 2, 4), torch.randn(3, 2)
    with pytest.raises(ValueError, match="out_b"):
        merge_attention(o, l, o[:2], l)
    with pytest.raises(ValueError, match="lse_a"):
        merge_attention(o, l[:, :1], o, l)
    with pytest.raises(TypeError, match="lse_b"):
        merge_attention(o, l, o, l.long())
    with pytest.raises(TypeError, match="out_a"):
        merge_attention(None, l, o, l)


def test_lse_from_flash_attn2():
    lse = torch.randn(2, 3, 5)  # [B, H, S]
    lse[0, 1, 2] = float("inf")  # FA2: row without keys
    got = lse_from_flash_attn2(lse)
    assert got.shape == (2, 5, 3) and got.dtype == torch.float32 and got.is_contiguous()
    assert got[0, 2, 1] == NEG_INF
    fin = torch.ones_like(got, dtype=torch.bool)
    fin[0, 2, 1] = False
    assert torch.equal(got[fin], lse.transpose(1, 2)[fin])
    varlen = torch.randn(4, 7)  # [H, T]
    assert torch.equal(lse_from_flash_attn2(varlen), varlen.T)
    assert lse[0, 1, 2] == float("inf"), "the input was modified"


def test_lse_from_flash_attn3():
    lse = torch.randn(2, 3, 5)
    lse[1, 0, 4] = NEG_INF  # FA3: row without keys
    got = lse_from_flash_attn3(lse)
    assert got.shape == (2, 5, 3) and torch.equal(got, lse.transpose(1, 2))
    assert got[1, 4, 0] == NEG_INF


def test_lse_from_flashinfer():
    nat = torch.randn(6, 4)  # [T, H], natural log
    nat[2, 1] = NEG_INF
    base2 = nat / math.log(2.0)
    got = lse_from_flashinfer(base2)
    assert got.shape == (6, 4) and got.dtype == torch.float32
    assert got[2, 1] == NEG_INF
    assert torch.allclose(got, nat, atol=1e-6)
    assert torch.allclose(lse_from_flashinfer(base2.half()), nat, atol=1e-2)


def test_adapters_feed_merge():
    """Two FA2-convention partial results (one with an empty row), converted and merged."""
    logits = torch.randn(1, 2, 3, 10, dtype=torch.float64)  # [B, H, S, keys]
    v = torch.randn(1, 2, 3, 10, 4, dtype=torch.float64)
    logits[0, :, 0, :6] = NEG_INF  # query 0 has no key in the first part
    ref_o, ref_l = _softmax_part(logits, v)
    (o1, l1), (o2, l2) = _softmax_part(logits[..., :6], v[..., :6, :]), _softmax_part(logits[..., 6:], v[..., 6:, :])
    fa2 = lambda l: torch.where(l == NEG_INF, float("inf"), l).float()  # noqa: E731
    o, l = merge_attention(o1.transpose(1, 2).float(), lse_from_flash_attn2(fa2(l1)),
                           o2.transpose(1, 2).float(), lse_from_flash_attn2(fa2(l2)))
    assert torch.allclose(o.double(), ref_o.transpose(1, 2), atol=1e-5)
    assert torch.allclose(l.double(), ref_l.transpose(1, 2), atol=1e-5)


def test_adapters_bad_input():
    for f in (lse_from_flash_attn2, lse_from_flash_attn3, lse_from_flashinfer):
        with pytest.raises(TypeError, match="lse"):
            f([1.0])
        with pytest.raises(TypeError, match="lse"):
            f(torch.zeros(2, 3, dtype=torch.int64))
    for f in (lse_from_flash_attn2, lse_from_flash_attn3):
        with pytest.raises(ValueError, match="lse"):
            f(torch.zeros(3))
