"""Calibration tools (dpe_kernels.tools.calibrate, `dpe select-dims`, `dpe detect`) on a tiny random Llama."""
import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from dpe_kernels import DPEConfig  # noqa: E402
from dpe_kernels.tools import cli  # noqa: E402
from dpe_kernels.tools import calibrate as C  # noqa: E402
from dpe_kernels.tools.calibrate import ascent  # noqa: E402  (detect calls its score_sample)
from dpe_kernels.tools.calibrate.claims import Claims  # noqa: E402
from dpe_kernels.integrations.hf import apply_dpe, find_attention_modules  # noqa: E402
from dpe_kernels.tools.models import tiny_random_llama  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    return tiny_random_llama(layers=3)


def _full_qk(model, ids):
    """Every layer's whole pre-RoPE q [S, H_q, D] and k [S, H_k, D] (the test's independent capture)."""
    attn = find_attention_modules(model)
    qs, ks, hs = {}, {}, []
    for i, m in enumerate(attn):
        hs.append(m.q_proj.register_forward_hook(lambda mod, a, o, i=i: qs.__setitem__(i, o[0].clone())))
        hs.append(m.k_proj.register_forward_hook(lambda mod, a, o, i=i: ks.__setitem__(i, o[0].clone())))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hs:
        h.remove()
    d = attn[0].head_dim
    return [(qs[i].view(ids.shape[1], -1, d).double(), ks[i].view(ids.shape[1], -1, d).double())
            for i in range(len(attn))]


def test_scores_match_definition(tiny):
    """C[l,h,i] = mean_t |q_t^(i)| |k_t^(i)| with k from KV head h // n_rep, averaged over the inputs."""
    model, _ = tiny
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randint(3, 250, (1, n), generator=g) for n in (37, 64)]
    got = C.key_dimension_scores(model, inputs)
    want = torch.zeros_like(got)
    for ids in inputs:
        for layer, (q, k) in enumerate(_full_qk(model, ids)):
            P = q.shape[-1] // 2
            qn = torch.hypot(q[..., :P], q[..., P:])
            kn = torch.hypot(k[..., :P], k[..., P:])
            rep = q.shape[1] // k.shape[1]
            want[layer] += (qn * kn.repeat_interleave(rep, dim=1)).mean(0)
    want /= len(inputs)
    assert got.shape == (3, 4, 8)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # gptj pairs (2i, 2i+1) give other numbers on the same inputs
    assert not torch.allclose(C.key_dimension_scores(model, inputs, layout="gptj"), got)


def test_hooks_removed_and_bad_inputs(tiny):
    model, _ = tiny
    attn = find_attention_modules(model)
    C.key_dimension_scores(model, [torch.randint(3, 250, (1, 8))])
    assert not attn[0].q_proj._forward_hooks and not attn[0].k_proj._forward_hooks
    with pytest.raises(ValueError, match="no input texts"):
        C.key_dimension_scores(model, [])
    with pytest.raises(ValueError, match=r"\[1, S\]"):
        C.key_dimension_scores(model, [torch.randint(3, 250, (2, 8))])
    with pytest.raises(ValueError, match="layout"):
        C.key_dimension_scores(model, [torch.randint(3, 250, (1, 8))], layout="bad")
    assert not attn[0].q_proj._forward_hooks  # removed after an error too


def test_top_k_masks():
    s = torch.tensor([[[5.0, 1.0, 3.0, 2.0], [0.0, 4.0, 1.0, 9.0]]])  # [L=1, H_q=2, P=4]
    m = C.top_k_masks(s, 2, heads_k=1)
    assert m["mask"].tolist() == [[[True, False, True, False], [False, True, False, True]]]
    torch.testing.assert_close(m["scores_kv"], torch.tensor([[[2.5, 2.5, 2.0, 5.5]]]))
    assert m["mask_kv"].tolist() == [[[True, True, False, True]]] or m["mask_kv"].sum() == 2
    assert int(m["mask_kv"].sum()) == 2 and bool(m["mask_kv"][0, 0, 3])
    for bad in (0, 5, 2.0, True):
        with pytest.raises(ValueError, match="top_k"):
            C.top_k_masks(s, bad, heads_k=1)
    with pytest.raises(ValueError, match="heads_k"):
        C.top_k_masks(s, 2, heads_k=3)
    with pytest.raises(ValueError, match="scores"):
        C.top_k_masks(s[0], 2, heads_k=1)


