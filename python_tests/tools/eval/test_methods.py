"""dpe_kernels/tools/eval/methods.py: the automatic DPE scales and each method's arguments at a
length (a tiny random Llama)."""
import pytest
import torch

pytest.importorskip("transformers")

from dpe_kernels.tools import models  # noqa: E402
from dpe_kernels.tools.eval import methods as M  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    return models.tiny_random_llama(seed=0)


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
