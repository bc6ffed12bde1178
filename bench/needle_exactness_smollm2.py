"""Exactness of the multi-needle scorer on the real model: SmolLM2-135M-Instruct at 4K, every method.

    python bench/needle_exactness_smollm2.py [--length 4096] [--needles 4] [--threads N]
        -> bench/results/needles_exactness_smollm2.md

For each method (rope, pi, ntk, yarn, self_extend, dpe; the extension methods configured for a
16K target so that they change the model at 4K too) one context of N labelled needles is scored
by the branched scorer (the context once into the cache, each question continuing from it and
cropped away again), and each question is scored again by one full forward of context + question
+ answer. The table gives the largest absolute difference of the answer tokens' log-probabilities
and whether the argmax tokens agree, in float32.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--needles", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "needles_exactness_smollm2.md"))
    args = ap.parse_args(argv)

    import torch

    from dpe_kernels.integrations.baselines import METHODS, apply_method
    from dpe_kernels.tools.benchmarks.common import machine_description
    from dpe_kernels.tools.eval import methods as M
    from dpe_kernels.tools.eval.multi import multi_context, multi_sample, score_branches
    from dpe_kernels.tools.eval.perplexity import backbone_and_head, head_logits
    from dpe_kernels.integrations.hf import train_length
    from dpe_kernels.tools.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2")
    T = train_length(model)
    target = 2 * T
    items = multi_sample("passkey", 0, args.needles)
    ctx, branches = multi_context(tok, "passkey", args.length, 0.5, items)
    base, head = backbone_and_head(model)
    rows = []
    for method in METHODS:
        kw = M.method_kwargs(model, method, target, T)
        with apply_method(model, method, **kw):
            t0 = time.perf_counter()
            got, ctx_s, br_s = score_branches(model, ctx.input_ids, branches)
            worst, agree = 0.0, True
            for (q, a), (lp, am) in zip(branches, got):
                ids = torch.tensor([ctx.input_ids + list(q) + list(a)])
                with torch.inference_mode():
                    hidden = base(input_ids=ids, use_cache=False)[0]
                    logits = head_logits(model, head, hidden[0, -len(a) - 1:-1])
                ref = torch.log_softmax(logits, -1)
                want = ref.gather(-1, torch.tensor(a)[:, None])[:, 0]
                worst = max(worst, float((lp - want).abs().max()))
                agree = agree and am.tolist() == logits.argmax(-1).tolist()
            rows.append((method, M.describe(method, kw), worst, agree, ctx_s, br_s / len(branches),
                         time.perf_counter() - t0))
            print(f"{method}: max |branched - full| = {worst:.2e}, argmax agree {agree}", flush=True)
    lines = [f"# Multi-needle scorer vs full forwards: SmolLM2-135M-Instruct, {args.length} tokens", "",
             f"`python bench/needle_exactness_smollm2.py --length {args.length} --needles {args.needles}`; machine: "
             f"{machine_description('cpu')}; float32. One context of {args.needles} labelled passkey needles "
             f"({len(ctx)} tokens); the extension methods are configured for a {target}-token target.", "",
             "| method | parameters | max abs diff of answer log-probs (branched vs full forward) | argmax agrees | "
             "context s | s per question |", "|---|---|---|---|---|---|"]
    for m, p, w, ok, cs, qs, _ in rows:
        lines.append(f"| {m} | {p} | {w:.2e} | {'yes' if ok else 'NO'} | {cs:.1f} | {qs:.2f} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(r[3] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