def test_select_dims_file_and_mask_runs(tiny, tmp_path):
    model, tok = tiny
    out = tmp_path / "dims.safetensors"
    res = C.select_dims(model, tok, lengths=[64, 96], samples=2, out=out, progress=False)
    assert res["mask"].shape == (3, 4, 8) and res["mask_kv"].shape == (3, 2, 8)
    assert (res["mask"].sum(-1) == 6).all() and (res["mask_kv"].sum(-1) == 6).all()  # round(0.75 * 8)
    for which, h in (("q", 4), ("kv", 2)):
        mask = C.load_dims_mask(out, which)
        assert mask.dtype == torch.bool and mask.shape == (3, h, 8)
        cfg = DPEConfig.uniform(16, [2] * 8, 8, mask=mask)
        handle = apply_dpe(model, cfg)
        try:
            with torch.no_grad():
                logits = model(input_ids=torch.randint(3, 250, (1, 80)), use_cache=False).logits
        finally:
            handle.remove()
        assert torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="which"):
        C.load_dims_mask(out, "x")
    with pytest.raises(ValueError, match="samples"):
        C.select_dims(model, tok, lengths=[64], samples=0, progress=False)
    with pytest.raises(ValueError, match="lengths"):
        C.select_dims(model, tok, lengths=[], progress=False)


# ----------------------------------------------------------------------------- step 2: coordinate ascent
def _table_score(table, calls=None):
    """score(cfg, samples) from a dict cfg -> per-sample scores (sample i -> table[cfg][i])."""
    def score(cfg, idx):
        if calls is not None:
            calls.append((tuple(cfg), tuple(idx)))
        return [table[tuple(cfg)][i] for i in idx]
    return score


def test_self_extend_start():
    assert C.self_extend_scales(16384, 8192, 8) == [4] * 8
    assert C.self_extend_scales(32768, 8192, 8) == [8] * 8
    assert C.self_extend_scales(10000, 8192, 2) == [4, 4]  # 2 * ceil(1.22), as Self-Extend's G


def test_ascent_accepts_only_beyond_the_standard_error():
    start = (4, 4)
    base = [0.0, 1.0, 2.0, 3.0]
    table = {
        (4, 4): base,
        # group 0: scale 2 gains +1 on average but noisily (d = +3, -1, +3, -1: se 1.15) -> rejected;
        #          scale 8 gains a steady +0.5 (se 0)                                        -> accepted
        (2, 4): [3.0, 0.0, 5.0, 2.0],
        (8, 4): [0.5, 1.5, 2.5, 3.5],
        (8, 2): [0.5, 1.5, 2.5, 3.5],       # group 1 from (8, 4): no gain at all -> kept
        (8, 8): [0.4, 1.5, 2.5, 3.5],
    }
    for cfg in list(table):
        table[cfg] = table[cfg] + [9.0] * 4  # fresh samples 4..7 (used by the final check)
    table[(8, 4)][4:] = [9.5] * 4
    trace = C.coordinate_ascent(_table_score(table), start, [2, 4, 8], [0, 1, 2, 3], [4, 5, 6, 7], max_passes=3)
    first = trace["steps"][0]
    cands = {c["scale"]: c for c in first["candidates"]}
    assert cands[2]["gain"] == pytest.approx(1.0) and not cands[2]["accepted"]
    assert cands[2]["se"] == pytest.approx(2 / 3 ** 0.5 * 1.0)  # sd of (3, -1, 3, -1) = 2.309, / sqrt 4
    assert cands[8]["accepted"] and first["chosen"] == 8
    assert trace["steps"][1]["chosen"] is None
    assert trace["final"] == [8, 4] and trace["passes"] == 2 and trace["converged"]
    assert trace["fresh"]["kept"] == "final" and trace["kept"] == [8, 4]
    assert trace["fresh"]["gain"] == pytest.approx(0.5)


