"""The package layout's promises: one home per shared piece, no module reaching into
another's underscore names, and the public names."""
import ast
from pathlib import Path

import pytest

import dpe_kernels

PKG = Path(dpe_kernels.__file__).resolve().parent


def _sources():
    return [p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts]


def test_no_module_imports_another_modules_underscore_names():
    bad = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            # Our own modules only (relative or dpe_kernels.*): the vLLM plugin reaches into vLLM's
            # private caches on purpose (two engines in one process), against a pinned vLLM version.
            own = isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("dpe_kernels"))
            if own and node.module not in (None, "__future__"):
                for alias in node.names:
                    if alias.name.startswith("_") and alias.name != "__version__":
                        bad.append(f"{path.relative_to(PKG)}: from {node.module} import {alias.name}")
    assert not bad, bad


@pytest.mark.parametrize("literal", [
    "(4, 4, 2, 16, 32, 32, 16, 128)",             # the paper's Llama-3-8B scales
    "(torch.float32, torch.float16, torch.bfloat16)",  # the kernels' dtype set
    "mask.shape[0] if mask is not None else",     # the heads of k_scaled
])
def test_shared_rules_are_written_once(literal):
    homes = [str(p.relative_to(PKG)) for p in _sources() if literal in p.read_text()]
    assert len(homes) == 1, homes


def test_public_names():
    assert "reference" in dpe_kernels.available_rope_backends("cpu")
    for name in ("DPEKVCache", "rope_reference", "attention_reference", "decode_rerotate_reference",
                 "ATTENTION_BACKENDS", "dpe_attention_step"):
        assert name in dpe_kernels.__all__ and getattr(dpe_kernels, name) is not None


# --------------------------------------------------------------------------- import graph
def _imports(path, mods):
    """Modules of dpe_kernels that ``path`` imports (top level or inside functions): ``from
    pkg import sub`` counts as importing ``sub`` (a package's own __init__ is not a circle)."""
    pkg = ["dpe_kernels", *path.relative_to(PKG).parts[:-1]]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            base = pkg[: len(pkg) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            if mod.startswith("dpe_kernels"):
                subs = {f"{mod}.{a.name}" for a in node.names} & set(mods)
                out |= subs if subs or node.module is None else {mod}
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("dpe_kernels"))
    return out


def _graph():
    mods = {}
    for p in _sources():
        rel = p.relative_to(PKG).with_suffix("")
        name = ".".join(["dpe_kernels", *(rel.parts[:-1] if rel.name == "__init__" else rel.parts)])
        mods[name] = p
    return {m: {i for i in _imports(p, mods) if i in mods and i != m} for m, p in mods.items()}


def test_no_import_circle():
    """No module reaches itself through the modules it imports (any length of circle)."""
    g = _graph()

    def reach(m):
        seen, todo = set(), list(g[m])
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo.extend(g[n])
        return seen

    circles = sorted(m for m in g if m in reach(m))
    assert not circles, circles


def test_no_backend_imports_a_public_op_module():
    public = {"dpe_kernels.rope", "dpe_kernels.attention", "dpe_kernels.paged_attention", "dpe_kernels.cache",
              "dpe_kernels"}
    bad = sorted(f"{m} imports {i}" for m, deps in _graph().items() if m.startswith("dpe_kernels.backends")
                 for i in deps & public)
    assert not bad, bad
