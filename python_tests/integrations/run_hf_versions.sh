#!/usr/bin/env bash
# The Hugging Face integration tests against the ends of the tested transformers range: the oldest
# supported release (the first entry of dpe_kernels.integrations.hf.TRANSFORMERS_TESTED) and the
# newest release pip resolves today. Each runs in a virtual environment that sees the main
# environment's packages (torch, the installed dpe_kernels with its extension) and adds its own
# transformers, so only transformers differs from the main suite's run.
#
#   bash python_tests/integrations/run_hf_versions.sh           # both
#   bash python_tests/integrations/run_hf_versions.sh newest    # one of: oldest newest
#
# The newest pass runs with DPE_ALLOW_UNTESTED_TRANSFORMERS=1: a release newer than the tested range
# is refused by apply_dpe (users are safe), and this pass says whether the integration still works
# with it (if it does, widen TRANSFORMERS_TESTED and the "hf" extra; if not, CI fails here).
# Environment: DPE_HF_VENVS (default ~/.cache/dpe_kernels) holds the virtual environments.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
ROOT="${DPE_HF_VENVS:-$HOME/.cache/dpe_kernels}"
TESTS="$PWD/python_tests/integrations/test_hf.py $PWD/python_tests/integrations/test_baselines.py $PWD/python_tests/tools/eval/test_logprob.py $PWD/python_tests/tools/eval/test_multi.py"
OLDEST=$(cd / && python3 -c "from dpe_kernels.integrations.hf import TRANSFORMERS_TESTED as t; print(t[0])")
start=$(date +%s)

for which in ${@:-oldest newest}; do
  venv="$ROOT/venv-transformers-$which"
  [ -x "$venv/bin/python" ] || python3 -m venv --system-site-packages "$venv"
  if [ "$which" = oldest ]; then
    "$venv/bin/python" -m pip install --quiet "transformers==$OLDEST"
    extra=()
  else
    "$venv/bin/python" -m pip install --quiet --upgrade transformers
    extra=(--deselect "$PWD/tests/integrations/test_hf.py::test_installed_transformers_is_tested")
  fi
  v=$(cd / && "$venv/bin/python" -c "import transformers; print(transformers.__version__)")
  inside=$(cd / && "$venv/bin/python" -c "
from dpe_kernels.integrations.hf import check_transformers
try:
    check_transformers(); print('inside the tested range')
except RuntimeError:
    print('OUTSIDE the tested range: apply_dpe refuses it without DPE_ALLOW_UNTESTED_TRANSFORMERS=1')")
  echo "== Hugging Face integration tests, $which transformers: $v ($inside)"
  # From /, with the venv's python: the installed package (with its extension) is what imports.
  (cd / && DPE_ALLOW_UNTESTED_TRANSFORMERS=$([ "$which" = newest ] && echo 1 || echo 0) \
    "$venv/bin/python" -m pytest -q -p no:cacheprovider $TESTS "${extra[@]}")
done
echo "== transformers version passes took $(( $(date +%s) - start )) s"
