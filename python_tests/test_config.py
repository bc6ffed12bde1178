"""dpe_kernels/config.py: DPEConfig (groups, pair scales, JSON, layer masks, bad values) and the
presets (from_preset of every kind, the shipped calibrated presets and the length each was
calibrated for, the warning past it)."""
import json
import warnings

import pytest
import torch

from dpe_kernels import DPEConfig
from dpe_kernels.config import PresetLengthWarning, calibrated_presets


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


def test_shipped_preset_knows_its_length():
    assert "smollm2-135m" in calibrated_presets()
    cfg = DPEConfig.from_preset("smollm2-135m")
    assert cfg.calibrated_length == 16384 and cfg.mask is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DPEConfig.from_preset("smollm2-135m", target_length=16384)
    with pytest.warns(PresetLengthWarning, match="calibrated for 16384 tokens and is used at 32768"):
        DPEConfig.from_preset("smollm2-135m", target_length=32768)


def test_field_json_and_checks(tmp_path):
    mask = torch.ones(2, 3, 8, dtype=torch.bool)
    cfg = DPEConfig.uniform(32, [2, 4], 8, mask=mask, calibrated_length=300)
    back = DPEConfig.from_json(cfg.to_json())
    assert back.calibrated_length == 300 and back == cfg and torch.equal(back.mask, mask)
    assert cfg.with_mask(None).calibrated_length == 300
    assert '"calibrated_length": 300' in cfg.to_json()
    assert "calibrated_length" not in DPEConfig.uniform(32, [2, 4], 8).to_json()  # optional
    assert DPEConfig.uniform(32, [2, 4], 8).exceeds_calibration(10 ** 6) is False
    assert not cfg.exceeds_calibration(300) and cfg.exceeds_calibration(301)
    with pytest.warns(PresetLengthWarning, match="this DPE config was calibrated for 300 tokens and is used at 301"):
        assert cfg.check_length(301) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cfg.check_length(300) is True
    for bad in (0, -1, 2.5, "300", True):
        with pytest.raises((ValueError, TypeError), match="calibrated_length"):
            DPEConfig.uniform(32, [2, 4], 8, calibrated_length=bad)
    with pytest.raises(ValueError, match="length must be a positive int"):
        cfg.exceeds_calibration(0)


def test_eval_methods_warn_when_applied_past_the_calibration(monkeypatch, tmp_path):
    """The evaluation applies a preset at each length: past its calibration it warns, once per use."""
    pytest.importorskip("transformers")
    import dpe_kernels.config
    from dpe_kernels.tools.eval import methods as M
    from dpe_kernels.tools.models import tiny_random_llama

    model, _ = tiny_random_llama()
    monkeypatch.setattr(dpe_kernels.config, "PRESET_DIR", tmp_path)
    DPEConfig.uniform(32, [2] * 8, 8, calibrated_length=300).to_json(tmp_path / "t.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        M.method_kwargs(model, "dpe", 300, 256, dpe_preset="t")
    with pytest.warns(PresetLengthWarning) as rec:
        M.method_kwargs(model, "dpe", 400, 256, dpe_preset="t")
    assert len(rec) == 1 and "preset 't'" in str(rec[0].message)
    with pytest.warns(PresetLengthWarning, match="the DPE config was calibrated for 300"):
        M.method_kwargs(model, "dpe", 400, 256, dpe_config=DPEConfig.from_json(tmp_path / "t.json"))


def test_from_preset_every_kind():
    inv = 1.0 / (100000.0 ** (torch.arange(32, dtype=torch.float32) / 32))
    auto = DPEConfig.from_preset("auto", inv_freq=inv, train_length=8192, target_length=32768)
    assert list(auto.scales) == [2, 2, 2, 4, 4, 8, 8, 8] and auto.window == 1024
    uni = DPEConfig.from_preset("uniform", num_pairs=32, train_length=8192, target_length=16384)
    assert list(uni.scales) == [4] * 8
    paper = DPEConfig.from_preset("llama3-8b", num_pairs=64)
    assert list(paper.scales) == [4, 4, 2, 16, 32, 32, 16, 128] and paper.group_boundaries[1] == 8
    cal = DPEConfig.from_preset("smollm2-135m", inv_freq=inv)
    assert cal.mask is not None and cal.num_pairs == 32


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="nope", num_pairs=32), "unknown DPE preset 'nope'"),
    (dict(name="auto", num_pairs=32, train_length=8192, target_length=16384), "needs inv_freq"),
    (dict(name="auto", inv_freq=torch.ones(32), target_length=16384), "train_length"),
    (dict(name="uniform", num_pairs=32, train_length=8192, target_length=0), "target_length"),
    (dict(name="llama3-8b"), "num_pairs or inv_freq"),
    (dict(name="smollm2-135m", num_pairs=64), "covers 32 pairs"),
])
def test_from_preset_bad_input(kwargs, match):
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=match):
        DPEConfig.from_preset(name, **kwargs)
