"""Deprecated path (first release) of the ``dpe`` command: dpe_kernels.tools.cli."""
import sys

from ._compat import alias_module

_cli = alias_module("dpe_kernels.cli")

if __name__ == "__main__":
    sys.exit(_cli.main())