def test_ascent_sweeps_with_the_current_scales_and_repeats_passes():
    """Group 1's best depends on group 0: only the second pass, run because the first changed
    something, finds the joint optimum; every configuration is scored with the current scales."""
    def f(cfg):
        a, b = cfg
        return {(1, 1): 0, (2, 1): 1, (1, 2): -1, (2, 2): 3, (4, 1): 0, (4, 2): 2, (1, 4): -2, (2, 4): 1,
                (4, 4): 4}.get((a, b), -5)

    table = {}
    for a in (1, 2, 4):
        for b in (1, 2, 4):
            table[(a, b)] = [f((a, b)) + e for e in (0.0, 0.1, -0.1, 0.05)] + [f((a, b))] * 2
    calls = []
    trace = C.coordinate_ascent(_table_score(table, calls), (1, 1), [1, 2, 4], [0, 1, 2, 3], [4, 5], max_passes=5)
    # pass 1: group 0 from (1, 1) -> 2 (+1; 4 gives 0); group 1 from (2, 1) -> 2 (+2; 4 gives 0)
    # pass 2: group 0 from (2, 2) -> 4 (2 -> ... (4, 2) = 2 < 3: kept); group 1 from (2, 2): (2, 4) = 1 kept
    chosen = [(s["pass"], s["group"], s["incumbent"], s["chosen"]) for s in trace["steps"]]
    assert chosen[:2] == [(1, 0, [1, 1], 2), (1, 1, [2, 1], 2)]
    assert trace["final"] == [2, 2] and trace["passes"] == 2 and trace["converged"]
    scored = {c for c, _ in calls}
    assert (2, 4) in scored and (1, 4) not in scored  # group 1 was swept with group 0 at its current 2
    # the bound on passes holds even when every pass changes something
    t1 = C.coordinate_ascent(_table_score(table), (1, 1), [1, 2, 4], [0, 1, 2, 3], [4, 5], max_passes=1)
    assert t1["passes"] == 1 and not t1["converged"] and t1["final"] == [2, 2]


def test_ascent_keeps_the_start_when_fresh_samples_disagree():
    table = {(4, 4): [0.0, 0.0, 0.0, 5.0, 5.0], (8, 4): [1.0, 1.0, 1.0, 4.0, 4.0], (8, 8): [0.0] * 5,
             (8, 2): [0.0] * 5, (2, 4): [-1.0] * 5}
    trace = C.coordinate_ascent(_table_score(table), (4, 4), [2, 4, 8], [0, 1, 2], [3, 4])
    assert trace["final"] == [8, 4]                   # better on the sweep's samples...
    assert trace["fresh"]["kept"] == "start" and trace["kept"] == [4, 4]  # ...worse on fresh ones
    # nothing accepted: the start is kept without a fresh comparison
    flat = {k: [0.0] * 5 for k in table}
    flat.update({(2, 2): [0.0] * 5, (4, 2): [0.0] * 5, (4, 8): [0.0] * 5})
    t = C.coordinate_ascent(_table_score(flat), (4, 4), [2, 4, 8], [0, 1, 2], [3, 4])
    assert t["kept"] == [4, 4] and t["fresh"] is None and t["passes"] == 1


def _accepting_table():
    """The table of test_ascent_accepts_only_beyond_the_standard_error (start (4, 4), scales 2 4 8,
    sweep samples 0-3, fresh 4-7): group 0 moves to 8, group 1 stays, the final is kept."""
    table = {(4, 4): [0.0, 1.0, 2.0, 3.0], (2, 4): [3.0, 0.0, 5.0, 2.0], (8, 4): [0.5, 1.5, 2.5, 3.5],
             (8, 2): [0.5, 1.5, 2.5, 3.5], (8, 8): [0.4, 1.5, 2.5, 3.5]}
    for cfg in list(table):
        table[cfg] = table[cfg] + [9.0] * 4
    table[(8, 4)][4:] = [9.5] * 4
    return table


