"""A preset carries the context length it was calibrated for; using it past that length is never silent."""
import warnings

import pytest
import torch

from dpe_kernels.config import DPEConfig, PresetLengthWarning, calibrated_presets


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
