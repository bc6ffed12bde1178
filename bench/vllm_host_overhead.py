"""Host time of one DPE attention layer call in the vLLM plugin, for a tiny decode step.

Builds the plugin's DPEAttentionImpl under a real VllmConfig (EngineArgs(...).create_engine_config()
of a tiny random Llama, 4 query / 2 KV heads, head_dim 64), a paged cache and decode metadata,
and times, per layer call (median of ROUNDS rounds of CALLS calls each):

* kernels: the cache write (``write_kv``: the step's unrotated k / v at slot_mapping) and the
  compiled ``paged_decode_rotary`` op through the registry's runner on preallocated outputs: the
  floor no Python wrapper can go below;
* public: page views, the cache write and the public ``dpe_paged_attention_rotary`` with
  check_inputs=False (its metadata checks and backend choice) on every call;
* plugin: DPEAttentionImpl.forward after its first (fully checked) call.

Host overhead = (public or plugin) - kernels.

    python bench/vllm_host_overhead.py [--batch 1] [--context 64] [--out bench/results/vllm_host_overhead.md]

Run in the vLLM venv (tests/integrations/run_vllm_tests.sh builds it), from outside the checkout.
"""
import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from dpe_kernels import dpe_paged_attention_rotary
    from dpe_kernels.backends import run_paged_rotary
    from dpe_kernels.backends.shapes import PagedInfo
    from dpe_kernels.integrations.vllm.backend import _device_tensors, write_kv
    from dpe_kernels.integrations.vllm.testing import tiny_decode_layer

    b, ctx = args.batch, args.context
    x = tiny_decode_layer(b, ctx)
    impl, layer, md = x["impl"], x["layer"], x["metadata"]
    query, key, value, kv_cache, output = x["query"], x["key"], x["value"], x["kv_cache"], x["output"]
    hq, hk, d, bs = 4, 2, 64, x["block_size"]
    t = b
    nb = kv_cache.shape[0]
    blocks_per_seq = md.block_table.shape[1]
    slots, block_table, seq_lens, qsl = md.slot_mapping, md.block_table, md.seq_lens, md.query_start_loc
    with torch.inference_mode():
        impl.forward(layer, query, key, value, kv_cache, md, output)  # first call: every check
        st = impl._state
        assert st.checked and st.backend == "cpu", (st.checked, st.backend)
        kc, vc = impl._views(kv_cache)
        cos_sin, pair_scale, window = _device_tensors(md.table, query.device)
        lse = torch.empty(t, hq)
        info = PagedInfo()
        info.T_q, info.H_q, info.H_k, info.H_ks, info.D, info.Dv = t, hq, hk, hk, d, d
        info.B, info.num_blocks, info.block_size, info.max_blocks = b, nb, bs, blocks_per_seq
        info.max_seqlen_q, info.max_seqlen_k = 1, ctx

        def kernels():
            write_kv(key[:t], value[:t], slots, kc, vc)
            run_paged_rotary("cpu", query[:t], kc, vc, block_table, seq_lens, qsl, cos_sin, pair_scale, window,
                             md.seq_config, st.mask, st.rotary_dim, st.neox, d ** -0.5, info, output[:t], lse)

        def public():  # every call through the public op (metadata checks, backend choice)
            k_cache, v_cache = impl._views(kv_cache)
            write_kv(key[:t], value[:t], slots, k_cache, v_cache)
            dpe_paged_attention_rotary(query[:t], k_cache, v_cache, block_table, seq_lens, qsl, cos_sin, pair_scale,
                                       window, seq_config=md.seq_config, mask=st.mask, rotary_dim=st.rotary_dim,
                                       softmax_scale=impl.scale, max_seqlen_q=md.max_query_len,
                                       max_seqlen_k=md.max_seq_len, out=output[:t], check_inputs=False)

        def plugin():
            impl.forward(layer, query, key, value, kv_cache, md, output)

        res = {}
        for name, fn in (("kernels", kernels), ("public", public), ("plugin", plugin)):
            for _ in range(50):
                fn()
            per = []
            for _ in range(args.rounds):
                t0 = time.perf_counter_ns()
                for _ in range(args.calls):
                    fn()
                per.append((time.perf_counter_ns() - t0) / args.calls / 1000.0)
            res[name] = statistics.median(per)
    cmd = "python bench/vllm_host_overhead.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        f"| path | us per layer call | host overhead over the kernels (us) |",
        "|---|---:|---:|",
        f"| kernels only (floor) | {res['kernels']:.1f} | 0 |",
        f"| public op every call, check_inputs=False | {res['public']:.1f} | "
        f"{res['public'] - res['kernels']:.1f} |",
        f"| after: plugin forward (fast path) | {res['plugin']:.1f} | {res['plugin'] - res['kernels']:.1f} |",
    ]
    print("\n".join(lines))
    if args.out:
        import vllm

        text = (f"# vLLM plugin: host time per DPE attention layer call (tiny decode step)\n\n"
                f"Machine: {cpu_model()} ({os.cpu_count()} cores visible, shared with other jobs), "
                f"torch {torch.__version__} (1 thread), vLLM {vllm.__version__}.\n"
                f"Command (vLLM venv, from outside the checkout): `{cmd}`\n\n"
                f"Decode step: batch {b}, context {ctx} keys, 4 query / 2 KV heads, head_dim 64, block size {bs}, "
                f"float32; median over {args.rounds} rounds of {args.calls} calls.\n\n"
                + "\n".join(lines) + "\n")
        Path(args.out).write_text(text)
        print("wrote", args.out)


if __name__ == "__main__":
    main()
