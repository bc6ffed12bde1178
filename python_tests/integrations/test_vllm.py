"""The vLLM plugin (dpe_kernels.integrations.vllm) against vLLM 0.32 on the CPU.

Runs in the vLLM virtual environment (python_tests/integrations/run_vllm_tests.sh); skipped where vLLM
is not installed. Every engine runs in its own process (vLLM spawns workers; one DPE
configuration per process) through ``dpe_kernels.integrations.vllm.testing``; the Hugging Face
reference (``apply_dpe``, float32) runs in the test process.

Tolerance (float32 model, float32 KV cache, stated once): natural-log probabilities of the prompt
tokens and of the generated tokens agree with the Hugging Face integration within LP_ATOL; greedy
tokens are identical. (Measured here: 2e-5 to 4e-5; the two paths sum attention in different
orders. A wrong position or a missed rotation moves them by more than 1e-2, which
test_reference_sees_dpe checks.)
"""
import warnings
from types import SimpleNamespace

import pytest
import torch

vllm = pytest.importorskip("vllm")
transformers = pytest.importorskip("transformers")

from dpe_kernels import DPEConfig  # noqa: E402
from dpe_kernels.integrations.vllm import CPU_BACKEND_PATH  # noqa: E402
from dpe_kernels.integrations.vllm.backend import rank_head_slices  # noqa: E402
from dpe_kernels.integrations.vllm.settings import check_engine, parse_options  # noqa: E402
from dpe_kernels.integrations.vllm import testing  # noqa: E402
from dpe_kernels.integrations.vllm.testing import (  # noqa: E402
    CACHE, hf_reference, run_engine_subprocess, tiny_llama_dir, token_prompts)

LP_ATOL = 2e-4
# With the plugin loaded but no "dpe" key the engine runs vLLM's own classes: the same tokens as vLLM
# without the plugin, log-probs within RUN_TO_RUN (the developer's venv measured 0.0; a fresh clone
# on a loaded machine 4.4e-6: float32 log-probs of two separate engine runs, threaded reductions).
RUN_TO_RUN = 1e-4
WINDOW = 128  # small, so that prompts of a few hundred tokens reach far beyond it
ENGINE = dict(dtype="float32", enforce_eager=True, kv_cache_memory_bytes=1 << 29, max_model_len=2048,
              skip_tokenizer_init=True)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def smollm2_dir():
    from dpe_kernels.tools.models import ModelNotAvailableError

    try:
        return testing.smollm2_dir()
    except ModelNotAvailableError as e:
        pytest.skip(f"SmolLM2 not installed: {e}")


@pytest.fixture(scope="module")
def text_ids(smollm2_dir):
    tok = transformers.AutoTokenizer.from_pretrained(str(smollm2_dir), local_files_only=True)
    from dpe_kernels.tools.eval.data import load_essays  # the shipped Paul Graham essays

    return tok(load_essays()[:30000])["input_ids"]


@pytest.fixture(scope="module")
def dpe_file(tmp_path_factory):
    """The shipped SmolLM2 preset (per-query-head mask, 9 query / 3 KV heads) at window 128."""
    p = DPEConfig.from_preset("smollm2-135m")
    cfg = DPEConfig(WINDOW, p.group_boundaries, p.scales, p.mask)
    path = tmp_path_factory.mktemp("dpe") / "smollm2_w128.json"
    cfg.to_json(path)
    return cfg, str(path)


def _req(name, prompt, n=8, prompt_lp=True):
    return {"name": name, "prompt": list(prompt), "max_tokens": n, "prompt_logprobs": prompt_lp, "logprobs": True}


@pytest.fixture(scope="module")
def requests_main(text_ids):
    ids = text_ids
    return {
        "one_shot": [_req("a", ids[:600])],
        "batch": [_req("m1", ids[2000:2100], 60), _req("m2", ids[3000:3350]), _req("m3", ids[4000:4700])],
        # shares a's first 600 tokens (whole cached blocks), then its own tail; no prompt
        # log-probs (vLLM does not read the prefix cache for those)
        "prefix_hit": [_req("a_hit", ids[:600] + ids[9000:9040], 8, prompt_lp=False)],
    }


@pytest.fixture(scope="module")
def vllm_main(smollm2_dir, dpe_file, requests_main, tmp_path_factory):
    spec = {"llm": dict(ENGINE, model=str(smollm2_dir), enable_prefix_caching=True,
                        additional_config={"dpe": {"config": dpe_file[1]}}),
            "batches": [requests_main["one_shot"], requests_main["batch"], requests_main["prefix_hit"]]}
    return run_engine_subprocess(spec, tmp_path_factory.mktemp("engine"))["requests"]


