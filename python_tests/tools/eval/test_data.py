"""dpe_kernels/tools/eval/data.py: the essays data set ships with the package."""
import pytest

pytest.importorskip("transformers")

from dpe_kernels.tools.eval.data import load_essays  # noqa: E402


def test_essays_shipped():
    text = load_essays()
    assert len(text) > 2_000_000  # the ~3 MB public essays
    assert text.startswith("July 2006")
