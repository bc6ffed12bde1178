"""Quality of DPE and the baselines on SmolLM2-135M-Instruct (8K pre-training length):
passkey retrieval and loss by position, written to bench/results/quality_smollm2.md.

    python bench/eval_quality.py              # run (or resume) every step, then write the report
    python bench/eval_quality.py --dry-run    # print the `dpe eval` commands only
    python bench/eval_quality.py --with-niah  # also the 4-needle NIAH at 4K-16K (slower)

Every step is one `dpe eval` command over one shared JSONL
(bench/results/quality_smollm2/results.jsonl); an interrupted run resumes where it stopped
when started again. A method that scores 0 at a length is skipped at longer lengths of that
task (the table says "skipped (scored 0 at L)").

Steps (all six methods: rope, pi, ntk, yarn, self_extend, dpe):
  1. passkey at 4K, 8K, 16K: 5 depths (0, 25, 50, 75, 100 %) x 2 keys
     (and plain RoPE with the chat template at 4K and 8K: the prompt-format choice)
  2. passkey at 32K: 3 depths (0, 50, 100 %) x 1 key
  3. loss by position over 32K tokens of the essays (1K buckets), one text
  4. the report: markdown table, heatmap_passkey.png, loss_by_position.png

Cost, float32, one sample, measured on the 2-core CPU while other jobs shared it (load ~4):
4K ~40-50 s, 8K ~110-175 s, 16K ~225 s (rope) / ~375 s (dpe); 32K about 3-4x 16K (attention is
quadratic). Every method without skipping: steps 1-3 about 15 h on that shared machine, roughly
half on an idle one; methods skipped after a 0 make it shorter. With a GPU (`--device cuda`,
the default when one is visible) the whole set takes minutes.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results", "quality_smollm2")
TABLE = os.path.join(HERE, "results", "quality_smollm2.md")
JSONL = os.path.join(OUT, "results.jsonl")
METHODS = ["rope", "pi", "ntk", "yarn", "self_extend", "dpe"]

NOTES = """\
SmolLM2-135M-Instruct (Q4_1 GGUF de-quantised to float32; Llama architecture, 30 layers, 9 query /
3 KV heads, head_dim 64, RoPE theta 1e5, 8K pre-training length), CPU. Produced by
`python bench/eval_quality.py` (the `dpe eval` commands it prints with --dry-run).

Methods, at each evaluated length L (extension factor f = max(1, L / 8192)): rope = plain RoPE;
pi / ntk / yarn with factor f; self_extend = window 1024, one group of scale 2 * ceil(f);
dpe = window 1024, 8 groups of 4 pairs, the uncalibrated starting scales of
dpe_kernels/eval/methods.py (2 for groups whose wavelengths fit the window, half the large scale
for those that fit the pre-training length, 2 * ceil(f) beyond), no key-dimension mask
(detection and calibration come later). Greedy decoding; passkey = exact match of the first
number in the answer.

Prompt format (fixed for every method): raw text. The choice is measured by this same script:
plain RoPE with the model's chat template at 4K and 8K (the "prompt format `chat`" section below)
against plain RoPE with the raw prompt in the main table; the better one within 8K is the default.
"""


def commands(with_niah: bool = False):
    common = ["--out-dir", OUT, "--jsonl", JSONL, "--methods", *METHODS]
    steps = [
        ["eval", "--task", "passkey", "--lengths", "4096", "8192", "16384", "--depths", "5", "--samples", "2",
         *common],
        # The prompt-format choice: plain RoPE with the chat template, against the raw rows above.
        ["eval", "--task", "passkey", "--lengths", "4096", "8192", "--depths", "5", "--samples", "1",
         "--format", "chat", "--out-dir", OUT, "--jsonl", JSONL, "--methods", "rope"],
        ["eval", "--task", "passkey", "--lengths", "32768", "--depths", "3", "--samples", "1", *common],
        ["eval", "--task", "ppl", "--lengths", "32768", "--samples", "1", "--bucket", "1024", *common],
    ]
    if with_niah:
        steps.append(["eval", "--task", "niah", "--lengths", "4096", "8192", "16384", "--depths", "3",
                      "--samples", "1", *common])
    report = ["eval", "--report-only", "--out-dir", OUT, "--jsonl", JSONL, "--table", TABLE,
              "--title", "DPE vs baselines on SmolLM2-135M-Instruct (8K trained)", "--notes", NOTES]
    return steps, report


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    ap.add_argument("--with-niah", action="store_true", help="also run the 4-needle NIAH at 4K-16K")
    ap.add_argument("--report-only", action="store_true", help="only rebuild the table and plots")
    args = ap.parse_args(argv)
    steps, report = commands(args.with_niah)
    todo = ([] if args.report_only else steps) + [report]
    if args.dry_run:
        for c in todo:
            print("dpe " + " ".join(shlex.quote(x) for x in c))
        return 0
    sys.path.insert(0, os.path.dirname(HERE))
    from dpe_kernels.cli import main as dpe_main

    for c in todo:
        print("\n$ dpe " + " ".join(shlex.quote(x) for x in c[:12]) + (" ..." if len(c) > 12 else ""), flush=True)
        rc = dpe_main(c)
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