@pytest.fixture(scope="module")
def hf_main(smollm2_dir, dpe_file, requests_main):
    reqs = [r for batch in requests_main.values() for r in batch]
    return hf_reference(smollm2_dir, reqs, dpe_config=dpe_file[0])


def _assert_same(got, want, name):
    assert got["tokens"] == want["tokens"], f"{name}: greedy tokens differ"
    d = max(abs(a - b) for a, b in zip(got["logprobs"], want["logprobs"]))
    assert d <= LP_ATOL, f"{name}: generated-token log-probs differ by {d:.3g}"
    if "prompt_logprobs" in got:
        assert len(got["prompt_logprobs"]) == len(want["prompt_logprobs"])
        d = max(abs(a - b) for a, b in zip(got["prompt_logprobs"], want["prompt_logprobs"]))
        assert d <= LP_ATOL, f"{name}: prompt log-probs differ by {d:.3g}"


# --------------------------------------------------------------------------- fast unit checks
def test_parse_options_refuses_bad_keys(tmp_path):
    with pytest.raises(ValueError, match="unknown key"):
        parse_options({"preset": "auto", "scale": 2})
    with pytest.raises(ValueError, match="exactly one of 'preset'"):
        parse_options({})
    with pytest.raises(ValueError, match="exactly one of 'preset'"):
        parse_options({"preset": "auto", "config": "x.json"})
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        parse_options({"preset": "nope"})
    with pytest.raises(ValueError, match="'target_length' must be a positive int"):
        parse_options({"preset": "auto", "target_length": "16k"})
    with pytest.raises(ValueError, match="does not exist"):
        parse_options({"config": str(tmp_path / "missing.json")})
    bad = tmp_path / "bad.json"
    bad.write_text('{"window": 0, "group_boundaries": [0, 32], "scales": [2]}')
    with pytest.raises(ValueError, match="not a valid DPEConfig"):
        parse_options({"config": str(bad)})
    with pytest.raises(TypeError, match="must be a JSON object"):
        parse_options("auto")
    assert parse_options({"preset": "auto", "target_length": 4096}).target_length == 4096


def _fake_vllm_config(**over):
    hf = SimpleNamespace(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=8192, rope_parameters={"rope_type": "default", "rope_theta": 1e5},
                         sliding_window=None)
    for k, v in over.pop("hf", {}).items():
        setattr(hf, k, v)
    cfg = SimpleNamespace(
        model_config=SimpleNamespace(hf_text_config=hf, max_model_len=over.pop("max_model_len", 8192),
                                     model="/nonexistent", get_head_size=lambda: 64),
        speculative_config=over.pop("speculative_config", None),
        cache_config=SimpleNamespace(cache_dtype=over.pop("cache_dtype", "auto")),
        parallel_config=SimpleNamespace(decode_context_parallel_size=1, prefill_context_parallel_size=1),
        compilation_config=SimpleNamespace(pass_config=SimpleNamespace(
            fuse_rope_kvcache=over.pop("fuse_rope_kvcache", False), fuse_qk_norm_rope_kvcache=False)))
    assert not over
    return cfg


