#!/usr/bin/env bash
# One command from a fresh clone: install everything the tests need and run the whole suite.
#
#   1. install.sh: torch 2.13.0 (CPU build), the dev requirements, the package with its C++
#      extension, the model;
#   2. pytest python_tests/                      (Python: kernels vs float64 oracles, integrations, tools, CLI)
#   3. the C++ library on its own         (cmake -S csrc -B build && cmake --build build && ctest)
#   4. the Hugging Face integration tests on the oldest and the newest transformers
#                                         (python_tests/integrations/run_hf_versions.sh: two small venvs)
#   5. the vLLM plugin tests              (python_tests/integrations/run_vllm_tests.sh: vLLM in its own venv)
#
# .ci/run calls this. DPE_TEST_SKIP_INSTALL=1 skips step 1; DPE_TEST_SKIP_HF_VERSIONS=1 skips step 4;
# DPE_TEST_SKIP_VLLM=1 skips step 5.
set -euo pipefail
cd "$(dirname "$0")"
start=$(date +%s)

if [ "${DPE_TEST_SKIP_INSTALL:-0}" = "0" ]; then
  bash install.sh
fi

echo "== pytest python_tests (the installed package)"
# `pytest` (not `python -m pytest`): the checkout is not put on sys.path, so the tests import the
# installed package with its compiled extension.
pytest python_tests

if [ -f csrc/CMakeLists.txt ]; then
  echo "== C++ library: cmake, build, ctest"
  cmake -S csrc -B build/cpp -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build build/cpp -j 2
  ctest --test-dir build/cpp --output-on-failure
fi

if [ "${DPE_TEST_SKIP_HF_VERSIONS:-0}" = "0" ]; then
  bash python_tests/integrations/run_hf_versions.sh
fi

if [ "${DPE_TEST_SKIP_VLLM:-0}" = "0" ] && [ -f python_tests/integrations/run_vllm_tests.sh ]; then
  echo "== vLLM plugin tests (own virtual environment)"
  bash python_tests/integrations/run_vllm_tests.sh
fi
echo "== test.sh took $(( $(date +%s) - start )) s"
