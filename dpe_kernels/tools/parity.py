"""``dpe parity``: every backend of every op against the float64 oracles, on this machine.

Modes (one per call):

* default: run the case grid (:mod:`dpe_kernels.tools.parity_cases`) for every
  backend available on ``--device`` and every ``--dtypes``; print one table
  (op, backend, dtype, cases, max abs error, max rel error, tolerance,
  verdict), name the machine, write ``parity.md`` / ``parity.json`` under
  ``--out``; exit 1 when a case fails, naming it.
* ``--reference authors``: the same grid against the authors' formulation where
  it differs (the real window offset ``w - w / s`` of their prefill, their
  re-rotating decode); reports which cases differ and by how much (exit 0).
* ``--export DIR``: write the golden vectors (docs/parity.md: JSON manifest,
  text sidecar manifest, raw little-endian ``.bin`` arrays).
* ``--compute DIR --backend X``: fill ``DIR/outputs/`` with our backend X's outputs.
* ``--against DIR``: check ``DIR/outputs/`` (another implementation's) against
  the golden expectations; same table, exit 1 on failure.

Tolerance rule (the ONE definition; python_tests/conftest.py imports it): a kernel's
max abs error against the float64 oracle must be at most twice the max abs
error of the same-dtype PyTorch reference against the same oracle, plus a
floor ``ATOL[dtype]`` for when that reference error is ~0 (flash-attn's rule).
Rows without keys must match exactly (out 0, lse -inf): an infinity or NaN
where the oracle has a finite value (or the reverse) is an infinite error.
The relative error column is the max abs error divided by the largest
``|expected|`` of that output (a norm-wise figure; element-wise relative
errors blow up at zeros).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

__all__ = ["ATOL", "tolerance", "max_abs_error", "check_outputs", "build_parser", "validate", "run",
           "run_grid", "machine_info", "format_table", "GOLDEN_SCHEMA", "GOLDEN_VERSION",
           "export_golden", "compute_golden", "check_golden"]

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BACKEND_NAMES = ("reference", "cpu", "cuda", "flash", "triton")
KINDS = ("rope", "rope_and_cache", "attention", "cache_step", "paged")  # parity_cases.KINDS
GOLDEN_SCHEMA = "dpe-golden"
GOLDEN_VERSION = 1


def tolerance(dtype: torch.dtype, reference_error: float) -> float:
    """The bound on a kernel's max abs error vs the float64 oracle: ``2 * reference_error + ATOL[dtype]``,
    ``reference_error`` being the same-dtype PyTorch reference's max abs error vs that oracle."""
    if dtype not in ATOL:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype}")
    return 2.0 * float(reference_error) + ATOL[dtype]