@pytest.mark.parametrize("over, match", [
    (dict(speculative_config=object()), "speculative decoding"),
    (dict(cache_dtype="fp8"), "kv_cache_dtype='fp8'"),
    (dict(hf={"sliding_window": 4096}), "sliding-window"),
    (dict(hf={"attn_logit_softcapping": 50.0}), "soft-capped"),
    (dict(fuse_rope_kvcache=True), "fuse_rope_kvcache"),
    (dict(hf={"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}), "rope_type='yarn'"),
])
def test_check_engine_refuses_by_name(over, match):
    with pytest.raises(ValueError, match=match):
        check_engine(_fake_vllm_config(**over), parse_options({"preset": "auto"}))


def test_check_engine_lengths_and_heads(tmp_path):
    with pytest.raises(ValueError, match="max_position_embeddings"):  # asks for the hf_overrides fix
        check_engine(_fake_vllm_config(), parse_options({"preset": "auto", "target_length": 16384}))
    s = check_engine(_fake_vllm_config(max_model_len=16384), parse_options({"preset": "auto"}))
    assert (s.target_length, s.train_length) == (16384, 8192)
    assert check_engine(_fake_vllm_config(), parse_options({"preset": "smollm2-135m"})).per_query_head_mask
    cfg = DPEConfig.uniform(64, [2] * 8, 32, mask=torch.ones(12, 9, 32, dtype=torch.bool))  # 12 != 30 layers
    cfg.to_json(tmp_path / "c.json")
    with pytest.raises(ValueError, match="num_layers=30"):
        check_engine(_fake_vllm_config(), parse_options({"config": str(tmp_path / "c.json")}))
    # pairs are checked against the model's rotary when a layer resolves its config
    DPEConfig.uniform(64, [2] * 8, 32).to_json(tmp_path / "p.json")
    s = check_engine(_fake_vllm_config(), parse_options({"config": str(tmp_path / "p.json")}))
    assert s.dpe_config(torch.ones(32)).num_pairs == 32
    with pytest.raises(ValueError, match="covers 32 rotary pairs, the model rotates 16"):
        s.dpe_config(torch.ones(16))


def test_check_engine_warns_past_the_calibrated_length(tmp_path):
    """A config or preset served past the length it was calibrated for is never silent."""
    from dpe_kernels.config import PresetLengthWarning

    DPEConfig.uniform(64, [2] * 8, 32, calibrated_length=4096).to_json(tmp_path / "c.json")
    s = check_engine(_fake_vllm_config(), parse_options({"config": str(tmp_path / "c.json")}))
    with pytest.warns(PresetLengthWarning, match="calibrated for 4096 tokens and is used at 8192"):
        s.dpe_config(torch.ones(32))
    # a preset calibrated for 16K, configured for 16K, on an engine serving 32K
    s = check_engine(_fake_vllm_config(max_model_len=32768, hf={"max_position_embeddings": 32768}),
                     parse_options({"preset": "smollm2-135m", "target_length": 16384}))
    with pytest.warns(PresetLengthWarning, match="calibrated for 16384 tokens and is used at 32768"):
        s.dpe_config(torch.ones(32))
    with warnings.catch_warnings():  # within its length: no warning
        warnings.simplefilter("error", PresetLengthWarning)
        check_engine(_fake_vllm_config(max_model_len=16384), parse_options({"preset": "smollm2-135m"})
                     ).dpe_config(torch.ones(32))


def test_rank_head_slices():
    assert rank_head_slices(8, 4, 2, 1) == (slice(4, 8), slice(2, 4))
    assert rank_head_slices(4, 1, 2, 0) == (slice(0, 2), slice(0, 1))  # KV head replicated
    assert rank_head_slices(4, 1, 2, 1) == (slice(2, 4), slice(0, 1))
    assert rank_head_slices(8, 2, 4, 3) == (slice(6, 8), slice(1, 2))
    with pytest.raises(ValueError, match="num_heads"):
        rank_head_slices(9, 3, 2, 0)


def test_cpu_selection_resolves_by_config():
    """Without "dpe" the CPU_ATTN path resolves to vLLM's own class; with it, to DPE."""
    from vllm.config import set_current_vllm_config
    from vllm.utils.import_utils import resolve_obj_by_qualname
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    from dpe_kernels.integrations.vllm.backend import DPEAttentionBackend

    plain = _fake_vllm_config()
    plain.additional_config = {}
    with set_current_vllm_config(plain):
        assert resolve_obj_by_qualname(CPU_BACKEND_PATH) is CPUAttentionBackend
    dpe = _fake_vllm_config()
    dpe.additional_config = {"dpe": {"preset": "auto"}}
    with set_current_vllm_config(dpe):
        assert resolve_obj_by_qualname(CPU_BACKEND_PATH) is DPEAttentionBackend


# --------------------------------------------------------------------------- engines vs HF
def test_reference_sees_dpe(hf_main, smollm2_dir, requests_main):
    """The parity tests can fail: past the window, DPE moves the log-probs well beyond LP_ATOL."""
    plain = hf_reference(smollm2_dir, requests_main["one_shot"])
    d = max(abs(a - b) for a, b in zip(plain["a"]["prompt_logprobs"][WINDOW:], hf_main["a"]["prompt_logprobs"][WINDOW:]))
    assert d > 1e-2


def test_one_shot_prefill_and_decode(vllm_main, hf_main):
    _assert_same(vllm_main["a"], hf_main["a"], "a")


def test_batch_of_different_lengths(vllm_main, hf_main):
    for name in ("m1", "m2", "m3"):  # m1 decodes 60 tokens: its decode steps cross the window edge
        _assert_same(vllm_main[name], hf_main[name], name)


def test_prefix_cache_hit(vllm_main, hf_main):
    got = vllm_main["a_hit"]
    assert got["num_cached_tokens"] >= 512, got["num_cached_tokens"]  # a's blocks were reused
    _assert_same(got, hf_main["a_hit"], "a_hit")


def test_chunked_prefill(smollm2_dir, dpe_file, requests_main, hf_main, tmp_path):
    reqs = requests_main["one_shot"] + requests_main["batch"][2:]
    spec = {"llm": dict(ENGINE, model=str(smollm2_dir), max_num_batched_tokens=64, enable_chunked_prefill=True,
                        additional_config={"dpe": {"config": dpe_file[1]}}),
            "batches": [reqs]}
    got = run_engine_subprocess(spec, tmp_path)["requests"]
    for r in reqs:  # 600- and 700-token prompts in 64-token chunks
        _assert_same(got[r["name"]], hf_main[r["name"]], r["name"])


def test_without_dpe_key_is_plain_vllm_and_wide_window_matches(smollm2_dir, requests_main, tmp_path):
    """No "dpe" key: the tokens of vLLM without the plugin (VLLM_PLUGINS=""). A window longer
    than the context: DPE is plain RoPE, so the same greedy tokens as plain vLLM."""
    reqs = [dict(r, prompt_logprobs=False, max_tokens=16) for r in requests_main["batch"]]
    base = dict(ENGINE, model=str(smollm2_dir))
    with_plugin = run_engine_subprocess({"llm": base, "batches": [reqs]}, tmp_path)["requests"]
    without = run_engine_subprocess({"llm": base, "batches": [reqs]}, tmp_path, env={"VLLM_PLUGINS": ""})["requests"]
    wide = run_engine_subprocess({"llm": dict(base, additional_config={"dpe": {"preset": "uniform", "window": 4096}}),
                                  "batches": [reqs]}, tmp_path)["requests"]
    for r in reqs:
        n = r["name"]
        assert with_plugin[n]["tokens"] == without[n]["tokens"], n
        d = max(abs(a - b) for a, b in zip(with_plugin[n]["logprobs"], without[n]["logprobs"]))
        # Same tokens (the promise); log-probs within float32 run-to-run noise of two engine runs:
        # a fresh-clone run saw 4.4e-6 here (the 1e-6 bound held on the developer's venv), so
        # bit-identity is not claimed.
        assert d <= RUN_TO_RUN, (n, d)
        assert wide[n]["tokens"] == without[n]["tokens"], n
        d = max(abs(a - b) for a, b in zip(wide[n]["logprobs"], without[n]["logprobs"]))
        assert d <= LP_ATOL, (n, d)


@pytest.mark.parametrize("kv_heads, mask_heads", [(2, 4), (1, 1)])
def test_tensor_parallel_2(tmp_path, kv_heads, mask_heads):
    """TP=2 on the CPU (one core per rank): query heads split across ranks, the mask sliced to each
    rank's heads: per query head with 2 KV heads (one per rank), per KV head with 1 KV head
    (replicated on both ranks); vs the Hugging Face integration on the same tiny random Llama."""
    d = tiny_llama_dir(CACHE / f"tiny-llama-4h{kv_heads}kv", num_heads=4, num_kv_heads=kv_heads, head_dim=64,
                       layers=2)
    g = torch.Generator().manual_seed(1)
    cfg = DPEConfig.uniform(32, [4, 2, 2, 8], 32, mask=torch.rand(2, mask_heads, 32, generator=g) < 0.7)
    cfg.to_json(tmp_path / "tiny.json")
    reqs = [_req(f"t{i}", p, 12) for i, p in enumerate(token_prompts([90, 200], 512, seed=3))]
    spec = {"llm": dict(ENGINE, model=str(d), max_model_len=512, tensor_parallel_size=2,
                        additional_config={"dpe": {"config": str(tmp_path / "tiny.json")}}), "batches": [reqs]}
    got = run_engine_subprocess(spec, tmp_path, env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"})["requests"]
    want = hf_reference(d, reqs, dpe_config=cfg)
    for r in reqs:
        _assert_same(got[r["name"]], want[r["name"]], r["name"])


@pytest.mark.parametrize("extra, match", [
    ({"additional_config": {"dpe": {"preset": "nope"}}}, "unknown preset 'nope'"),
    ({"additional_config": {"dpe": {"preset": "auto"}}, "kv_cache_dtype": "fp8"}, "kv_cache_dtype='fp8'"),
])
def test_bad_config_refused_at_start(smollm2_dir, tmp_path, extra, match):
    spec = {"llm": dict(ENGINE, model=str(smollm2_dir), **extra), "batches": []}
    with pytest.raises(RuntimeError) as e:
        run_engine_subprocess(spec, tmp_path)
    assert match in str(e.value)


def test_export_hf_directory(smollm2_dir, tmp_path):
    """`dpe export-hf` output: what vLLM needs (no GGUF quantization_config, the Llama
    architecture, safetensors weights, tokenizer); it refuses to overwrite without asking."""
    import json

    from dpe_kernels.tools.export_hf import export_hf, main

    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["architectures"] == ["LlamaForCausalLM"]
    assert (smollm2_dir / "model.safetensors").is_file() and (smollm2_dir / "tokenizer.json").is_file()
    with pytest.raises(ValueError, match="already holds a model"):
        export_hf("smollm2", smollm2_dir)
    with pytest.raises(ValueError, match="dtype must be one of"):
        export_hf("smollm2", tmp_path / "x", dtype="int8")
    assert main(["--model", "smollm2", "--out", str(smollm2_dir)]) == 2  # no --overwrite: exit 2
