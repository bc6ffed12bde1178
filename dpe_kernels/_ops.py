"""Deprecated path (first release): see dpe_kernels._compat.MOVED for the new one."""
from ._compat import alias_module

alias_module(__name__)
