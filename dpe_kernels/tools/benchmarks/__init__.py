"""Microbenchmarks as importable modules, each with ``main(argv)``: ``rope``, ``attention``; ``common`` holds
what they share. ``dpe bench NAME`` and ``python bench/bench_NAME.py`` run them."""