def test_sweep_frontier_follows_the_ascent():
    """Filled from the far end, as a worker does, the frontier always names what the ascent needs
    before its next decision, and the records it led to give the ascent's own result."""
    table = _accepting_table()
    kw = dict(target_length=16384, train_length=8192, scales=[2, 4, 8], samples=4, fresh_samples=4,
              max_passes=3, num_groups=2)
    records = []
    frontiers = []
    while True:
        f = C.sweep_frontier(records, **kw)
        if not f:
            break
        frontiers.append(f)
        assert len(frontiers) < 100
        cfg, i = f[-1]
        records.append({"scales": list(cfg), "sample": i, "score": table[cfg][i]})
    assert frontiers[0] == [((4, 4), j) for j in range(4)]                      # the start's samples
    assert frontiers[4] == [((2, 4), j) for j in range(4)] + [((8, 4), j) for j in range(4)]  # group 0
    assert frontiers[12] == [((8, 2), j) for j in range(4)] + [((8, 8), j) for j in range(4)]  # group 1
    assert frontiers[-1] == [((8, 4), 4)]                                        # the fresh comparison's last
    assert all(len(b) == len(a) - 1 for a, b in zip(frontiers, frontiers[1:]) if len(b) < len(a))
    want = C.coordinate_ascent(_table_score(table), (4, 4), [2, 4, 8], [0, 1, 2, 3], [4, 5, 6, 7], max_passes=3)
    got = C.replay(records, **kw)
    assert got["pending"] is None and got["kept"] == want["kept"] == [8, 4] and got["steps"] == want["steps"]
    # records of another setting are not this run's (base), and nothing is needed twice
    other = [{**r, "scorer": "ppl"} for r in records]
    assert C.sweep_frontier(other, **kw, base={"scorer": "passkey-logprob"})[0] == ((4, 4), 0)
    assert len({(tuple(r["scales"]), r["sample"]) for r in records}) == len(records)


def test_claims_count_only_while_their_process_lives_and_not_for_ever(tmp_path):
    import os
    import time

    jsonl = tmp_path / "r.jsonl"
    claims = Claims(jsonl, ttl_s=3600)
    claims.claim((4, 4), 0)                                   # this process's own: not another's
    lines = [{"scales": [2, 4], "sample": 1, "pid": os.getppid(), "epoch": time.time()},         # live
             {"scales": [8, 4], "sample": 1, "pid": os.getppid(), "epoch": time.time() - 7200},  # too old
             {"scales": [2, 4], "sample": 2, "pid": 2 ** 22 + 12345, "epoch": time.time()},      # no process
             {"scales": [2, 4], "sample": 3, "pid": os.getppid()}]                                 # no time
    with open(claims.path, "a") as f:
        f.writelines(json.dumps(x) + "\n" for x in lines)
    assert claims.live() == {((2, 4), 1)}


_WORKER = """
import sys, time, torch
from dpe_kernels.tools import calibrate as C
from dpe_kernels.tools.calibrate import ascent
from dpe_kernels.tools.models import tiny_random_llama
torch.set_num_threads(1)
model, tok = tiny_random_llama(layers=3)
real = C.score_sample
def slow(*a, **k):  # its claims stay live a while: the main one meets them
    time.sleep(0.4)
    return real(*a, **k)
ascent.score_sample = slow  # the one detect calls
kw = dict(target_length=320, train_length=256, scales=[2, 4], scorer="passkey-logprob", samples=2, fresh_samples=2,
          max_passes=2, window=32, num_groups=2, progress=False, log=None)
res = C.detect(model, tok, jsonl=sys.argv[1], worker=True, poll_s=0.05, **kw)
assert res is None
print("worker done")
"""


def _decisions(steps):
    return [(s["pass"], s["group"], s["incumbent"], s["chosen"], [(c["scale"], c["accepted"]) for c in s["candidates"]])
            for s in steps]


