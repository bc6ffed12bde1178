#!/usr/bin/env bash
# The quality grid with the multi-needle scorer (SmolLM2-135M-Instruct, 8K pre-training length):
# rope, pi, ntk, yarn, self_extend, dpe (starting scales) and dpe with each shipped calibrated preset
# at its own length; passkey and NIAH, teacher-forced log-probability and exact match, 10 labelled
# needles per context (each question scored as if it alone followed the context):
#   8K and 16K: 4 contexts per cell (40 needles);  32K: 2 contexts (20 needles).
# Records (one JSONL line per scored needle) and the summaries go to
# bench/results/quality_grid_smollm2/<task>/; rerunning resumes. Extra arguments go to every
# `dpe eval` (e.g. --device cuda). The loss by position is bench/eval_quality.py's.
#   bash bench/quality_grid.sh [--device cuda]
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
OUT="$HERE/results/quality_grid_smollm2"
DPE="${DPE_CLI:-dpe}"
common=(--scoring logprob --needles 10 --depths 0.5 --no-plots --no-progress --no-skip-zero "$@")
for task in passkey niah; do
  $DPE eval "${common[@]}" --task "$task" --methods rope pi ntk yarn self_extend dpe --lengths 8192 16384 \
    --samples 4 --out-dir "$OUT/$task" --title "SmolLM2 quality grid, $task, 10 needles per context"
  $DPE eval "${common[@]}" --task "$task" --methods rope pi ntk yarn self_extend dpe --lengths 32768 \
    --samples 2 --out-dir "$OUT/$task" --title "SmolLM2 quality grid, $task, 10 needles per context"
  for preset in smollm2-135m-16k smollm2-135m-32k; do
    len=$([ "$preset" = smollm2-135m-16k ] && echo 16384 || echo 32768)
    n=$([ "$len" = 16384 ] && echo 4 || echo 2)
    if [ -f "$HERE/../dpe_kernels/presets/$preset.json" ]; then
      $DPE eval "${common[@]}" --task "$task" --methods dpe --preset "$preset" --lengths "$len" --samples "$n" \
        --out-dir "$OUT/${task}_$preset" --title "SmolLM2 quality grid, $task, preset $preset"
    else
      echo "preset $preset not shipped yet (bench/calibrate_smollm2.py --ship): its row is skipped" >&2
    fi
  done
done
