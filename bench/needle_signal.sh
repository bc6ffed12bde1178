#!/usr/bin/env bash
# Does the retrieval signal survive many needles per context? SmolLM2-135M-Instruct, passkey,
# teacher-forced log-probability at 16K, for rope, self_extend, dpe (starting scales) and dpe (the
# calibrated preset smollm2-135m):
#   multi:  3 contexts x 10 needles (3: the fewest a bootstrap over contexts gives an interval for),
#           needle j at depth (j + 0.5) / 10, each question scored as if it alone followed the context
#           (dpe eval --needles 10); multi4: the same with 4 needles per context;
#   single: 10 one-needle contexts at the same 10 depths (dpe eval --needles 1).
# Every scored needle is one JSONL record under bench/results/needles_smollm2_16k/; rerunning resumes.
# Then: python bench/needle_signal_report.py (correlation of per-depth means, method ranking, cost).
#   bash bench/needle_signal.sh [extra dpe-eval arguments, e.g. --device cuda]
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
OUT="$HERE/results/needles_smollm2_16k"
mkdir -p "$OUT"
DPE="${DPE_CLI:-dpe}"
DEPTHS="0.05 0.15 0.25 0.35 0.45 0.55 0.65 0.75 0.85 0.95"
common=(--task passkey --scoring logprob --lengths 16384 --no-plots --no-progress --no-skip-zero "$@")
# Fewer needles per context (N=4: depths 0.125 .. 0.875) for the methods compared, 3 contexts each: does
# the signal that 10 needles blur come back? (12 forwards)
$DPE eval "${common[@]}" --needles 4 --methods self_extend dpe rope --depths 0.5 --samples 3 \
  --out-dir "$OUT/multi4" --title "16K passkey, 4 needles per context"
$DPE eval "${common[@]}" --needles 4 --methods dpe --dpe-preset smollm2-135m --depths 0.5 --samples 3 \
  --out-dir "$OUT/multi4_preset" --title "16K passkey, 4 needles per context, preset smollm2-135m"
# Multi-needle contexts first (cheap: 8 forwards), then the single-needle samples (40 forwards):
# the methods that decide the question first (self_extend, dpe), plain RoPE (which fails at 16K) last.
$DPE eval "${common[@]}" --needles 10 --methods rope self_extend dpe --depths 0.5 --samples 3 \
  --out-dir "$OUT/multi" --title "16K passkey, 10 needles per context"
$DPE eval "${common[@]}" --needles 10 --methods dpe --dpe-preset smollm2-135m --depths 0.5 --samples 3 \
  --out-dir "$OUT/multi_preset" --title "16K passkey, 10 needles per context, preset smollm2-135m"
$DPE eval "${common[@]}" --needles 1 --methods self_extend dpe --depths $DEPTHS --samples 1 \
  --out-dir "$OUT/single" --title "16K passkey, one needle per context"
$DPE eval "${common[@]}" --needles 1 --methods dpe --dpe-preset smollm2-135m --depths $DEPTHS --samples 1 \
  --out-dir "$OUT/single_preset" --title "16K passkey, one needle per context, preset smollm2-135m"
$DPE eval "${common[@]}" --needles 1 --methods rope --depths $DEPTHS --samples 1 \
  --out-dir "$OUT/single" --title "16K passkey, one needle per context"