def test_detect_with_a_worker_process(tiny, tmp_path, monkeypatch):
    """A worker process and the main one share one ascent: no (configuration, sample) is scored
    twice, the worker scores some, and the decisions are those of a run alone."""
    import os
    import signal
    import subprocess
    import sys
    import time

    model, tok = tiny
    kw = dict(target_length=320, train_length=256, scales=[2, 4], scorer="passkey-logprob", samples=2,
              fresh_samples=2, max_passes=2, window=32, num_groups=2, progress=False, log=None)
    alone = C.detect(model, tok, jsonl=tmp_path / "alone.jsonl", **kw)
    jsonl = tmp_path / "shared.jsonl"
    worker = subprocess.Popen([sys.executable, "-c", _WORKER, str(jsonl)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        claims = tmp_path / "shared.jsonl.claims"
        deadline = time.time() + 120
        while not claims.exists() and time.time() < deadline and worker.poll() is None:
            time.sleep(0.05)  # the worker starts first: with no records it takes the start's last sample
        assert claims.exists(), worker.communicate()[0] if worker.poll() is not None else "worker never claimed"
        real = C.score_sample

        def slow(*a, **k):  # both slow, so each meets the other's live claims
            time.sleep(0.3)
            return real(*a, **k)

        monkeypatch.setattr(ascent, "score_sample", slow)

        def hung(*_):
            raise TimeoutError("detect with a worker did not finish in 180 s")

        old = signal.signal(signal.SIGALRM, hung)  # a deadlock fails the test instead of hanging it
        signal.alarm(180)
        try:
            shared = C.detect(model, tok, jsonl=jsonl, poll_s=0.05, **kw)
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
        out, _ = worker.communicate(timeout=120)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert worker.returncode == 0 and "worker done" in out, out
    assert shared.trace["kept"] == alone.trace["kept"]
    # The same decisions; the numbers behind them agree to float noise (two processes may sum in
    # different orders: the records' own scores are compared to 1e-5 below).
    assert _decisions(shared.trace["steps"]) == _decisions(alone.trace["steps"])
    for a, b in zip(shared.trace["steps"], alone.trace["steps"]):
        assert a["incumbent_mean"] == pytest.approx(b["incumbent_mean"], abs=1e-5)
        for ca, cb in zip(a["candidates"], b["candidates"]):
            assert (ca["mean"], ca["gain"], ca["se"]) == pytest.approx((cb["mean"], cb["gain"], cb["se"]), abs=1e-5)
    lines = [json.loads(x) for x in jsonl.read_text().splitlines()]
    keys = [(tuple(r["scales"]), r["sample"]) for r in lines]
    assert len(keys) == len(set(keys)) == len(alone.records)  # nothing scored twice, nothing missing
    by_worker = {(tuple(c["scales"]), c["sample"]) for c in map(json.loads, claims.read_text().splitlines())
                 if c["pid"] == worker.pid}
    assert by_worker and by_worker <= set(keys) and len(by_worker) < len(keys)
    alone_scores = {(tuple(r["scales"]), r["sample"]): r["score"] for r in alone.records}
    assert all(r["score"] == pytest.approx(alone_scores[(tuple(r["scales"]), r["sample"])], abs=1e-5) for r in lines)


def test_ascent_bad_input():
    with pytest.raises(ValueError, match="at least 2 samples"):
        C.coordinate_ascent(lambda c, i: [0.0] * len(i), (4,), [2, 4], [0], [1])
    with pytest.raises(ValueError, match="max_passes"):
        C.coordinate_ascent(lambda c, i: [0.0] * len(i), (4,), [2, 4], [0, 1], [2], max_passes=0)


def test_detect_logprob_resumes_and_replays(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    calls = []
    real = C.score_sample

    def counting(*a, **k):
        calls.append(a[2:5])
        return real(*a, **k)

    monkeypatch.setattr(ascent, "score_sample", counting)
    jsonl = tmp_path / "sweep.jsonl"
    kw = dict(target_length=320, train_length=256, scales=[2, 4], scorer="passkey-logprob", samples=2,
              fresh_samples=2, max_passes=2, window=32, num_groups=2, jsonl=jsonl, progress=False, log=None)
    res = C.detect(model, tok, **kw)
    n = len(calls)
    lines = [json.loads(x) for x in jsonl.read_text().splitlines()]
    assert len(lines) == n == len(res.records)
    assert len({(tuple(r["scales"]), r["sample"]) for r in lines}) == n
    r0 = lines[0]
    assert r0["scales"] == [4, 4] and r0["scorer"] == "passkey-logprob" and r0["dtype"] == "float32"
    assert r0["score"] == pytest.approx(sum(r0["token_logprobs"]), abs=1e-4)  # recomputable from the record
    assert r0["exact"] in (0.0, 1.0) and len(r0["token_argmax"]) == len(r0["answer_tokens"])
    assert isinstance(res.config, DPEConfig) and res.config.calibrated_length == 320
    assert list(res.config.scales) == res.trace["kept"] and res.trace["start"] == [4, 4]
    # the trace is recomputed from the records alone, the same
    rep = C.replay(lines, target_length=320, train_length=256, scales=[2, 4], samples=2, fresh_samples=2,
                   max_passes=2, num_groups=2)
    assert rep["pending"] is None and rep["kept"] == res.trace["kept"] and rep["steps"] == res.trace["steps"]
    # rerun: nothing is scored again
    calls.clear()
    res2 = C.detect(model, tok, **kw)
    assert calls == [] and res2.trace["kept"] == res.trace["kept"]
    # an interruption cut the last record mid-line: it alone is scored again, on its own line
    jsonl.write_text(jsonl.read_text()[:-20])
    calls.clear()
    C.detect(model, tok, **kw)
    assert len(calls) == 1
    calls.clear()
    C.detect(model, tok, **kw)
    assert calls == []
    # a partial run: replay says which (configuration, sample) comes next
    part = C.replay(lines[:3], target_length=320, train_length=256, scales=[2, 4], samples=2, max_passes=2,
                    num_groups=2)
    assert part["pending"] == {"scales": lines[3]["scales"], "sample": lines[3]["sample"]}
    # another setting (scorer) does not reuse these records
    calls.clear()
    C.detect(model, tok, **{**kw, "scorer": "ppl", "max_passes": 1})
    assert calls and all(c[0] == "ppl" for c in calls)


def test_detect_multi_needle(tiny, tmp_path):
    """With needles a sample is a context: the ascent pairs needle scores with standard errors over
    contexts, the records hold every needle's score, and the run resumes from them."""
    model, tok = tiny
    jsonl = tmp_path / "multi.jsonl"
    kw = dict(target_length=700, train_length=256, scales=[2, 4], scorer="passkey-logprob", samples=2,
              fresh_samples=2, max_passes=1, window=32, num_groups=2, jsonl=jsonl, progress=False, log=None,
              needles=3)
    res = C.detect(model, tok, **kw)
    lines = [json.loads(x) for x in jsonl.read_text().splitlines()]
    assert lines and all(r["needles"] == 3 and len(r["needle_scores"]) == 3 and r["device"] == "cpu" for r in lines)
    for r in lines:
        assert r["score"] == pytest.approx(sum(r["needle_scores"]) / 3)
    step = res.trace["steps"][0]
    cand = step["candidates"][0]
    cur = {r["sample"]: r["needle_scores"] for r in lines if r["scales"] == step["incumbent"]}
    cfg = [cand["scale"]] + step["incumbent"][1:]
    new = {r["sample"]: r["needle_scores"] for r in lines if r["scales"] == cfg}
    from dpe_kernels.tools.eval.stats import cluster_paired_gain

    want = cluster_paired_gain([new[i] for i in (0, 1)], [cur[i] for i in (0, 1)])
    assert (cand["gain"], cand["se"]) == pytest.approx(want)
    rep = C.replay(lines, target_length=700, train_length=256, scales=[2, 4], samples=2, fresh_samples=2,
                   max_passes=1, num_groups=2, base={"needles": 3})
    assert rep["pending"] is None and rep["steps"] == res.trace["steps"]
    # single-needle records are not reused for it, and it resumes from its own
    n = len(lines)
    C.detect(model, tok, **kw)
    assert len(jsonl.read_text().splitlines()) == n
    with pytest.raises(ValueError, match="needles"):
        C.detect(model, tok, **{**kw, "scorer": "ppl"})


def test_one_needle_contexts_walk_the_depths(tiny):
    """With one needle per context the samples are not all at one depth: context i is the evaluation's
    sample i // 10 at depth (i % 10 + 0.5) / 10 (series_context), the very prompt `dpe eval --needles 1`
    scores there."""
    model, tok = tiny
    recs = {i: C.score_sample(model, tok, "passkey-logprob", 2000, i, 256, needles=1) for i in (0, 4, 9, 14)}
    assert [recs[i]["needle_depths"][0] for i in (0, 4, 9)] == pytest.approx([0.05, 0.45, 0.95], abs=0.1)
    from dpe_kernels.tools.eval.multi import multi_logprob

    want = multi_logprob(model, tok, "passkey", 2000, 0.45, 1, sample=1)[0]
    got = recs[14]
    assert (got["answers"], got["labels"], got["needle_depths"]) == ([want["answer"]], [want["needle_label"]],
                                                                    [want["needle_depth"]])
    assert got["needle_scores"][0] == pytest.approx(want["logprob"], abs=1e-5)
    assert recs[4]["answers"] == recs[0]["answers"] != recs[14]["answers"]  # one key per ten depths


def test_start_records_from_eval_are_the_starts_own_scores(tiny, tmp_path):
    """dpe eval's self_extend records at the target (N=2 needles, the 5 depth shifts, one sample) become
    the ascent start's records: equal to what detect scores itself, and a run seeded with them scores
    nothing again; records of another setting (window, length, method) are not taken."""
    from dpe_kernels.tools.eval.multi import series_context
    from dpe_kernels.tools.eval.runner import EvalSpec, read_records, run_eval

    model, tok = tiny
    target, train, n = 1500, 256, 2
    shifts = [series_context(k, n)[1] for k in range(5)]
    spec = EvalSpec(task="passkey", methods=("self_extend", "rope"), lengths=(target,), depths=shifts, samples=1,
                    scoring="logprob", needles=n, train_length=train, model_name="tiny")
    run_eval(model, tok, spec, tmp_path / "eval.jsonl", progress=False)
    evals = read_records(tmp_path / "eval.jsonl")
    kw = dict(scorer="passkey-logprob", target_length=target, train_length=train, window=1024, num_groups=2,
              needles=n, samples=3, fresh_samples=2)
    recs = C.start_records_from_eval(evals, **kw)
    assert [r["sample"] for r in recs] == [0, 1, 2, 3, 4] and [r["phase"] for r in recs] == ["sweep"] * 3 + ["fresh"] * 2
    assert C.start_records_from_eval(evals, **{**kw, "window": 512}) == []
    assert C.start_records_from_eval(evals, **{**kw, "target_length": 1400}) == []
    assert [r["sample"] for r in C.start_records_from_eval(evals, **kw, skip=[1, 3])] == [0, 2, 4]
    assert C.start_records_from_eval([e for e in evals if (e["sample"], e["depth"], e["needle"]) != (0, shifts[2], 1)],
                                     **kw)[2]["sample"] == 3  # a context needs all its needles
    start = C.self_extend_scales(target, train, 2)
    det = dict(target_length=target, train_length=train, scales=start[:1], scorer="passkey-logprob", samples=3,
               fresh_samples=2, max_passes=1, window=1024, num_groups=2, progress=False, log=None, needles=n)
    own = C.detect(model, tok, jsonl=tmp_path / "own.jsonl", **det)
    assert sorted(r["sample"] for r in own.records) == [0, 1, 2]
    for r in own.records:  # the start's sweep contexts, scored by detect itself
        got = next(x for x in recs if x["sample"] == r["sample"])
        assert (got["labels"], got["answers"]) == (r["labels"], r["answers"])
        assert got["needle_scores"] == pytest.approx(r["needle_scores"], abs=1e-5)
    seeded = tmp_path / "seeded.jsonl"
    seeded.write_text("".join(json.dumps(r) + "\n" for r in recs))
    C.detect(model, tok, jsonl=seeded, **det)
    assert len(seeded.read_text().splitlines()) == len(recs)  # nothing scored again


def test_score_sample_logprob_fields(tiny):
    model, tok = tiny
    r = C.score_sample(model, tok, "niah-logprob", 1200, 1, 256)
    assert len(r["span_logprobs"]) == 4 and r["score"] == pytest.approx(sum(r["span_logprobs"]) / 4)
    assert r["depth"] == 0.5 and r["exact"] == sum(r["span_exact"]) / 4
    assert C.scorer_sample("passkey-logprob", 7)["depth"] == 0.5 and C.scorer_sample("ppl", 3) == {"text": 3}


def test_detect_bad_input(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="scorer"):
        C.detect(model, tok, target_length=300, scorer="bleu", progress=False)
    with pytest.raises(ValueError, match="target_length"):
        C.detect(model, tok, target_length=0, progress=False)
    with pytest.raises(ValueError, match="scales"):
        C.detect(model, tok, target_length=300, scales=[0, 2], progress=False)
    with pytest.raises(ValueError, match="equal groups"):
        C.detect(model, tok, target_length=300, num_groups=3, progress=False)
    with pytest.raises(ValueError, match="samples must be >= 2"):
        C.detect(model, tok, target_length=300, samples=1, progress=False)
    with pytest.raises(ValueError, match="max_passes"):
        C.detect(model, tok, target_length=300, max_passes=0, progress=False)
    with pytest.raises(ValueError, match="needs jsonl"):
        C.detect(model, tok, target_length=300, worker=True, progress=False)
    with pytest.raises(ValueError, match="poll_s"):
        C.detect(model, tok, target_length=300, poll_s=0, progress=False)


def test_cli_select_dims_and_detect(tmp_path, capsys):
    dims = tmp_path / "dims.safetensors"
    assert cli.main(["select-dims", "--model", "tiny-random-llama", "--lengths", "64", "--samples", "1",
                     "--out", str(dims), "--no-progress"]) == 0
    out = tmp_path / "cfg.json"
    assert cli.main(["detect", "--model", "tiny-random-llama", "--target-length", "320", "--scales", "1", "2",
                     "--window", "32", "--samples", "2", "--max-passes", "1", "--mask", f"{dims}:kv", "--out", str(out),
                     "--no-progress"]) == 0
    cfg = DPEConfig.from_json(out)
    assert cfg.mask is not None and cfg.mask.shape == (2, 2, 8) and len(cfg.scales) == 8
    assert (tmp_path / "cfg.jsonl").is_file() and cfg.calibrated_length == 320
    trace = json.loads((tmp_path / "cfg.trace.json").read_text())
    assert trace["kept"] == list(cfg.scales) and trace["start"] == [4] * 8 and trace["masked"]
    # the config drives `dpe eval`
    assert cli.main(["eval", "--model", "tiny-random-llama", "--task", "ppl", "--methods", "dpe", "--lengths", "300",
                     "--samples", "1", "--config", str(out), "--out-dir", str(tmp_path / "ev"), "--no-plots",
                     "--no-progress"]) == 0
    rec = json.loads((tmp_path / "ev" / "results.jsonl").read_text().splitlines()[0])
    assert "mask" in rec["params"]


@pytest.mark.parametrize("cmd", ["select-dims", "detect"])
def test_cli_calibration_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([cmd, "--help"])
    assert e.value.code == 0 and "usage" in capsys.readouterr().out


def test_calibrated_presets(tiny, tmp_path, monkeypatch, capsys):
    """A config JSON in dpe_kernels/presets/ is a --preset name (with its mask) for eval and demo."""
    import dpe_kernels.config
    from dpe_kernels.tools.eval import methods as M

    model, _ = tiny
    monkeypatch.setattr(dpe_kernels.config, "PRESET_DIR", tmp_path)
    mask = torch.zeros(2, 4, 8, dtype=torch.bool)
    mask[..., :6] = True
    DPEConfig.uniform(32, [1, 2, 2, 4, 4, 8, 8, 8], 8, mask=mask).to_json(tmp_path / "tiny-cal.json")
    assert "tiny-cal" in M.preset_names() and "llama3-8b" in M.preset_names()
    cfg = M.dpe_config_for(model, 300, 256, preset="tiny-cal")
    assert list(cfg.scales) == [1, 2, 2, 4, 4, 8, 8, 8] and torch.equal(cfg.mask, mask)
    with pytest.raises(ValueError, match="unknown DPE preset 'nope'"):
        M.dpe_config_for(model, 300, 256, preset="nope")
    with pytest.raises(ValueError, match="unknown calibrated preset"):
        M.load_preset("nope")
    DPEConfig.uniform(32, [2] * 4, 16).to_json(tmp_path / "wide.json")
    with pytest.raises(ValueError, match="covers 16 pairs"):
        M.dpe_config_for(model, 300, 256, preset="wide")
    assert cli.main(["demo", "--model", "tiny-random-llama", "--length", "300", "--methods", "dpe",
                     "--preset", "tiny-cal"]) == 0
    assert "scales [1, 2, 2, 4, 4, 8, 8, 8], mask" in capsys.readouterr().out


@pytest.mark.parametrize("cmd", ["eval", "detect"])
def test_cli_bad_mask_argument(cmd, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([cmd, "--model", "tiny-random-llama", "--mask", str(tmp_path / "missing.safetensors"),
                  "--out-dir" if cmd == "eval" else "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "argument --mask: must be FILE" in capsys.readouterr().err
