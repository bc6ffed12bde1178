"""Calibration tools (dpe_kernels.calibrate, `dpe select-dims`, `dpe detect`) on a tiny random Llama."""
import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from dpe_kernels import DPEConfig  # noqa: E402
from dpe_kernels.tools import cli  # noqa: E402
from dpe_kernels.tools import calibrate as C  # noqa: E402
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


def test_sweep_and_tie_break():
    cfgs = C.sweep_configs(2, [1, 2, 4], default=2)
    assert [c[2] for c in cfgs] == [(1, 2), (2, 2), (4, 2), (2, 1), (2, 2), (2, 4)]
    assert C.default_sweep_scale(16384, 8192) == 4 and C.default_sweep_scale(10000, 8192) == 3
    recs = [
        {"scales": [1, 2], "score": 0.5}, {"scales": [2, 2], "score": 0.5}, {"scales": [4, 2], "score": 0.5},
        {"scales": [2, 1], "score": 0.2}, {"scales": [2, 4], "score": 0.9}, {"scales": [2, 4], "score": 0.7},
    ]
    # group 0: three-way tie -> the default 2; group 1: best mean 0.8 at 4
    assert C.pick_scales(recs, 2, [1, 2, 4], default=2) == [2, 4]
    # tie between 1 and 4 at equal log2 distance from 2 -> the smaller
    recs2 = [{"scales": [1, 2], "score": 1.0}, {"scales": [4, 2], "score": 1.0}, {"scales": [2, 2], "score": 0.0},
             {"scales": [2, 1], "score": 0.0}, {"scales": [2, 4], "score": 0.0}]
    assert C.pick_scales(recs2, 2, [1, 2, 4], default=2)[0] == 1
    with pytest.raises(ValueError, match="group 1"):
        C.pick_scales([recs[0], recs[2]], 2, [1, 2, 4], default=2)


def test_detect_resumes_and_scores_each_config_once(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    calls = []
    real = C._score_one

    def counting(*a, **k):
        calls.append(a[2:5])
        return real(*a, **k)

    monkeypatch.setattr(C, "_score_one", counting)
    jsonl = tmp_path / "sweep.jsonl"
    kw = dict(target_length=320, train_length=256, scales=[1, 2, 4], scorer="ppl", window=32, num_groups=2,
              jsonl=jsonl, progress=False, log=None)
    model_pairs = 8
    cfg, recs = C.detect(model, tok, **kw)
    # default 2 * 320 / 256 -> 3; 2 groups x 3 scales, no repeated configuration (3 is not swept)
    assert len(calls) == 6 and len(recs) == 6
    assert isinstance(cfg, DPEConfig) and cfg.num_pairs == model_pairs and len(cfg.scales) == 2
    assert list(cfg.scales) == C.pick_scales(recs, 2, [1, 2, 4], default=3)
    lines = [json.loads(x) for x in jsonl.read_text().splitlines()]
    assert len(lines) == 6 and all(x["scorer"] == "ppl" for x in lines)
    # rerun: everything is read back, nothing is scored again
    calls.clear()
    cfg2, recs2 = C.detect(model, tok, **kw)
    assert calls == [] and list(cfg2.scales) == list(cfg.scales)
    # an interruption cut the last record mid-line: it is scored again, and the new record is
    # not glued onto the cut line (all 6 configurations read back on the next run)
    text = jsonl.read_text()
    jsonl.write_text(text[:-20])
    calls.clear()
    C.detect(model, tok, **kw)
    assert len(calls) == 1
    calls.clear()
    C.detect(model, tok, **kw)
    assert calls == []
    # a default that is swept too: (3, 3) is met by both groups, scored once
    calls.clear()
    C.detect(model, tok, **{**kw, "scales": [1, 3], "jsonl": tmp_path / "b.jsonl"})
    assert len(calls) == 3


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


def test_cli_select_dims_and_detect(tmp_path, capsys):
    dims = tmp_path / "dims.safetensors"
    assert cli.main(["select-dims", "--model", "tiny-random-llama", "--lengths", "64", "--samples", "1",
                     "--out", str(dims), "--no-progress"]) == 0
    out = tmp_path / "cfg.json"
    assert cli.main(["detect", "--model", "tiny-random-llama", "--target-length", "320", "--scales", "1", "2",
                     "--window", "32", "--mask", f"{dims}:kv", "--out", str(out), "--no-progress"]) == 0
    cfg = DPEConfig.from_json(out)
    assert cfg.mask is not None and cfg.mask.shape == (2, 2, 8) and len(cfg.scales) == 8
    assert (tmp_path / "cfg.jsonl").is_file()
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
    assert e.value.code == 2 and "--mask must be FILE" in capsys.readouterr().err
