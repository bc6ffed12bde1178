"""`dpe parity` (dpe_kernels/tools/parity.py): a broken backend fails with its cases named, the golden
vectors round-trip (export, compute with our kernels, --against passes; a perturbed output fails), the
authors' formulation is reported where it differs, and bad command lines exit 2 on one line."""
import json
import time

import pytest
import torch

from dpe_kernels.tools import cli, parity
from dpe_kernels.tools import parity_cases as pc


def dpe(argv, capsys):
    """Run `dpe ARGV` in process: (exit code, stdout, stderr)."""
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_conftest_uses_the_one_tolerance_rule():
    import conftest

    assert conftest.tolerance is parity.tolerance and conftest.ATOL is parity.ATOL
    assert parity.tolerance(torch.float16, 1e-3) == pytest.approx(2e-3 + parity.ATOL[torch.float16])
    with pytest.raises(ValueError, match="dtype"):
        parity.tolerance(torch.float64, 0.0)


def test_max_abs_error_infinities_and_nan():
    inf = float("inf")
    assert parity.max_abs_error(torch.tensor([-inf, 1.0]), torch.tensor([-inf, 1.0])) == 0.0
    assert parity.max_abs_error(torch.tensor([0.0, 1.0]), torch.tensor([-inf, 1.0])) == inf
    assert parity.max_abs_error(torch.tensor([float("nan")]), torch.tensor([0.0])) == inf
    assert parity.max_abs_error(torch.zeros(2), torch.zeros(3)) == inf


def test_quick_grid_passes_on_this_machine(capsys, tmp_path):
    """The CI command: every available backend, every op; the table names the machine; md + json written."""
    t0 = time.perf_counter()
    rc, out, err = dpe(["parity", "--quick", "--dtypes", "float32,bfloat16", "--out", str(tmp_path)], capsys)
    assert rc == 0, out + err
    assert "cores" in out and "torch" in out and "PASS" in out and "FAIL" not in out
    for op in ("rope", "rope_and_cache", "attention/prefill", "attention/chunked", "attention/decode",
               "cache_step", "paged/decode", "paged/mixed"):
        assert f"\n{op} " in out, op
    data = json.loads((tmp_path / "parity.json").read_text())
    assert data["machine"]["cores"] >= 1 and not data["failures"]
    assert {r["backend"] for r in data["rows"]} >= {"reference", "cpu"}
    assert "| op | backend | dtype |" in (tmp_path / "parity.md").read_text()
    assert time.perf_counter() - t0 < 120


# --------------------------------------------------------------------------- a broken backend
def test_broken_attention_backend_fails_naming_the_cases(monkeypatch, capsys):
    """Mutation: the cpu attention backend puts the window edge one key too early (window - 1)."""
    import dpe_kernels.backends.attention_cpu as ca

    real = ca.cpu_attention
    monkeypatch.setattr(ca, "cpu_attention", lambda qn, qs, kn, ks, v, window, *a, **k:
                        real(qn, qs, kn, ks, v, window - 1 if window > 1 else window, *a, **k))
    rc, out, err = dpe(["parity", "--ops", "attention", "--backends", "cpu,reference", "--dtypes", "float32"],
                       capsys)
    assert rc == 1
    assert "FAILING case(s)" in out
    assert "attention/prefill-gqa8:2-ks_kv [attention/prefill, cpu, float32]" in out
    assert "attention/decode-sk37 [attention/decode, cpu, float32]" in out
    # the reference backend is untouched and passes; the window beyond the sequence is unaffected
    assert "reference, float32]" not in out
    assert "prefill-window-beyond-seq [" not in out


def test_broken_rope_backend_fails_naming_the_cases(monkeypatch):
    """Mutation: the cpu rope kernel's q_scaled is off by 1e-4 (a float32-visible error)."""
    real = pc.dpe_rope

    def broken(*a, backend="auto", **k):
        out = real(*a, backend=backend, **k)
        if backend == "cpu":
            out = out._replace(q_scaled=out.q_scaled + 1e-4)
        return out

    monkeypatch.setattr(pc, "dpe_rope", broken)
    res = parity.run_grid(ops=["rope"], backends=["cpu", "reference"], dtypes=["float32"], quick=True)
    names = {(f["case"], f["backend"]) for f in res["failures"]}
    quick_rope = [c.name for c in pc.all_cases() if c.kind == "rope" and c.quick and c.params.get("T", 1) != 0]
    assert names == {(n, "cpu") for n in quick_rope}
    assert all("q_scaled" in f["why"] for f in res["failures"])
    assert any(r["backend"] == "cpu" and r["verdict"].startswith("FAIL") for r in res["rows"])


