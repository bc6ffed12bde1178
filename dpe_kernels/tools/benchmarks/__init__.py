"""The microbenchmarks, each a module with ``main(argv)``: ``rope``, ``attention``, ``paged``; ``common``
holds what they share. ``dpe bench NAME [-- ARGS]`` and ``python -m dpe_kernels.tools.benchmarks.NAME
[ARGS]`` run them; ``pytest dpe_kernels/tools/benchmarks/NAME.py --benchmark-only`` runs the
pytest-benchmark cases of rope and attention. This is their one home (bench/ holds the quality and
calibration scripts and the results)."""
