"""The worker claims of a shared calibration run: which (configuration, sample) another live process
on this machine is scoring (``<jsonl>.claims``), so that processes helping one :func:`.ascent.detect`
never score the same one twice."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Tuple

__all__ = ["Claims"]


class Claims:
    """Which (configuration, sample) another live process on this machine is scoring: one JSON line
    per claim in ``<jsonl>.claims``; a claim whose process has exited, or older than ``ttl_s``
    (a reused process id must not make a waiting process wait for ever), no longer counts."""

    def __init__(self, jsonl: os.PathLike, ttl_s: float = 6 * 3600.0):
        self.path = Path(str(jsonl) + ".claims")
        self.ttl_s = ttl_s

    def claim(self, cfg: Tuple[int, ...], sample: int):
        from ..eval.runner import append_record

        append_record(self.path, {"scales": list(cfg), "sample": sample, "pid": os.getpid(),
                                  "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "epoch": time.time()})

    def live(self) -> set:
        from ..eval.runner import read_records

        out = set()
        now = time.time()
        for c in read_records(self.path):
            pid = int(c.get("pid", -1))
            if pid == os.getpid() or not now - float(c.get("epoch", 0.0)) < self.ttl_s:
                continue
            try:
                os.kill(pid, 0)
            except (ProcessLookupError, PermissionError, OverflowError, ValueError):
                continue
            out.add((tuple(c["scales"]), c["sample"]))
        return out
