"""Research and command-line tools: the ``dpe`` CLI, the evaluation harness (``eval``), calibration
(``calibrate``), model loading (``models``) and the benchmarks (``benchmarks``)."""
