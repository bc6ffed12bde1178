"""dpe_kernels/tools/eval/report.py: the summary table and plots, log-prob intervals and heatmaps."""
import pytest

pytest.importorskip("transformers")

from dpe_kernels.tools.eval.report import write_report  # noqa: E402


def test_report_writes_table_and_plots(tmp_path):
    recs = []
    for m, ok in (("rope", [1, 0]), ("dpe", [1, 1])):
        for L, s in zip((4096, 16384), ok):
            for d in (0.0, 0.5, 1.0):
                recs.append({"task": "passkey", "model": "x", "format": "chat", "method": m, "length": L,
                             "depth": d, "sample": 0, "score": float(s), "seconds": 2.0, "params": "p",
                             "train_length": 8192})
    recs.append({"task": "passkey", "model": "x", "format": "chat", "method": "rope", "length": 32768,
                 "depth": None, "sample": None, "skipped": True, "reason": "scored 0 at 16384"})
    recs.append({"task": "ppl", "model": "x", "format": "text", "method": "rope", "length": 8192, "sample": 0,
                 "loss": 2.0, "score": 2.0, "bucket": 1024, "bucket_losses": [2.0] * 8, "seconds": 1.0,
                 "train_length": 8192})
    files = write_report(recs, tmp_path / "sum.md", tmp_path, title="T")
    names = {f.name for f in files}
    assert names == {"sum.md", "heatmap_passkey.png", "loss_by_position.png"}
    for f in files:
        assert f.stat().st_size > 500
    md = (tmp_path / "sum.md").read_text()
    assert "skipped (scored 0 at 16384)" in md and "100% (3/3), 2.0 s" in md and "0% (0/3)" in md
    assert "| rope | 8K |" in md and "7.39" in md  # ppl = e^2


def test_report_shows_logprob_interval_and_heatmap(tmp_path):
    from dpe_kernels.tools.eval.stats import t_interval

    recs = []
    lps = {"self_extend": [-0.5, -0.7, -0.9, -0.6], "dpe": [-1.0, -1.5, -0.8, -2.0]}
    for m, vals in lps.items():
        for i, lp in enumerate(vals):
            recs.append({"task": "passkey", "model": "x", "format": "raw", "scoring": "logprob", "dtype": "float32",
                         "method": m, "length": 16384, "depth": [0.0, 1.0][i % 2], "sample": i // 2,
                         "score": 1.0 if lp > -1.2 else 0.0, "seconds": 3.0, "params": "p", "logprob": lp,
                         "train_length": 8192})
    recs.append({"task": "passkey", "model": "x", "format": "raw", "method": "rope", "length": 16384, "depth": 0.0,
                 "sample": 0, "score": 0.0, "seconds": 2.0, "params": "-", "train_length": 8192})  # a generate record
    files = write_report(recs, tmp_path / "s.md", tmp_path, title="T")
    names = {f.name for f in files}
    assert names == {"s.md", "heatmap_passkey_x-raw-logprob.png", "heatmap_passkey_x-raw-logprob_logprob.png",
                     "heatmap_passkey_x-raw.png"}  # the generate group has no log-prob heatmap
    md = (tmp_path / "s.md").read_text()
    iv = t_interval(lps["dpe"])
    assert f"50% (2/4), 3.0 s; log-prob {iv.mean:.2f} [{iv.low:.2f}, {iv.high:.2f}]" in md
    assert "scoring `logprob`" in md and "scoring `generate`" in md  # separate tables
    assert "95% Student-t interval" in md