def test_a_raising_backend_fails_its_cases(monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("kernel exploded")

    import dpe_kernels.backends.paged_cpu as pcpu

    monkeypatch.setattr(pcpu, "paged_attention_cpu", boom)
    res = parity.run_grid(ops=["paged"], backends=["cpu"], dtypes=["float32"], quick=True)
    assert res["failures"] and all("kernel exploded" in f["why"] for f in res["failures"])


# --------------------------------------------------------------------------- golden vectors
def test_golden_round_trip_and_a_perturbed_output(tmp_path, capsys):
    d = tmp_path / "golden"
    rc, out, _ = dpe(["parity", "--export", str(d)], capsys)
    assert rc == 0 and "golden cases" in out
    m = json.loads((d / "manifest.json").read_text())
    assert m["schema"] == "dpe-golden" and m["version"] == 1
    assert {c["op"] for c in m["cases"]} == {"rope", "paged", "attention"}
    assert {c["dtype"] for c in m["cases"]} == {"float32", "float16", "bfloat16"}
    assert (d / "manifest.txt").read_text().startswith("dpe-golden 1\n")
    size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
    assert size < 1 << 20

    # no outputs yet: every case fails as missing
    rc, out, _ = dpe(["parity", "--against", str(d)], capsys)
    assert rc == 1 and "missing outputs/" in out

    rc, out, _ = dpe(["parity", "--compute", str(d), "--backend", "cpu"], capsys)
    assert rc == 0
    rc, out, _ = dpe(["parity", "--against", str(d), "--out", str(tmp_path / "rep")], capsys)
    assert rc == 0, out
    assert "FAIL" not in out and (tmp_path / "rep" / "parity.md").is_file()

    # perturb one element of one output file by 1e-3 (float32): that case, and only it, fails
    case = next(c for c in m["cases"] if c["op"] == "rope" and c["dtype"] == "float32")
    f = d / case["outputs"]["k_scaled"]["file"]
    t = parity._read_bin(f, "float32", case["outputs"]["k_scaled"]["shape"])
    t.view(-1)[5] += 1e-3
    parity._write_bin(f, t)
    rc, out, _ = dpe(["parity", "--against", str(d)], capsys)
    assert rc == 1
    assert f"{case['name']} [rope, golden, float32]: k_scaled: max abs error" in out
    assert out.count("FAIL (") == 1

    # a truncated file fails with a clear reason, never a traceback
    f.write_bytes(f.read_bytes()[:-4])
    rc, out, _ = dpe(["parity", "--against", str(d)], capsys)
    assert rc == 1 and "bytes, expected" in out


def test_golden_bin_layout_is_plain_little_endian(tmp_path):
    t = torch.tensor([[1.0, -2.5], [3.0, 0.5]], dtype=torch.bfloat16)
    meta = parity._write_bin(tmp_path / "x.bin", t)
    assert meta == {"dtype": "bfloat16", "shape": [2, 2]}
    raw = (tmp_path / "x.bin").read_bytes()
    assert raw[:2] == (0x3F80).to_bytes(2, "little")  # bfloat16 1.0 = the top 16 bits of float32 1.0
    assert torch.equal(parity._read_bin(tmp_path / "x.bin", "bfloat16", [2, 2]), t)
    m = parity._write_bin(tmp_path / "m.bin", torch.tensor([True, False]))
    assert m["dtype"] == "uint8" and (tmp_path / "m.bin").read_bytes() == b"\x01\x00"


# --------------------------------------------------------------------------- the authors' formulation
def test_authors_reference_reports_where_it_differs(capsys):
    rc, out, _ = dpe(["parity", "--reference", "authors", "--ops", "rope", "--dtypes", "float32",
                      "--backends", "cpu"], capsys)
    assert rc == 0  # reports, never fails
    res = parity.run_grid(reference="authors", ops=["rope", "cache_step"], backends=["cpu"], dtypes=["float32"])
    diff = res["formulation_difference"]
    # every scale divides w = 1024 (the paper's settings): the real offset is the integer one
    assert diff["rope/gqa8:2-neox-mask_per_q-pos2^20"] == 0.0
    # w = 10 with scales 3, 4, 7: w - w / s is not an integer, q_scaled differs by O(1)
    assert diff["rope/partial24of40-gptj-uneven"] > 0.1
    assert any(f["case"] == "rope/partial24of40-gptj-uneven" for f in res["failures"])
    assert "rope/partial24of40-gptj-uneven" in out and "differs" in out
    # their re-rotating decode equals the rotate-once cache near 0, differs by float32 rounding at 2^20
    at0 = [f for f in res["failures"] if f["case"] == "cache_step/gqa4:4-mask_none-at0"]
    assert at0 and all("decode_out" not in f["why"] for f in at0)
    top = [f for f in res["failures"] if f["case"] == "cache_step/gqa4:2-mask_per_q-at1048560"]
    assert top and "decode_out" in top[0]["why"]


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("argv, match", [
    (["--device", "tpu"], "--device"),
    (["--dtypes", "float8"], "unknown dtype 'float8'"),
    (["--dtypes", ","], "at least one dtype"),
    (["--backends", "vulkan"], "unknown backend 'vulkan'"),
    (["--ops", "conv"], "unknown op 'conv'"),
    (["--reference", "theirs"], "--reference"),
    (["--backend", "cpu"], "--compute DIR and --backend X go together"),
    (["--against", "MISSING"], "no manifest.json"),
    (["--compute", "TMP"], "--compute DIR and --backend X go together"),
    (["--compute", "MISSING", "--backend", "cpu"], "no manifest.json"),
    (["--export", "A_FILE"], "is not a directory"),
    (["--out", "A_FILE"], "is not a directory"),
    (["--export", "TMP", "--quick"], "apply to the grid run"),
    (["--against", "TMP", "--against", "TMP", "--export", "TMP"], "not allowed with"),
] + ([(["--device", "cuda"], "no CUDA device")] if not torch.cuda.is_available() else [])
  + ([(["--backends", "flash"], "'flash' is not available on cpu")]))
def test_bad_command_line_exits_2_on_one_line(argv, match, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    subst = {"MISSING": str(tmp_path / "nope"), "TMP": str(tmp_path), "A_FILE": str(tmp_path / "a_file")}
    t0 = time.perf_counter()
    rc, out, err = dpe(["parity"] + [subst.get(a, a) for a in argv], capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dpe parity: error:"), err
    assert match in lines[0]
    assert "Traceback" not in err and out == ""
    assert time.perf_counter() - t0 < 10  # before any heavy work


def test_python_api_bad_arguments_name_them():
    with pytest.raises(ValueError, match="reference"):
        parity.run_grid(reference="theirs")
    with pytest.raises(ValueError, match="dtypes"):
        parity.run_grid(dtypes=["float64"])
    with pytest.raises(ValueError, match="ops"):
        parity.run_grid(ops=["conv"])


def test_registered_in_the_cli():
    assert "parity" in cli.SUBCOMMANDS


def test_checked_in_golden_set_passes_our_cpu_kernels(tmp_path, capsys):
    """csrc/tests/golden/ (read by the C++ test) is current: our cpu backend passes it through --against."""
    import shutil
    from pathlib import Path

    src = Path(__file__).resolve().parents[2] / "csrc" / "tests" / "golden"
    if not (src / "manifest.json").is_file():
        pytest.skip("no source checkout (csrc/tests/golden)")
    d = tmp_path / "golden"
    shutil.copytree(src, d)
    assert (src / "manifest.txt").stat().st_size > 0 and not (src / "outputs").exists()
    assert dpe(["parity", "--compute", str(d), "--backend", "cpu"], capsys)[0] == 0
    rc, out, _ = dpe(["parity", "--against", str(d)], capsys)
    assert rc == 0 and "FAIL" not in out, out
