"""What every benchmark shares: the paper's configuration it measures, timing,
the machine description, and the preamble of a results file."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
import time

import torch

import dpe_kernels
from dpe_kernels.config import PAPER_PRESETS, WINDOW

__all__ = ["PAPER_SCALES", "WINDOW", "time_min", "report_preamble", "machine_description", "package_version",
           "SCRIPT_NAMES"]

# The configuration the kernel benchmarks measure: the paper's Llama-3-8B scales, w = 1024.
PAPER_SCALES = list(PAPER_PRESETS["llama3-8b"])

# How a results file names the command that made it (after "python ").
SCRIPT_NAMES = {"rope": "-m dpe_kernels.tools.benchmarks.rope", "attention": "-m dpe_kernels.tools.benchmarks.attention"}


def time_min(fn, repeats: int, budget_s: float, device="cpu", burst: int = 20) -> float:
    """Best of `repeats` timed calls after one warm-up (fewer if past the time budget).

    On a GPU one timed repeat is a burst of `burst` calls between two synchronisations
    (the time is their mean): a single synchronised call would time mostly the launch."""
    cuda = torch.device(device).type == "cuda"
    n = burst if cuda else 1
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fn()
    sync()
    best, start = float("inf"), time.perf_counter()
    for i in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t0) / n)
        if time.perf_counter() - start > budget_s and i >= 1:
            break
    return best


def report_preamble(title: str, script: str, argv, machine: str) -> str:
    """Heading and the machine / date / commit / command lines of a results file.
    ``script``: the command's script path (relative to the checkout) or module."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip() or "unknown"
        if subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "dpe_kernels", "csrc"]).returncode:
            commit += " (with uncommitted changes)"
    except OSError:
        commit = "unknown"
    cmd = "python " + " ".join([script] + list(argv if argv is not None else sys.argv[1:]))
    return (f"# {title}\n\n- Machine: {machine}\n"
            f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, commit {commit}\n"
            f"- Command: `{cmd}`\n")


def machine_description(device="cpu") -> str:
    cpu = platform.processor() or "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = ""
    try:
        text = open("/proc/cpuinfo").read()
        flags = ", ".join(f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_bf16")
                          if f" {f}" in text)
        if " amx_bf16" not in text:
            flags += " (no AMX)"
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = ""
    if torch.device(device).type == "cuda":
        p = torch.cuda.get_device_properties(device)
        gpu = (f"GPU {p.name} ({p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, "
               f"CUDA {torch.version.cuda}, triton {package_version('triton')}); host: ")
    return (f"{gpu}{cpu}; {os.cpu_count()} logical cores; {mem:.0f} GiB RAM; ISA flags: {flags or 'n/a'}; "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads); "
            f"dpe_kernels {dpe_kernels.__version__}; Python {platform.python_version()}")


def package_version(module: str) -> str:
    try:
        return __import__(module).__version__
    except (ImportError, AttributeError):
        return "n/a"
