"""vLLM + DPE benchmark: plain vLLM vs vLLM with the DPE plugin vs the Hugging Face integration,
same model (SmolLM2-135M exported with ``dpe export-hf``, float32), same requests, one run.

    python bench/bench_vllm.py                       # full run -> bench/results/vllm_cpu.md
    python bench/bench_vllm.py --quick --out /tmp/x.md   # smoke (tiny sizes)

Run it with the vLLM virtual environment's python (python_tests/integrations/run_vllm_tests.sh makes it).

Measured:

* prefill time of one request at each ``--lengths`` (vLLM: engine timestamps scheduled -> first
  token; HF: one forward with the cache), one-shot (``max_num_batched_tokens`` = the longest);
* decode tokens/s of that request at the longest length (``--decode-tokens`` greedy tokens;
  vLLM: first -> last token timestamps);
* ``--batch`` concurrent requests of ``--batch-prompt`` tokens, ``--batch-gen`` tokens each:
  wall time of the whole batch (vLLM: one ``generate`` call; HF: one batched prefill + greedy
  steps with the DPE cache);
* KV memory: the KV budget is fixed (``--kv-tokens`` of plain vLLM's per-token bytes; default: the
  batch exactly, or the longest request if that is more) and each engine reports the tokens it
  holds; bytes per token follow. The rotated layout the plugin used before (``k_normal | k_scaled
  | v``: ``(2 + r) / 2`` times plain with ``r`` scaled key heads per KV head, 1 without a mask, the
  query heads per KV head with a per-query-head mask) is computed from that rule, not run. Requests
  admitted at once = the budget's tokens // (prompt + generated tokens, rounded up to blocks);
* the rotary op: vLLM's ``_custom_ops.rotary_embedding`` (plain RoPE, in place) vs
  ``dpe_rope`` into preallocated outputs (and in place, when the package has it), T tokens,
  32 / 8 heads, D = 128, bfloat16 and float32; time and bytes read + written per second.

DPE configuration: ``{"preset": "auto", "target_length": L}`` (the starting scales, no mask) with
L the longest length; plain vLLM gets the same ``hf_overrides`` / ``max_model_len``. The machine
load average is recorded around every phase (this CPU is shared).

Threads: vLLM's CPU worker binds every usable core but the ones it reserves for its scheduler
(one per local rank on x86: ONE thread on a 2-core machine), so the HF run uses the same number
of torch threads (``--hf-threads``, default computed the same way) and the serving rows compare
equal compute. The rotary rows run in this process, both ops with torch's threads.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load():
    return os.getloadavg()[0]


def _prompts(tok, lengths, seed=0):
    from dpe_kernels.tools.eval.data import load_essays

    ids = tok(load_essays()[: 12 * max(lengths) + 1000])["input_ids"]
    out, off = [], 0
    for n in lengths:  # disjoint slices: no shared prefix between requests
        if off + n > len(ids):
            off = 0
        out.append(ids[off:off + n])
        off += n
    return out


def _vllm_run(model, dpe, args, prompts_len, batch_prompts, workdir):
    from dpe_kernels.integrations.vllm.testing import run_engine_subprocess

    longest = max(args.lengths)
    max_len = longest + args.decode_tokens + 16
    llm = dict(model=str(model), dtype="float32", enforce_eager=True, skip_tokenizer_init=True,
               kv_cache_memory_bytes=int(args.kv_bytes), max_model_len=max_len,
               max_num_batched_tokens=max_len, enable_prefix_caching=False, disable_log_stats=False,
               hf_overrides={"max_position_embeddings": max_len})
    if dpe is not None:
        llm["additional_config"] = {"dpe": dpe}
    batches = []
    for i, p in enumerate(prompts_len):
        n = args.decode_tokens + 1 if len(p) == longest else 1
        batches.append([{"name": f"len{len(p)}", "prompt": p, "max_tokens": n}])
    batches.append([{"name": f"b{i}", "prompt": p, "max_tokens": args.batch_gen} for i, p in enumerate(batch_prompts)])
    load0 = _load()
    # A one-shot 16K prefill on 1 CPU thread can pass vLLM's default 300 s RPC timeout on a busy machine.
    env = {"VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS": os.environ.get("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "3600")}
    res = run_engine_subprocess({"llm": llm, "batches": batches}, workdir, timeout=7200, env=env)
    res["load"] = (load0, _load())
    return res


def vllm_worker_threads() -> int:
    """OpenMP threads of vLLM's CPU worker (TP 1) under its default binding
    (``VLLM_CPU_OMP_THREADS_BIND=auto``): the usable cores minus the reserved
    ones (``VLLM_CPU_NUM_OF_RESERVED_CPU``, default one per local rank on x86;
    vllm/utils/ompmultiprocessing.py). On this 2-core machine vLLM's log reads
    ``reserve_cpu_num=1, core ids=[0]``: one thread."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    reserved = int(os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "1"))
    return max(1, cores - reserved)


