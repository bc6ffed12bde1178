"""The attention benchmark's memory child imports the same dpe_kernels as its parent.

CI runs the benchmark from a clean checkout whose source tree holds no built extension; the child
used to start in that directory, import the unbuilt tree and fail. The test starts the parent's
call from a directory holding such a tree (an empty ``dpe_kernels`` package) and checks the child
still measures.
"""
import os

import torch

from dpe_kernels.tools.benchmarks.attention import measure_memory


def test_memory_child_ignores_a_shadowing_tree_in_cwd(tmp_path, monkeypatch):
    shadow = tmp_path / "dpe_kernels"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('the shadowing source tree was imported')\n")
    monkeypatch.chdir(tmp_path)
    res = measure_memory(64, (3, 1, 32), torch.float32, "none", 16, "plain")
    assert set(res) >= {"extra_mib", "inputs_mib", "output_mib", "exact"}
    assert res["output_mib"] > 0 and os.getcwd() == str(tmp_path)
