"""Backends of the core ops, chosen by ``backend=`` in :func:`dpe_kernels.dpe_rope` and
:func:`dpe_kernels.dpe_attention`: ``cpu_attention``, ``flash_attention`` (FlashAttention 2),
``triton_rope`` and ``triton_attention`` (Triton kernels; ``triton_utils`` holds what they share).
The compiled C++/CUDA kernels are loaded by :mod:`dpe_kernels.ops`."""
