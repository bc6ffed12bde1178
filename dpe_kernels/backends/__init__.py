"""Backends of the core ops, chosen by ``backend=`` in :func:`dpe_kernels.dpe_rope` and
:func:`dpe_kernels.dpe_attention`: ``attention_cpu``, ``attention_flash`` (FlashAttention 2), ``paged_cpu``,
``rope_triton``, ``attention_triton`` and ``paged_triton`` (Triton kernels; ``triton_common`` holds what they share).
The compiled C++/CUDA kernels are loaded by :mod:`dpe_kernels.ops`."""
