"""``python -m dpe_kernels.tools.cli``: the ``dpe`` console script."""
import sys

from . import main

sys.exit(main())
