"""The baselines on Hugging Face models (dpe_kernels.integrations.baselines): every method applies
and removes cleanly; PI, NTK and YaRN equal transformers' own rope types; Self-Extend is one-group
DPE. The tiny random Llama / Qwen2 / Mistral models and their helpers are test_hf.py's."""
import pytest
import torch

pytest.importorskip("transformers")

from dpe_kernels import DPEConfig  # noqa: E402
from dpe_kernels.integrations.baselines import METHODS, apply_method  # noqa: E402
from dpe_kernels.integrations.hf import apply_dpe, get_handle  # noqa: E402
from test_hf import TIGHT, _cfg, _ids, _logits, _tiny, _twin, arch, model  # noqa: E402,F401  (fixtures too)


@pytest.mark.parametrize("name", METHODS)
def test_baseline_applies_and_removes(model, name):
    ids = _ids(1, 20)
    ref = _logits(model, ids)
    kw = {"pi": dict(factor=4), "ntk": dict(factor=4), "yarn": dict(factor=4, original_max_position_embeddings=16),
          "self_extend": dict(group_size=4, window=4), "dpe": dict(config=_cfg(4)), "rope": {}}[name]
    h = apply_method(model, name, **kw)
    assert h.method == name and get_handle(model) is h
    out = _logits(model, ids)
    if name == "rope":
        torch.testing.assert_close(out, ref, atol=0, rtol=0)
    else:
        assert (out - ref).abs().max() > 1e-3
    h.remove()
    torch.testing.assert_close(_logits(model, ids), ref, atol=0, rtol=0)
    assert model.model.rotary_emb.attention_scaling == 1.0


def test_pi_equals_hf_linear(arch):
    model = _tiny(arch)
    ids = _ids(1, 20)
    with apply_method(model, "pi", factor=3):
        out = _logits(model, ids)
    ref = _logits(_twin(arch, rope_type="linear", factor=3.0), ids)
    torch.testing.assert_close(out, ref, **TIGHT)


def test_ntk_equals_larger_base(arch):
    model = _tiny(arch)
    ids = _ids(1, 20)
    theta = model.config.rope_parameters["rope_theta"]
    r = 16
    with apply_method(model, "ntk", factor=4):
        out = _logits(model, ids)
    ref = _logits(_twin(arch, rope_theta=theta * 4 ** (r / (r - 2))), ids)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_yarn_equals_hf_yarn(arch):
    model = _tiny(arch)
    ids = _ids(1, 40)
    with apply_method(model, "yarn", factor=4, original_max_position_embeddings=16):
        out = _logits(model, ids)
        assert abs(model.model.rotary_emb.attention_scaling - (0.1 * torch.log(torch.tensor(4.0)).item() + 1)) < 1e-6
    twin = _twin(arch, rope_type="yarn", factor=4.0, original_max_position_embeddings=16)
    assert twin.model.rotary_emb.rope_type == "yarn"
    ref = _logits(twin, ids)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_self_extend_is_one_group_dpe(model):
    ids = _ids(1, 20)
    with apply_method(model, "self_extend", group_size=4, window=6) as h:
        out = _logits(model, ids)
        assert h.config.scales == (4,) and h.config.window == 6 and h.config.mask is None
    with apply_dpe(model, DPEConfig.uniform(6, [4, 4, 4, 4], num_pairs=8)):
        ref = _logits(model, ids)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
