"""Hypothesis fuzz: random shapes, strides, positions and configs, every
compiled backend against the float64 oracle (tolerance rule in conftest)."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import DEVICE, assert_rope_close, compiled_backends, llama_inv_freq
from dpe_kernels import DPEConfig, dpe_rope


@st.composite
def rope_case(draw):
    hk = draw(st.integers(1, 4))
    hq = hk * draw(st.integers(1, 4))
    d = 2 * draw(st.integers(1, 40))
    rotary_dim = 2 * draw(st.integers(1, d // 2))
    npairs = rotary_dim // 2
    ngroups = draw(st.integers(1, min(npairs, 8)))
    inner = sorted(draw(st.sets(st.integers(1, npairs - 1), min_size=ngroups - 1, max_size=ngroups - 1))) \
        if npairs > 1 else []
    bounds = (0, *inner, npairs)
    scales = tuple(draw(st.lists(st.integers(1, 200), min_size=len(bounds) - 1, max_size=len(bounds) - 1)))
    window = draw(st.integers(1, 5000))
    batched = draw(st.booleans())
    b = draw(st.integers(1, 3)) if batched else None
    s = draw(st.integers(0, 9))
    max_pos = draw(st.sampled_from([16, 5000, 2**20, 2**24, 2**28]))
    return dict(
        hq=hq, hk=hk, d=d, rotary_dim=rotary_dim, bounds=bounds, scales=scales, window=window,
        b=b, s=s, max_pos=max_pos,
        packed_qkv=draw(st.booleans()),
        pos_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
        dtype=draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16])),
        layout=draw(st.sampled_from(["neox", "gptj"])),
        mask_kind=draw(st.sampled_from([None, "per_q", "per_kv"])),
        base=draw(st.sampled_from([10000.0, 500000.0])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def build(case):
    g = torch.Generator().manual_seed(case["seed"])
    hq, hk, d = case["hq"], case["hk"], case["d"]
    lead = (case["s"],) if case["b"] is None else (case["b"], case["s"])
    if case["packed_qkv"]:  # q, k as strided views of one (..., H_q + 2 H_k, D) buffer
        qkv = torch.randn(*lead, hq + 2 * hk, d, generator=g)
        q, k = qkv[..., :hq, :], qkv[..., hq:hq + hk, :]
    else:
        q, k = torch.randn(*lead, hq, d, generator=g), torch.randn(*lead, hk, d, generator=g)
    q, k = q.to(DEVICE, case["dtype"]), k.to(DEVICE, case["dtype"])
    pos_shape = lead
    pos = torch.randint(0, case["max_pos"], pos_shape, generator=g).to(DEVICE, case["pos_dtype"])
    cfg = DPEConfig(case["window"], case["bounds"], case["scales"])
    mask = None
    if case["mask_kind"]:
        rows = hq if case["mask_kind"] == "per_q" else hk
        mask = (torch.rand(rows, case["rotary_dim"] // 2, generator=g) > 0.4).to(DEVICE)
    inv = llama_inv_freq(case["rotary_dim"], base=case["base"])
    return q, k, pos, inv, cfg, mask


@pytest.mark.parametrize("backend", compiled_backends())
def test_fuzz_against_oracle(backend):
    examples = 60 if backend != "triton" or DEVICE == "cuda" else 25  # the interpreter is slow

    @settings(max_examples=examples, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(rope_case())
    def check(case):
        q, k, pos, inv, cfg, mask = build(case)
        out = dpe_rope(q, k, pos, inv, cfg, mask, layout=case["layout"], rotary_dim=case["rotary_dim"],
                       backend=backend, check_inputs=case["max_pos"] <= (1 << 24))
        assert_rope_close(out, q, k, pos, inv, cfg, mask, case["layout"], case["rotary_dim"])

    check()