def max_abs_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max |got - want| in float64; equal infinities count 0, any other non-finite difference inf."""
    if tuple(got.shape) != tuple(want.shape):
        return float("inf")
    if got.numel() == 0:
        return 0.0
    g, w = got.detach().to("cpu", torch.float64), want.detach().to("cpu", torch.float64)
    same_inf = torch.isinf(g) & torch.isinf(w) & (g == w)
    diff = torch.where(same_inf, torch.zeros_like(g), (g - w).abs())
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    return float(diff.max())


def _scale(want: torch.Tensor) -> float:
    w = want.detach().to("cpu", torch.float64)
    w = w[torch.isfinite(w)]
    return float(w.abs().max()) if w.numel() else 0.0


def check_outputs(got: Dict[str, torch.Tensor], oracle: Dict[str, torch.Tensor], same_dtype: Dict[str, torch.Tensor],
                  dtype: torch.dtype, noise_oracle: Optional[Dict[str, torch.Tensor]] = None) -> dict:
    """Apply the tolerance rule to every output; the case's record (errors, bound, pass, why).

    ``noise_oracle`` (``--reference authors``): the float64 oracle the same-dtype reference's
    rounding error is measured against (ours), when ``oracle`` is another formulation."""
    rec = {"abs": 0.0, "rel": 0.0, "tol": None, "ratio": -1.0, "ok": True, "why": []}
    for name, want in oracle.items():
        g = got.get(name)
        base_want = want if noise_oracle is None else noise_oracle[name]
        bound = tolerance(dtype, max_abs_error(same_dtype[name], base_want))
        if g is None:
            err, why = float("inf"), f"{name}: missing"
        elif tuple(g.shape) != tuple(want.shape):
            err, why = float("inf"), f"{name}: shape {list(g.shape)} != {list(want.shape)}"
        elif g.dtype != (torch.float32 if name == "lse" else dtype):
            err, why = float("inf"), f"{name}: dtype {g.dtype} != {dtype}"
        else:
            err = max_abs_error(g, want)
            why = f"{name}: max abs error {err:.3g} > tolerance {bound:.3g}"
        if not err <= bound:
            rec["ok"] = False
            rec["why"].append(why)
        s = _scale(want)
        rec["abs"] = max(rec["abs"], err)
        rec["rel"] = max(rec["rel"], err / s if s > 0 else (0.0 if err == 0 else float("inf")))
        if err / bound > rec["ratio"]:
            rec["ratio"], rec["tol"] = err / bound, bound
    return rec


# --------------------------------------------------------------------------- machine
def machine_info(device: str = "cpu") -> dict:
    """The machine a table was produced on: CPU model, cores, torch / dpe_kernels / triton versions, GPU."""
    import dpe_kernels

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "dpe_kernels": dpe_kernels.__version__,
            "python": platform.python_version(), "extension": dpe_kernels.has_extension(), "device": device}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def machine_line(info: dict) -> str:
    s = (f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}, dpe_kernels {info['dpe_kernels']}"
         f", extension {'loaded' if info['extension'] else 'NOT loaded'}")
    if info.get("triton"):
        s += f", triton {info['triton']}" + (" (interpreter)" if info["triton_interpret"] and
                                               info["device"] == "cpu" else "")
    if info.get("gpu"):
        s += f", GPU {info['gpu']} (CUDA {info['cuda']})"
    return s


# --------------------------------------------------------------------------- the grid run
def backends_for(kind: str, device: torch.device) -> List[str]:
    from ..attention import available_attention_backends
    from ..paged_attention import available_paged_backends
    from ..rope import available_rope_backends

    if kind == "rope":
        return available_rope_backends(device)
    if kind == "rope_and_cache":
        return available_rope_backends(device, "rope_and_cache")
    if kind == "paged":
        return available_paged_backends(device)
    return available_attention_backends(device)


def _row_key(case, backend, dtype):
    return (case.op, backend, dtype)


def run_grid(*, device: str = "cpu", backends: Optional[List[str]] = None, dtypes: Optional[List[str]] = None,
             quick: bool = False, reference: str = "ours", ops: Optional[List[str]] = None, cases=None,
             progress=None) -> dict:
    """Run the grid; returns ``{"rows": [...], "failures": [...], "seconds": float}``.

    ``reference="authors"`` compares against the authors' formulation instead (only the ops
    where it differs from ours); failures then mean "differs", not "wrong".
    """
    from . import parity_cases as pc

    if reference not in ("ours", "authors"):
        raise ValueError(f"reference must be 'ours' or 'authors', got {reference!r}")
    dev = torch.device(device)
    dtypes = list(dtypes or DTYPES)
    for name in dtypes:
        if name not in DTYPES:
            raise ValueError(f"dtypes: each must be one of {list(DTYPES)}, got {name!r}")
    cases = pc.all_cases() if cases is None else cases
    if ops is not None:
        bad = [o for o in ops if o not in KINDS]
        if bad:
            raise ValueError(f"ops: each must be one of {list(KINDS)}, got {bad[0]!r}")
        cases = [c for c in cases if c.kind in ops]
    if quick:
        cases = [c for c in cases if c.quick]
    interpreted = dev.type == "cpu"
    rows: Dict[tuple, dict] = {}
    failures = []
    fdiff: Dict[str, float] = {}  # --reference authors: max |ours - authors| of each case, both float64
    t0 = time.perf_counter()
    with torch.inference_mode():
        for case in cases:
            avail = backends_for(case.kind, dev)
            names = [b for b in avail if backends is None or b in backends]
            for dname in dtypes:
                dtype = DTYPES[dname]
                ins = pc.build_inputs(case, dtype, dev)
                ours = None
                if reference == "authors":
                    oracle = pc.authors_outputs(case, ins)
                    if oracle is None:
                        continue
                    ours = pc.reference_outputs(case, ins, float64=True)
                    formulation = max(max_abs_error(ours[k], oracle[k]) for k in oracle)
                    fdiff[case.name] = max(fdiff.get(case.name, 0.0), formulation)
                else:
                    oracle = pc.reference_outputs(case, ins, float64=True)
                same = pc.reference_outputs(case, ins, float64=False)
                for b in names:
                    if b == "triton" and interpreted and not case.tiny:
                        continue  # the interpreter is slow: tiny cases only
                    if b == "flash" and dtype == torch.float32:
                        continue  # flash-attn takes 16-bit inputs only
                    if progress:
                        progress(f"{case.name} {b} {dname}")
                    try:
                        got = pc.run_kind(case, b, ins)
                        rec = check_outputs(got, oracle, same, dtype, ours)
                    except Exception as e:  # a backend that raises fails its case, named
                        rec = {"abs": float("inf"), "rel": float("inf"), "tol": ATOL[dtype], "ratio": float("inf"),
                               "ok": False, "why": [f"raised {type(e).__name__}: {str(e).splitlines()[0][:200]}"]}
                    row = rows.setdefault(_row_key(case, b, dname), {
                        "op": case.op, "backend": b, "dtype": dname, "cases": 0, "failed": 0, "max_abs": 0.0,
                        "max_rel": 0.0, "tolerance": None, "_ratio": -1.0, "worst_case": None})
                    row["cases"] += 1
                    row["max_abs"] = max(row["max_abs"], rec["abs"])
                    row["max_rel"] = max(row["max_rel"], rec["rel"])
                    if rec["ratio"] > row["_ratio"]:
                        row["_ratio"], row["tolerance"], row["worst_case"] = rec["ratio"], rec["tol"], case.name
                    if not rec["ok"]:
                        row["failed"] += 1
                        failures.append({"case": case.name, "op": case.op, "backend": b, "dtype": dname,
                                         "why": "; ".join(rec["why"])})
    out_rows = []
    op_order = {c.op: i for i, c in reversed(list(enumerate(cases)))}
    rank = lambda r: (op_order.get(r["op"], 99), BACKEND_NAMES.index(r["backend"]), list(DTYPES).index(r["dtype"]))
    for row in sorted(rows.values(), key=rank):
        row.pop("_ratio")
        row["verdict"] = ("PASS" if not row["failed"] else f"FAIL ({row['failed']}/{row['cases']})") \
            if reference == "ours" else ("same" if not row["failed"] else f"differs ({row['failed']}/{row['cases']})")
        out_rows.append(row)
    res = {"rows": out_rows, "failures": failures, "seconds": time.perf_counter() - t0, "reference": reference}
    if reference == "authors":
        res["formulation_difference"] = fdiff
    return res


def _fmt(x) -> str:
    if x is None:
        return "-"
    if x == float("inf"):
        return "inf"
    return f"{x:.2e}" if x else "0"


def format_table(rows: List[dict], markdown: bool = False) -> str:
    head = ["op", "backend", "dtype", "cases", "max abs err", "max rel err", "tolerance", "verdict"]
    body = [[r["op"], r["backend"], r["dtype"], str(r["cases"]), _fmt(r["max_abs"]), _fmt(r["max_rel"]),
             _fmt(r["tolerance"]), r["verdict"]] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        return "\n".join(lines)
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = lambda r: "  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body])


TOLERANCE_NOTE = ("tolerance: a kernel's max abs error vs the float64 oracle <= 2 x (the same-dtype PyTorch "
                  "reference's error vs that oracle) + ATOL[dtype] (float32 1e-5, float16 2e-3, bfloat16 1.6e-2); "
                  "the column shows the bound of each row's worst case. rel err = abs err / max |expected|.")
AUTHORS_NOTE = ("--reference authors: expected values are the authors' formulation (prefill query index "
                "m // s + (w - w / s) with the real offset, added in float32; decode re-rotating every cached key "
                "by its relative distance). Ops where it equals ours (attention, paged attention: rotated inputs) "
                "are not listed. 'differs' = beyond the tolerance of the rule above; cases differ by design where "
                "s does not divide w, or (decode) through float32 rounding of absolute vs relative angles.")


def _report(result: dict, info: dict, title: str) -> str:
    note = AUTHORS_NOTE if result.get("reference") == "authors" else TOLERANCE_NOTE
    lines = [f"# {title}", "", f"Machine: {machine_line(info)}", f"Wall time: {result['seconds']:.1f} s", "",
             format_table(result["rows"], markdown=True), "", note, ""]
    if result.get("formulation_difference"):
        lines += ["max |ours - authors| per case (both float64, before any kernel):", ""]
        lines += [f"- {k}: {_fmt(v)}" for k, v in result["formulation_difference"].items()]
        lines.append("")
    if result["failures"]:
        lines.append("Failing cases:" if result.get("reference") != "authors" else "Differing cases:")
        lines += [f"- {f['case']} [{f['backend']}, {f['dtype']}]: {f['why']}" for f in result["failures"]]
        lines.append("")
    return "\n".join(lines)


def _write_out(out_dir: Path, result: dict, info: dict, title: str, stem: str = "parity") -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.md").write_text(_report(result, info, title))
    payload = {"title": title, "machine": info, **result}
    (out_dir / f"{stem}.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")


def _print_result(result: dict, info: dict, out=None) -> None:
    out = out or sys.stdout
    print(f"machine: {machine_line(info)}", file=out)
    print(format_table(result["rows"]), file=out)
    print(AUTHORS_NOTE if result.get("reference") == "authors" else TOLERANCE_NOTE, file=out)
    if result.get("formulation_difference"):
        print("max |ours - authors| per case (both float64, before any kernel):", file=out)
        for k, v in result["formulation_difference"].items():
            print(f"  {k}: {_fmt(v)}", file=out)
    if result["failures"]:
        word = "differing" if result.get("reference") == "authors" else "FAILING"
        print(f"{len(result['failures'])} {word} case(s):", file=out)
        for f in result["failures"]:
            print(f"  {f['case']} [{f['op']}, {f['backend']}, {f['dtype']}]: {f['why']}", file=out)
    print(f"({result['seconds']:.1f} s)", file=out)


# --------------------------------------------------------------------------- golden vectors
_BIN_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
               "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8}
_DTYPE_NAME = {v: k for k, v in _BIN_DTYPES.items()}


def _write_bin(path: Path, t: torch.Tensor) -> dict:
    """Row-major little-endian raw bytes of ``t`` (bool as uint8; bfloat16 as its 16 bits)."""
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    if sys.byteorder != "little":  # pragma: no cover
        raise RuntimeError("golden vectors are written on little-endian hosts only")
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = t.view(torch.int16) if t.dtype in (torch.float16, torch.bfloat16) else t
    path.write_bytes(raw.numpy().tobytes())
    return {"dtype": _DTYPE_NAME[t.dtype], "shape": list(t.shape)}


def _read_bin(path: Path, dtype: str, shape) -> torch.Tensor:
    if dtype not in _BIN_DTYPES:
        raise ValueError(f"{path}: unknown dtype {dtype!r}")
    tdt = _BIN_DTYPES[dtype]
    data = bytearray(path.read_bytes())
    n = 1
    for s in shape:
        n *= int(s)
    esize = torch.empty((), dtype=tdt).element_size()
    if len(data) != n * esize:
        raise ValueError(f"{path}: {len(data)} bytes, expected {n * esize} for {dtype} {list(shape)}")
    if n == 0:
        return torch.empty(list(shape), dtype=tdt)
    return torch.frombuffer(data, dtype=tdt).reshape(list(shape)).clone()


def export_golden(out_dir: Path, dtypes: Optional[List[str]] = None) -> dict:
    """Write the golden-vector set to ``out_dir`` (manifest.json, manifest.txt, cases/...)."""
    import dpe_kernels

    from . import parity_cases as pc

    out_dir = Path(out_dir)
    dtypes = list(dtypes or DTYPES)
    manifest = {"schema": GOLDEN_SCHEMA, "version": GOLDEN_VERSION,
                "generator": f"dpe_kernels {dpe_kernels.__version__} (dpe parity --export), torch {torch.__version__}",
                "tolerance_rule": "max |output - expected| <= tolerance, per output; tolerance = 2 * reference_error + "
                                  "atol[dtype], reference_error = max abs error of the same-dtype PyTorch reference "
                                  "(float32 math, one rounding) vs the float64 expected values; equal infinities "
                                  "match, any NaN fails",
                "atol": {k: ATOL[v] for k, v in DTYPES.items()},
                "byte_order": "little", "array_order": "row-major (C), contiguous",
                "outputs_dir": "outputs/<case>/<output>.bin (dtype and shape as listed under 'outputs')",
                "cases": []}
    text = [f"{GOLDEN_SCHEMA} {GOLDEN_VERSION}"]
    with torch.inference_mode():
        for case in pc.golden_cases():
            for dname in dtypes:
                dtype = DTYPES[dname]
                cname = f"{case.name}-{dname}"
                ins = {k: v.contiguous() for k, v in pc.build_inputs(case, dtype).items()}
                oracle = pc.reference_outputs(case, ins, float64=True)
                same = pc.reference_outputs(case, ins, float64=False)
                entry = {"name": cname, "op": case.kind, "label": case.op, "dtype": dname, "params": case.params,
                         "inputs": {}, "expected": {}, "outputs": {}}
                text.append(f"case {cname} {case.kind} {dname}")
                for k, v in case.params.items():
                    if isinstance(v, (int, float, str)) and not isinstance(v, bool):
                        text.append(f"param {k} {v}")
                    elif isinstance(v, (list, tuple)):
                        text.append(f"param {k} " + " ".join(str(x) for x in v))
                for k, t in ins.items():
                    rel = f"cases/{cname}/{k}.bin"
                    meta = _write_bin(out_dir / rel, t)
                    entry["inputs"][k] = {"file": rel, **meta}
                    text.append(f"input {k} {meta['dtype']} {rel} {len(meta['shape'])} "
                                + " ".join(map(str, meta["shape"])))
                for k, t in oracle.items():
                    rel = f"cases/{cname}/expected_{k}.bin"
                    meta = _write_bin(out_dir / rel, t.to(torch.float64))
                    ref_err = max_abs_error(same[k], t)
                    tol = tolerance(dtype, ref_err)
                    out_dt = "float32" if k == "lse" else dname
                    entry["expected"][k] = {"file": rel, **meta, "tolerance": tol, "reference_error": ref_err}
                    entry["outputs"][k] = {"file": f"outputs/{cname}/{k}.bin", "dtype": out_dt, "shape": meta["shape"]}
                    text.append(f"expected {k} {rel} {tol!r} {len(meta['shape'])} " + " ".join(map(str, meta["shape"])))
                text.append("end")
                manifest["cases"].append(entry)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    (out_dir / "manifest.txt").write_text("\n".join(text) + "\n")
    (out_dir / "README.md").write_text(
        f"# DPE golden vectors ({GOLDEN_SCHEMA} v{GOLDEN_VERSION})\n\nWritten by `dpe parity --export` "
        f"({manifest['generator']}). Schema: docs/parity.md of dpe-kernels. manifest.json is the "
        "authoritative manifest; manifest.txt the same data as lines for readers without a JSON parser.\n")
    return manifest


def _load_manifest(d: Path) -> dict:
    path = Path(d) / "manifest.json"
    if not path.is_file():
        raise ValueError(f"{d}: no manifest.json (write one with `dpe parity --export DIR`)")
    m = json.loads(path.read_text())
    if m.get("schema") != GOLDEN_SCHEMA or m.get("version") != GOLDEN_VERSION:
        raise ValueError(f"{path}: schema {m.get('schema')!r} v{m.get('version')!r}, this dpe reads "
                         f"{GOLDEN_SCHEMA!r} v{GOLDEN_VERSION}")
    return m


def _case_of(entry):
    from .parity_cases import Case

    return Case(entry["op"], entry["op"], entry["name"], entry["params"])


def compute_golden(d: Path, backend: str, device: str = "cpu") -> int:
    """Run our ``backend`` on every golden case of ``d`` and write ``d/outputs/``; the number of cases written
    (cases whose op has no such backend are skipped)."""
    from . import parity_cases as pc

    d = Path(d)
    m = _load_manifest(d)
    dev = torch.device(device)
    n = 0
    with torch.inference_mode():
        for entry in m["cases"]:
            case = _case_of(entry)
            if backend not in backends_for(case.kind, dev):
                continue
            ins = {k: _read_bin(d / v["file"], v["dtype"], v["shape"]).to(dev) for k, v in entry["inputs"].items()}
            if "mask" in ins:
                ins["mask"] = ins["mask"].to(torch.bool)
            got = pc.run_kind(case, backend, ins)
            for k, meta in entry["outputs"].items():
                t = got[k].to(_BIN_DTYPES[meta["dtype"]])
                _write_bin(d / meta["file"], t)
            n += 1
    return n


def check_golden(d: Path, label: str = "external") -> dict:
    """Check ``d/outputs/`` against ``d``'s expected values; a run_grid-like result."""
    d = Path(d)
    m = _load_manifest(d)
    rows: Dict[tuple, dict] = {}
    failures = []
    t0 = time.perf_counter()
    for entry in m["cases"]:
        dname = entry["dtype"]
        rec = {"abs": 0.0, "rel": 0.0, "tol": None, "ratio": -1.0, "ok": True, "why": []}
        for k, exp in entry["expected"].items():
            want = _read_bin(d / exp["file"], exp["dtype"], exp["shape"])
            meta = entry["outputs"][k]
            path = d / meta["file"]
            if not path.is_file():
                rec["ok"] = False
                rec["why"].append(f"{k}: missing {meta['file']}")
                err = float("inf")
            else:
                try:
                    got = _read_bin(path, meta["dtype"], meta["shape"])
                    err = max_abs_error(got, want)
                except ValueError as e:
                    err = float("inf")
                    rec["why"].append(f"{k}: {e}")
            tol = float(exp["tolerance"])
            if err > tol:
                rec["ok"] = False
                if not any(w.startswith(k + ":") for w in rec["why"]):
                    rec["why"].append(f"{k}: max abs error {err:.3g} > tolerance {tol:.3g}")
            s = _scale(want)
            rec["abs"] = max(rec["abs"], err)
            rec["rel"] = max(rec["rel"], err / s if s > 0 else (0.0 if err == 0 else float("inf")))
            if err / tol > rec["ratio"]:
                rec["ratio"], rec["tol"] = err / tol, tol
        op = entry.get("label", entry["op"])
        row = rows.setdefault((op, dname), {"op": op, "backend": label, "dtype": dname, "cases": 0, "failed": 0,
                                            "max_abs": 0.0, "max_rel": 0.0, "tolerance": None, "_ratio": -1.0,
                                            "worst_case": None})
        row["cases"] += 1
        row["max_abs"], row["max_rel"] = max(row["max_abs"], rec["abs"]), max(row["max_rel"], rec["rel"])
        if rec["ratio"] > row["_ratio"]:
            row["_ratio"], row["tolerance"], row["worst_case"] = rec["ratio"], rec["tol"], entry["name"]
        if not rec["ok"]:
            row["failed"] += 1
            failures.append({"case": entry["name"], "op": op, "backend": label, "dtype": dname,
                             "why": "; ".join(rec["why"])})
    out = []
    for row in rows.values():
        row.pop("_ratio")
        row["verdict"] = "PASS" if not row["failed"] else f"FAIL ({row['failed']}/{row['cases']})"
        out.append(row)
    return {"rows": out, "failures": failures, "seconds": time.perf_counter() - t0, "reference": "golden"}


