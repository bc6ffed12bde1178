"""``dpe``: command-line entry point (demo, eval, bench, select-dims, detect, export-hf).

    dpe demo         passkey retrieval at 16K tokens with plain RoPE and with DPE (SmolLM2-135M, 8K trained)
    dpe eval         passkey / niah / ppl over methods and lengths -> JSONL (resumable), table, plots
    dpe bench        the microbenchmarks (dpe_kernels/tools/benchmarks/)
    dpe select-dims  calibration step 1: key dimensions -> safetensors masks
    dpe detect       calibration step 2: coordinate ascent over the groups' scales -> DPEConfig JSON
    dpe export-hf    write a Hugging Face model directory (for vLLM) from a model loaded offline
    dpe parity       every backend of every op against the float64 oracles; golden vectors (tools/parity.py)

Run ``dpe <command> --help`` for the options.

Bad input never gets far: every argument is checked when it is parsed (``type=`` validators)
or in the command's validation step, which runs before any model is loaded; the few checks
that need the model (its pair count, its tokenizer's prompt length) run right after loading,
before anything is computed. Every failure is ONE line ``dpe SUB: error: ...`` on stderr and
exit code 2, never a traceback.

The options are in :mod:`.parser`, the validation and the commands in :mod:`.commands`.
"""
from __future__ import annotations

from typing import List, Optional

from .commands import COMMANDS, VALIDATORS, CLIError
from .parser import SUBCOMMANDS, build_parser

__all__ = ["main", "build_parser", "SUBCOMMANDS", "CLIError"]


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    sub = args.command_parser
    try:
        VALIDATORS[args.command](args)  # everything that needs no model, before any is loaded
        return COMMANDS[args.command](args)
    except CLIError as e:
        sub.error(str(e))