def _hf_run(model, dpe_cfg, args, prompts_len, batch_prompts):
    import torch
    from transformers import AutoModelForCausalLM

    from dpe_kernels.integrations.hf import apply_dpe

    threads0 = torch.get_num_threads()
    torch.set_num_threads(args.hf_threads)
    try:
        return _hf_timed(model, dpe_cfg, args, prompts_len, batch_prompts, AutoModelForCausalLM, apply_dpe, torch)
    finally:
        torch.set_num_threads(threads0)


def _hf_timed(model, dpe_cfg, args, prompts_len, batch_prompts, AutoModelForCausalLM, apply_dpe, torch):

    m = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32, local_files_only=True).eval()
    apply_dpe(m, dpe_cfg)
    out = {"prefill_s": {}, "load": [_load()]}
    longest = max(args.lengths)
    with torch.inference_mode():
        # Warm-up (first calls pay one-time set-up), not timed.
        w = m(torch.tensor([prompts_len[0][:256]]), use_cache=True, logits_to_keep=1)
        for _ in range(2):
            w = m(w.logits[:, -1].argmax(-1, keepdim=True), past_key_values=w.past_key_values, use_cache=True)
        del w
        for p in prompts_len:
            ids = torch.tensor([p])
            t = time.perf_counter()
            fwd = m(ids, use_cache=True, logits_to_keep=1)
            out["prefill_s"][len(p)] = time.perf_counter() - t
            if len(p) == longest:
                past, tok = fwd.past_key_values, fwd.logits[:, -1].argmax(-1, keepdim=True)
                t = time.perf_counter()
                for _ in range(args.decode_tokens):
                    fwd = m(tok, past_key_values=past, use_cache=True)
                    past, tok = fwd.past_key_values, fwd.logits[:, -1].argmax(-1, keepdim=True)
                out["decode_tok_s"] = args.decode_tokens / (time.perf_counter() - t)
            del fwd
        ids = torch.tensor(batch_prompts)  # equal lengths: no padding
        t = time.perf_counter()
        fwd = m(ids, use_cache=True, logits_to_keep=1)
        past, tok = fwd.past_key_values, fwd.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(args.batch_gen - 1):
            fwd = m(tok, past_key_values=past, use_cache=True)
            past, tok = fwd.past_key_values, fwd.logits[:, -1].argmax(-1, keepdim=True)
        out["batch_s"] = time.perf_counter() - t
    out["load"].append(_load())
    return out