# --------------------------------------------------------------------------- CLI
def _csv(choices, what):
    def parse(text: str) -> List[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"must list at least one {what}, got {text!r}")
        bad = [x for x in items if x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {what} {bad[0]!r}; choose from {', '.join(choices)}")
        return items
    parse.__name__ = what
    return parse


def build_parser(p: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="dpe parity")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="run the backends available for this device (default cpu; on cpu the Triton kernels run "
                        "under TRITON_INTERPRET=1, tiny cases only)")
    p.add_argument("--backends", type=_csv(BACKEND_NAMES, "backend"), default=None,
                   help=f"comma-separated subset of {','.join(BACKEND_NAMES)} (default: every available one)")
    p.add_argument("--dtypes", type=_csv(tuple(DTYPES), "dtype"), default=None,
                   help="comma-separated subset of float32,float16,bfloat16 (default: all)")
    p.add_argument("--ops", type=_csv(KINDS, "op"), default=None,
                   help=f"comma-separated subset of {','.join(KINDS)} (default: all)")
    p.add_argument("--quick", action="store_true", help="the quick grid (CI; under 2 minutes on a 2-core CPU)")
    p.add_argument("--reference", choices=("ours", "authors"), default="ours",
                   help="compare against our float64 oracles (default) or the authors' formulation where it differs")
    p.add_argument("--out", default=None, help="directory for parity.md and parity.json")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--export", metavar="DIR", default=None, help="write the golden vectors to DIR")
    mode.add_argument("--against", metavar="DIR", default=None,
                      help="check DIR/outputs/ (another implementation's) against DIR's golden vectors")
    mode.add_argument("--compute", metavar="DIR", default=None,
                      help="write our --backend's outputs for DIR's golden vectors into DIR/outputs/")
    p.add_argument("--backend", choices=BACKEND_NAMES, default=None, help="the backend of --compute")
    return p


