"""Deprecated path (first release): the evaluation harness is dpe_kernels.tools.eval."""
from .._compat import alias_module

alias_module(__name__)