def _rotary(args):
    """vLLM's CPU rotary op (in place) vs dpe_rope on the same shapes."""
    import torch
    from vllm import _custom_ops as ops

    import dpe_kernels
    from dpe_kernels import DPEConfig, dpe_rope
    from dpe_kernels.tools.benchmarks.common import time_min

    t, hq, hk, d = args.rotary_tokens, 32, 8, 128
    rows = []
    inv = 1.0 / (500000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    cfg = DPEConfig.uniform(1024, [4, 4, 2, 16, 32, 32, 16, 128], d // 2)
    pos = torch.arange(t, dtype=torch.int64)
    for dtype in (torch.bfloat16, torch.float32):
        q = torch.randn(t, hq * d, dtype=dtype)
        k = torch.randn(t, hk * d, dtype=dtype)
        freqs = pos.float()[:, None] * inv[None]
        cache = torch.cat([freqs.cos(), freqs.sin()], -1).to(dtype)
        qv, kv = q.clone(), k.clone()
        esz = q.element_size()
        io_plain = 2 * (q.numel() + k.numel()) * esz  # read + write q, k
        tv = time_min(lambda: ops.rotary_embedding(pos, qv, kv, d, cache, True), args.repeats, 30)
        rows.append((str(dtype).replace("torch.", ""), "vLLM rotary_embedding (plain, in place)", tv, io_plain, tv))
        q3, k3 = q.view(t, hq, d), k.view(t, hk, d)
        outs = tuple(torch.empty_like(x) for x in (q3, k3, q3, k3))
        io_dpe = (q.numel() + k.numel()) * esz * 3  # read q, k; write normal + scaled
        td = time_min(lambda: dpe_rope(q3, k3, pos, inv, cfg, out=outs, check_inputs=False), args.repeats, 30)
        rows.append((str(dtype).replace("torch.", ""), "dpe_rope into preallocated outputs", td, io_dpe, tv))
        try:
            import inspect
            has_inplace = "inplace" in inspect.signature(dpe_rope).parameters
        except (TypeError, ValueError):
            has_inplace = False
        if has_inplace:
            qs, ks = torch.empty_like(q3), torch.empty_like(k3)
            qi, ki = q3.clone(), k3.clone()
            ti = time_min(lambda: dpe_rope(qi, ki, pos, inv, cfg, out=(qi, ki, qs, ks), inplace=True,
                                           check_inputs=False), args.repeats, 30)
            rows.append((str(dtype).replace("torch.", ""), "dpe_rope in place (q/k overwritten + scaled)", ti,
                         io_dpe, tv))
    return rows, dpe_kernels.available_rope_backends("cpu")


def _rotary_repeats(args) -> int:
    """The rotary rows ``args.rotary_repeats`` times: each op's median time and ratio to vLLM's rotary
    (with its range), printed and written to ``args.rotary_out``."""
    import statistics

    import torch

    from dpe_kernels.tools.benchmarks.common import machine_description

    times, ratios, io = {}, {}, {}
    env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    cmd = env + "python bench/bench_vllm.py " + " ".join(sys.argv[1:])
    load0 = _load()
    for _ in range(args.rotary_repeats):
        rows, _backends = _rotary(args)
        for dtype, op, t, nbytes, t_vllm in rows:
            times.setdefault((dtype, op), []).append(t)
            ratios.setdefault((dtype, op), []).append(t / t_vllm)
            io[(dtype, op)] = nbytes
    load1 = _load()
    lines = ["# Rotary op: vLLM's CPU rotary_embedding vs dpe_rope (CPU)\n",
             f"Produced by `{cmd}` (vLLM's venv). "
             f"Machine: {machine_description('cpu')}. T = {args.rotary_tokens} tokens, 32 query / 8 KV heads, "
             f"D = 128, rotate_half; every repeat measures the three ops one after another in this process "
             f"(best of {args.repeats} calls each) with {torch.get_num_threads()} threads; load average "
             f"{load0:.2f} -> {load1:.2f} (2 cores). The ratio is per repeat, to vLLM's time in the same repeat.\n",
             "| dtype | op | median ms | GB/s (median) | median ratio to vLLM | range | repeats |",
             "|---|---|---|---|---|---|---|"]
    for (dtype, op), v in ratios.items():
        t = statistics.median(times[(dtype, op)])
        line = (f"| {dtype} | {op} | {t * 1e3:.2f} | {io[(dtype, op)] / t / 1e9:.1f} | {statistics.median(v):.2f}x "
                f"| {min(v):.2f}-{max(v):.2f} | {len(v)} |")
        lines.append(line)
        print(line)
    lines.append("\nBytes per op: vLLM's in place reads and writes q and k; dpe_rope reads q and k and writes the "
                 "normal and the scaled outputs (1.5x vLLM's bytes). What this machine's memory allows for those "
                 "bytes: `csrc/bench/bench_rope_traffic.cpp` (bench/results/rope_cpu_traffic.md).")
    if args.rotary_out:
        Path(args.rotary_out).write_text("\n".join(lines) + "\n")
        print(f"wrote {args.rotary_out}")
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="HF dir (default: export SmolLM2 to the cache)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batch-prompt", type=int, default=2048)
    ap.add_argument("--batch-gen", type=int, default=64)
    ap.add_argument("--rotary-tokens", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--kv-tokens", type=int, default=None,
                    help="KV budget in tokens of plain vLLM (default: the batch exactly, or the longest request)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--hf-threads", type=int, default=None,
                    help="torch threads of the HF run (default: those of vLLM's CPU worker, which binds every "
                         "usable core but one: vLLM reserves one core per local rank for its scheduler)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    ap.add_argument("--rotary-repeats", type=int, default=0, metavar="N",
                    help="only the rotary rows, measured N times: print each op's median ratio to vLLM's "
                         "rotary and its range, and write them to --rotary-out (no engine, no vllm_cpu.md)")
    ap.add_argument("--rotary-out", default=str(ROOT / "bench" / "results" / "vllm_rotary_cpu.md"),
                    help="the --rotary-repeats report ('' for none)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "vllm_cpu.md"))
    args = ap.parse_args(argv)
    if args.hf_threads is None:
        args.hf_threads = vllm_worker_threads()
    if args.hf_threads < 1:
        ap.error(f"--hf-threads must be >= 1, got {args.hf_threads}")
    if args.rotary_repeats < 0:
        ap.error(f"--rotary-repeats must be >= 0, got {args.rotary_repeats}")
    if args.rotary_repeats:
        return _rotary_repeats(args)
    if args.quick:
        args.lengths, args.decode_tokens, args.batch, args.batch_prompt = [256, 512], 8, 2, 128
        args.batch_gen, args.rotary_tokens, args.repeats = 8, 1024, 2

    from transformers import AutoTokenizer

    from dpe_kernels import DPEConfig
    from dpe_kernels.tools.benchmarks.common import machine_description, report_preamble
    from dpe_kernels.tools.export_hf import export_hf

    cache = Path(os.environ.get("DPE_VLLM_CACHE", Path.home() / ".cache" / "dpe_kernels" / "vllm"))
    model = Path(args.model) if args.model else cache / "smollm2-135m"
    if not (model / "config.json").is_file():
        export_hf("smollm2", model, overwrite=True)
    tok = AutoTokenizer.from_pretrained(str(model), local_files_only=True)
    longest = max(args.lengths)
    from transformers import AutoConfig

    mcfg = AutoConfig.from_pretrained(str(model), local_files_only=True)
    kv_per_token = 2 * mcfg.num_hidden_layers * mcfg.num_key_value_heads * mcfg.head_dim * 4  # k + v, float32
    block = 128  # vLLM CPU's default block size
    per_req = -(-(args.batch_prompt + args.batch_gen) // block) * block
    if args.kv_tokens is None:
        args.kv_tokens = max(args.batch * per_req, -(-(longest + args.decode_tokens + 16) // block) * block + block)
    args.kv_bytes = args.kv_tokens * kv_per_token
    prompts_len = _prompts(tok, args.lengths)
    batch_prompts = _prompts(tok, [args.batch_prompt] * args.batch, seed=1)
    dpe = {"preset": "auto", "target_length": longest + args.decode_tokens + 16}
    workdir = cache / "bench-work"
    t_all = time.perf_counter()
    print("plain vLLM ...", flush=True)
    plain = _vllm_run(model, None, args, prompts_len, batch_prompts, workdir)
    print("vLLM + DPE ...", flush=True)
    dpe_res = _vllm_run(model, dpe, args, prompts_len, batch_prompts, workdir)
    # The HF side uses the DPEConfig the plugin resolved: same preset, same frequencies.
    import torch

    hf_cfg = mcfg
    p = hf_cfg.head_dim // 2
    inv = 1.0 / (hf_cfg.rope_parameters["rope_theta"] ** (torch.arange(0, 2 * p, 2, dtype=torch.float32) / (2 * p)))
    cfg = DPEConfig.from_preset("auto", inv_freq=inv, train_length=hf_cfg.max_position_embeddings,
                                target_length=dpe["target_length"])
    hf = None
    if not args.skip_hf:
        print("HF integration ...", flush=True)
        hf = _hf_run(model, cfg, args, prompts_len, batch_prompts)
    print("rotary op ...", flush=True)
    load_r0 = _load()
    rot_rows, rope_backends = _rotary(args)
    load_r1 = _load()
    total = time.perf_counter() - t_all

    def vr(res, name, key):
        return res["requests"][name].get(key)

    here = os.getcwd()
    os.chdir(ROOT)  # the preamble names the checkout's commit
    try:
        preamble = report_preamble(
            "vLLM + DPE on the CPU: plain vLLM vs vLLM with the DPE plugin vs the HF integration",
            "bench/bench_vllm.py", argv if argv is not None else sys.argv[1:], machine_description("cpu"))
    finally:
        os.chdir(here)
    lines = [preamble]
    import vllm
    import transformers
    lines.append(f"- vLLM {vllm.__version__} (vllm-cpu, V1 engine, enforce_eager, float32, prefix caching off, "
                 f"one-shot prefill); transformers {transformers.__version__}; model {model.name} (SmolLM2-135M-"
                 f"Instruct de-quantised from the shipped Q4_1 GGUF, 30 layers, 9 query / 3 KV heads, D 64)")
    lines.append(f"- DPE: `{json.dumps(dpe)}` -> window {cfg.window}, scales {list(cfg.scales)}, no mask; the plugin's "
                 "compact cache (vLLM's own KV spec, keys cached unrotated and rotated as attention loads them)")
    lines.append(f"- Threads: vLLM's CPU worker runs {vllm_worker_threads()} OpenMP thread(s) (it reserves one core "
                 f"of the {len(os.sched_getaffinity(0))} for its scheduler process); the HF run uses "
                 f"{args.hf_threads} torch thread(s) (`--hf-threads`), so the serving rows compare the same compute; "
                 f"the rotary rows run in this process with {torch.get_num_threads()} threads for both ops.")
    lines.append(f"- One run of everything below, {total / 60:.1f} min in all. Load average (1 min) around each "
                 f"phase, a measure of how busy the shared machine was: plain vLLM {plain['load'][0]:.2f} -> "
                 f"{plain['load'][1]:.2f}, vLLM+DPE {dpe_res['load'][0]:.2f} -> {dpe_res['load'][1]:.2f}"
                 + (f", HF {hf['load'][0]:.2f} -> {hf['load'][1]:.2f}" if hf else "")
                 + f", rotary {load_r0:.2f} -> {load_r1:.2f} (2 cores: above ~2 means other work shared them).\n")
    lines.append("## Serving\n")
    lines.append("| measurement | plain vLLM | vLLM + DPE | HF integration (DPE) | DPE / plain | target |")
    lines.append("|---|---|---|---|---|---|")
    for n in args.lengths:
        a, b = vr(plain, f"len{n}", "prefill_s"), vr(dpe_res, f"len{n}", "prefill_s")
        h = hf["prefill_s"][n] if hf else None
        tgt = "<= 1.15x" if n == longest else ""
        met = "" if not tgt else (" (met)" if b / a <= 1.15 else " (NOT met)")
        lines.append(f"| prefill {n} tokens (s) | {a:.2f} | {b:.2f} | {h:.2f} | {b / a:.2f}x | {tgt}{met} |"
                     if h is not None else f"| prefill {n} tokens (s) | {a:.2f} | {b:.2f} | - | {b / a:.2f}x | {tgt}{met} |")
    name = f"len{longest}"
    da = args.decode_tokens / vr(plain, name, "decode_s")
    db = args.decode_tokens / vr(dpe_res, name, "decode_s")
    dh = hf["decode_tok_s"] if hf else None
    met = "met" if db / da >= 0.95 else "NOT met"
    lines.append(f"| decode at {longest} context (tokens/s) | {da:.2f} | {db:.2f} | "
                 f"{dh:.2f} | {db / da:.2f}x | >= 0.95x ({met}) |" if dh is not None else
                 f"| decode at {longest} context (tokens/s) | {da:.2f} | {db:.2f} | - | {db / da:.2f}x | >= 0.95x ({met}) |")
    ba, bb = plain["batch_s"][-1], dpe_res["batch_s"][-1]
    bh = hf["batch_s"] if hf else None
    gen = args.batch * args.batch_gen
    met = ("met" if bb < bh else "NOT met") if bh is not None else "HF not run"
    lines.append(f"| {args.batch} concurrent requests x {args.batch_prompt} prompt + {args.batch_gen} generated: "
                 f"wall time (s) | {ba:.2f} | {bb:.2f} | {bh:.2f} | {bb / ba:.2f}x | DPE faster than HF ({met}: "
                 f"{bh / bb:.2f}x) |" if bh is not None else
                 f"| {args.batch} concurrent requests: wall time (s) | {ba:.2f} | {bb:.2f} | - | {bb / ba:.2f}x | |")
    met = "met" if ba / bb >= 0.9 else "NOT met"
    lines.append(f"| same batch: generated tokens/s | {gen / ba:.1f} | {gen / bb:.1f} | "
                 + (f"{gen / bh:.1f}" if bh else "-") + f" | {ba / bb:.2f}x | >= 0.9x ({met}) |")
    lines.append(f"\nEngine start (s): plain {plain['start_s']:.1f}, DPE {dpe_res['start_s']:.1f}.\n")
    n_rep = mcfg.num_attention_heads // mcfg.num_key_value_heads
    lines.append(f"## KV memory at a fixed budget ({args.kv_bytes / 2**20:.1f} MiB = {args.kv_tokens} tokens of plain "
                 f"vLLM's {kv_per_token} B)\n")
    lines.append("| cache | KV bytes per token | tokens held (vLLM's report) | vs plain | requests of "
                 f"{args.batch_prompt} + {args.batch_gen} admitted at once | target |")
    lines.append("|---|---|---|---|---|---|")
    kv_rows = [("plain vLLM (measured)", plain["kv_tokens"]), ("DPE compact: unrotated keys (measured)", dpe_res["kv_tokens"])]
    for r, what in ((1, "no mask"), (n_rep, f"per-query-head mask, {n_rep} scaled heads per KV head")):
        kv_rows.append((f"rotated k_normal + k_scaled, {what} (computed)", int(plain["kv_tokens"] * 2 / (2 + r))))
    for name, held in kv_rows:
        bpt = args.kv_bytes / held if held else float("nan")
        adm = min(args.batch, held // per_req)
        tgt = ""
        if "compact" in name:
            tgt = "1.00x plain, as many admitted (" + ("met" if held == plain["kv_tokens"] else "NOT met") + ")"
        lines.append(f"| {name} | {bpt:.0f} | {held} | {plain['kv_tokens'] / held:.2f}x | {adm} | {tgt} |")
    lines.append("")
    lines.append(f"## Rotary op (T = {args.rotary_tokens}, 32 query / 8 KV heads, D = 128; best of {args.repeats})\n")
    lines.append(f"dpe_rope backends here: {rope_backends}. Bytes = q and k read once plus every output written once.\n")
    lines.append("| dtype | op | time (ms) | GB/s | time / vLLM's | target |")
    lines.append("|---|---|---|---|---|---|")
    for dt, op, tm, io, tv in rot_rows:
        tgt = ""
        if "in place" in op and "dpe" in op:
            tgt = "<= 1.5x (" + ("met" if tm / tv <= 1.5 else "NOT met") + ")"
        lines.append(f"| {dt} | {op} | {tm * 1e3:.2f} | {io / tm / 1e9:.1f} | {tm / tv:.2f}x | {tgt} |")
    if not any("in place" in r[1] and "dpe" in r[1] for r in rot_rows):
        lines.append("\n`dpe_rope` has no in-place mode in this build, so the in-place target could not be measured.")
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