class ParityUsageError(ValueError):
    """A bad command line (the CLI prints it on one line, exit 2)."""


def validate(args) -> None:
    """Every check that needs no computation; raises ParityUsageError naming the option."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ParityUsageError("--device cuda: no CUDA device is available here")
    if (args.backend is not None) != (args.compute is not None):
        raise ParityUsageError("--compute DIR and --backend X go together")
    for opt in ("against", "compute"):
        d = getattr(args, opt)
        if d is not None and not (Path(d).expanduser() / "manifest.json").is_file():
            raise ParityUsageError(f"--{opt} {d!r}: no manifest.json there (write one with --export DIR)")
    if args.export is not None:
        e = Path(args.export).expanduser()
        if e.exists() and not e.is_dir():
            raise ParityUsageError(f"--export {args.export!r} exists and is not a directory")
    if args.out is not None:
        o = Path(args.out).expanduser()
        if o.exists() and not o.is_dir():
            raise ParityUsageError(f"--out {args.out!r} exists and is not a directory")
    if (args.export or args.against or args.compute) and (args.quick or args.reference != "ours" or args.backends
                                                           or args.ops):
        raise ParityUsageError("--quick, --ops, --reference and --backends apply to the grid run, not to "
                               "--export / --against / --compute")
    if args.backends:
        from ..utils import HAS_TRITON

        _prepare_triton(args.device)
        dev = torch.device(args.device)
        avail = set()
        for kind in ("rope", "rope_and_cache", "attention", "paged"):
            avail.update(backends_for(kind, dev))
        missing = [b for b in args.backends if b not in avail]
        if missing:
            raise ParityUsageError(f"--backends: {missing[0]!r} is not available on {args.device} here "
                                   f"(available: {', '.join(sorted(avail))}"
                                   f"{'' if HAS_TRITON else '; triton is not installed'})")


def _prepare_triton(device: str) -> None:
    # On a CPU the Triton kernels run through the interpreter, which must be switched on before a
    # kernel module is imported.
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")


def run(args, prog: str = "dpe parity") -> int:
    _prepare_triton(args.device)
    info = machine_info(args.device)
    if args.export:
        m = export_golden(Path(args.export).expanduser(), args.dtypes)
        size = sum(f.stat().st_size for f in Path(args.export).expanduser().rglob("*") if f.is_file())
        print(f"wrote {len(m['cases'])} golden cases ({size / 1024:.0f} KiB) to {args.export} "
              f"({GOLDEN_SCHEMA} v{GOLDEN_VERSION}; manifest.json, manifest.txt)")
        return 0
    if args.compute:
        n = compute_golden(Path(args.compute).expanduser(), args.backend, args.device)
        print(f"wrote backend {args.backend!r}'s outputs for {n} golden cases under {args.compute}/outputs/")
        return 0
    if args.against:
        result = check_golden(Path(args.against).expanduser(), label=Path(args.against).name or "external")
        title = f"dpe parity --against {args.against}"
    else:
        result = run_grid(device=args.device, backends=args.backends, dtypes=args.dtypes, quick=args.quick,
                          reference=args.reference, ops=args.ops)
        title = "dpe parity" + (" --quick" if args.quick else "") + f" --device {args.device}" + \
                (" --reference authors" if args.reference == "authors" else "")
    _print_result(result, info)
    if args.out:
        _write_out(Path(args.out).expanduser(), result, info, title)
        print(f"wrote {Path(args.out) / 'parity.md'} and parity.json")
    if result.get("reference") == "authors":
        return 0
    return 1 if result["failures"] else 0
