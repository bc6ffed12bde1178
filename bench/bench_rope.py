"""The rope benchmark: ``python bench/bench_rope.py [ARGS]`` runs
:mod:`dpe_kernels.tools.benchmarks.rope` (also ``dpe bench rope [ARGS]``); its
docstring lists the arguments. ``pytest bench/bench_rope.py --benchmark-only``
runs its pytest-benchmark cases."""
import sys

from dpe_kernels.tools.benchmarks.rope import *  # noqa: F401,F403  (the pytest-benchmark cases)
from dpe_kernels.tools.benchmarks.rope import main

if __name__ == "__main__":
    sys.exit(main())
