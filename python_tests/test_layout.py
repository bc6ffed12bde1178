"""The package layout's promises: one home per shared piece, no module reaching into
another's underscore names, and the public names."""
import ast
from pathlib import Path

import pytest
import torch

import dpe_kernels
from dpe_kernels import DPEConfig, dpe_rope

PKG = Path(dpe_kernels.__file__).resolve().parent


def _sources():
    return [p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts]


def test_no_module_imports_another_modules_underscore_names():
    bad = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module not in (None, "__future__"):
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


# --------------------------------------------------------------------------- presets in the core
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


# --------------------------------------------------------------------------- position limits
def _rope_args(positions):
    q = torch.randn(len(positions), 2, 8)
    k = torch.randn(len(positions), 1, 8)
    inv = 1.0 / (10000.0 ** (torch.arange(4, dtype=torch.float32) / 4))
    return q, k, torch.tensor(positions, dtype=torch.int64), inv, DPEConfig.uniform(4, [2, 2], 4)


def test_positions_at_2_pow_24_are_refused_by_default():
    q, k, pos, inv, cfg = _rope_args([0, (1 << 24) - 1])
    dpe_rope(q, k, pos, inv, cfg)  # the last exact position is fine
    q, k, pos, inv, cfg = _rope_args([0, 1 << 24])
    with pytest.raises(ValueError, match=r"2\^24"):
        dpe_rope(q, k, pos, inv, cfg)
    # check_inputs=False rotates them, rounded as float32(position) (HF's angle)
    q, k, pos, inv, cfg = _rope_args([1 << 24, (1 << 24) + 1])
    out = dpe_rope(q[:1].expand(2, -1, -1).contiguous(), k[:1].expand(2, -1, -1).contiguous(), pos, inv, cfg,
                   check_inputs=False, backend="reference")
    assert torch.equal(out.q_normal[0], out.q_normal[1])  # 2^24 + 1 rounds to 2^24 in float32


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inv_freq_is_refused(bad):
    q, k, pos, inv, cfg = _rope_args([0, 1, 2])
    inv[1] = bad
    with pytest.raises(ValueError, match="inv_freq must be finite"):
        dpe_rope(q, k, pos, inv, cfg)


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
