#!/usr/bin/env bash
# The quality grid (SmolLM2-135M-Instruct, 8K pre-training length): rope, pi, ntk, yarn, self_extend,
# dpe (starting scales) and dpe with each shipped SmolLM2 preset at its calibrated_length; passkey and
# NIAH, teacher-forced log-probability and exact match. Needles per context: DPE_NEEDLES (default 1:
# bench/results/needles_smollm2_16k.md shows that 4 or 10 labelled needles per context REVERSE the
# single-needle order of self_extend and the calibrated preset on this 135M model). N = 1: 10 depths
# x 4 contexts per cell (40 needles) at 8K and 16K, x 2 at 32K (20); N > 1: needle j at depth
# (j + 0.5) / N, ceil(40 / N) (>= 4) contexts per cell at 8K / 16K, ceil(20 / N) (>= 2) at 32K.
# Records (one JSONL line per scored needle) and the summaries go to
# bench/results/quality_grid_smollm2_n<N>/<task>/; rerunning resumes. Extra arguments go to every
# `dpe eval` (e.g. --device cuda); plain RoPE also at 4K (the 32K target's reference). The report with
# the paired comparisons and the targets: python bench/quality_grid_report.py. The loss by position is
# bench/eval_quality.py's.
#   [DPE_NEEDLES=N] bash bench/quality_grid.sh [--device cuda]
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
N=${DPE_NEEDLES:-1}
OUT="$HERE/results/quality_grid_smollm2_n$N"  # one directory per N: records of different N never mix
DPE="${DPE_CLI:-dpe}"
if [ "$N" -eq 1 ]; then
  depths=(--depths 0.05 0.15 0.25 0.35 0.45 0.55 0.65 0.75 0.85 0.95); S_LONG=4; S_32K=2
else
  depths=(--depths 0.5); S_LONG=$(( (40 + N - 1) / N )); S_32K=$(( (20 + N - 1) / N ))
  [ "$S_LONG" -ge 4 ] || S_LONG=4; [ "$S_32K" -ge 2 ] || S_32K=2
fi
common=(--scoring logprob --needles "$N" "${depths[@]}" --no-plots --no-progress --no-skip-zero "$@")
for task in passkey niah; do
  # plain RoPE at 4K: the reference of the 32K target (at least 90% of its exact match)
  $DPE eval "${common[@]}" --task "$task" --methods rope --lengths 4096 \
    --samples "$S_LONG" --out-dir "$OUT/$task" --title "SmolLM2 quality grid, $task, $N needle(s) per context"
  $DPE eval "${common[@]}" --task "$task" --methods rope pi ntk yarn self_extend dpe --lengths 8192 16384 \
    --samples "$S_LONG" --out-dir "$OUT/$task" --title "SmolLM2 quality grid, $task, $N needle(s) per context"
  $DPE eval "${common[@]}" --task "$task" --methods rope pi ntk yarn self_extend dpe --lengths 32768 \
    --samples "$S_32K" --out-dir "$OUT/$task" --title "SmolLM2 quality grid, $task, $N needle(s) per context"
  # every shipped SmolLM2 preset at the length it was calibrated for (its calibrated_length): smollm2-135m
  # (16K, the first calibration), smollm2-135m-16k / -32k once bench/calibrate_smollm2.py --ship wrote them
  for file in "$HERE"/../dpe_kernels/presets/smollm2-135m*.json; do
    preset=$(basename "$file" .json)
    len=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['calibrated_length'])" "$file")
    n=$([ "$len" -le 16384 ] && echo "$S_LONG" || echo "$S_32K")
    $DPE eval "${common[@]}" --task "$task" --methods dpe --preset "$preset" --lengths "$len" --samples "$n" \
      --out-dir "$OUT/${task}_$preset" --title "SmolLM2 quality grid, $task, preset $preset"
  done
done
