import json

import pytest
import torch

from dpe_kernels import DPEConfig


def test_uniform_groups_and_pair_scales():
    cfg = DPEConfig.uniform(1024, [4, 4, 2, 16, 32, 32, 16, 128], 64)
    assert cfg.group_boundaries == tuple(range(0, 65, 8))
    ps = cfg.pair_scales()
    assert ps.dtype == torch.int64 and ps.shape == (64,)
    assert ps[:8].eq(4).all() and ps[16:24].eq(2).all() and ps[56:].eq(128).all()


def test_uneven_groups():
    cfg = DPEConfig(window=7, group_boundaries=(0, 1, 5, 12), scales=(3, 1, 7))
    assert cfg.pair_scales().tolist() == [3] + [1] * 4 + [7] * 7
    assert cfg.num_pairs == 12 and cfg.num_groups == 3


def test_json_roundtrip_with_mask(tmp_path):
    mask = torch.rand(3, 4, 16) > 0.5
    cfg = DPEConfig.uniform(100, [2, 3, 5, 7], 16, mask=mask)
    path = tmp_path / "cfg.json"
    cfg.to_json(path)
    back = DPEConfig.from_json(path)
    assert back == cfg and torch.equal(back.mask, mask)
    text_back = DPEConfig.from_json(cfg.to_json())
    assert text_back == cfg and torch.equal(text_back.mask, mask)
    assert json.loads(path.read_text())["scales"] == [2, 3, 5, 7]


def test_layer_mask():
    mask = torch.rand(3, 4, 8) > 0.5
    cfg = DPEConfig.uniform(16, [2, 4], 8, mask=mask)
    assert torch.equal(cfg.layer_mask(2), mask[2])
    with pytest.raises(ValueError, match="layer"):
        cfg.layer_mask(3)
    assert DPEConfig.uniform(16, [2, 4], 8).layer_mask(0) is None


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(window=0, group_boundaries=(0, 4), scales=(2,)), ValueError, "window"),
        (dict(window=1.5, group_boundaries=(0, 4), scales=(2,)), TypeError, "window"),
        (dict(window=True, group_boundaries=(0, 4), scales=(2,)), TypeError, "window"),
        (dict(window=8, group_boundaries=(0, 4), scales=(0,)), ValueError, "scales"),
        (dict(window=8, group_boundaries=(0, 4), scales=(2.0,)), TypeError, "scales"),
        (dict(window=8, group_boundaries=(1, 4), scales=(2,)), ValueError, "group_boundaries"),
        (dict(window=8, group_boundaries=(0, 4, 4), scales=(2, 2)), ValueError, "group_boundaries"),
        (dict(window=8, group_boundaries=(0, 4, 8), scales=(2,)), ValueError, "scales"),
        (dict(window=8, group_boundaries=(0,), scales=()), ValueError, "group_boundaries"),
        (dict(window=8, group_boundaries=(0, 4), scales=(2,), mask=torch.ones(2, 4)), TypeError, "mask"),
        (dict(window=8, group_boundaries=(0, 4), scales=(2,), mask=torch.ones(2, 5, dtype=torch.bool)),
         ValueError, "mask"),
        (dict(window=8, group_boundaries=(0, 4), scales=(2,), mask=[[True]]), TypeError, "mask"),
    ],
)
def test_config_rejects_bad_values(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        DPEConfig(**kwargs)


@pytest.mark.parametrize(
    "text, match",
    [
        ("{not json", "invalid DPE config JSON"),
        ('{"window": 8, "group_boundaries": [0, 4]}', "scales"),
        ('{"window": 8, "group_boundaries": [0, 4], "scales": [2], "extra": 1}', "unknown"),
        ('{"window": 8, "group_boundaries": [0, 2], "scales": [2], "mask": [["01", "2x"]]}', "mask"),
    ],
)
def test_from_json_rejects_bad_text(text, match):
    with pytest.raises(ValueError, match=match):
        DPEConfig.from_json(text)


def test_uniform_rejects_indivisible_pairs():
    with pytest.raises(ValueError, match="divisible"):
        DPEConfig.uniform(8, [1, 2, 3], 8)
