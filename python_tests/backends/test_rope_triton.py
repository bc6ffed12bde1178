"""backends/rope_triton.py on its own: its torch.library ops (rope_triton, rope_out_triton,
rope_and_cache_triton) pass opcheck. Its parity with the float64 oracle runs in test_rope.py
(the ``triton`` backend parameter, where triton runs)."""
import pytest
import torch

from conftest import compiled_backends
from test_rope import BACKENDS, _cache_op_args, _op_args


def test_opcheck_rope_triton():
    if "triton" not in compiled_backends():
        pytest.skip("triton is not installed")
    import dpe_kernels.backends.rope_triton  # noqa: F401  (registers the op)

    torch.library.opcheck(torch.ops.dpe_kernels.rope_triton.default, _op_args())


def test_opcheck_triton_out_ops():
    if "triton" not in BACKENDS:
        pytest.skip("triton is not usable here")
    from dpe_kernels.backends import rope_triton

    a = _cache_op_args()
    torch.library.opcheck(torch.ops.dpe_kernels.rope_and_cache_triton.default, a)
    rope_args = (a[0], a[1], a[3], a[4], a[5], a[6], a[7], a[8], a[9])
    outs = tuple(x.clone() for x in rope_triton.rope_triton(*rope_args))
    torch.library.opcheck(torch.ops.dpe_kernels.rope_out_triton.default, rope_args + outs)
