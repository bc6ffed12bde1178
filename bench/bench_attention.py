"""The attention benchmark: ``python bench/bench_attention.py [ARGS]`` runs
:mod:`dpe_kernels.tools.benchmarks.attention` (also ``dpe bench attention [ARGS]``); its
docstring lists the arguments. ``pytest bench/bench_attention.py --benchmark-only``
runs its pytest-benchmark cases."""
import sys

from dpe_kernels.tools.benchmarks.attention import *  # noqa: F401,F403  (the pytest-benchmark cases)
from dpe_kernels.tools.benchmarks.attention import main

if __name__ == "__main__":
    sys.exit(main())
