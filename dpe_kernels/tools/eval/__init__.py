"""Long-context evaluation of DPE and the baselines (needs ``transformers``; plots need ``matplotlib``).

    from dpe_kernels.tools.models import load_model
    from dpe_kernels.tools.eval import EvalSpec, run_eval, write_report, read_records

    model, tok = load_model("smollm2")
    run_eval(model, tok, EvalSpec(task="passkey", methods=["rope", "dpe"], lengths=[4096, 16384]),
             "out/results.jsonl")
    write_report(read_records("out/results.jsonl"), "out/summary.md", plot_dir="out")

Modules: prompts (token-exact prompts), passkey, niah, perplexity (loss by position), methods
(baselines and DPE parameters per length), generate (greedy decoding), runner (resumable JSONL),
report (markdown table, heatmaps, loss plot), data (the essays).
"""
from .data import load_essays
from .report import write_report
from .runner import DEFAULT_FORMAT, TASKS, EvalSpec, read_records, run_eval

__all__ = ["load_essays", "EvalSpec", "run_eval", "read_records", "write_report", "TASKS", "DEFAULT_FORMAT"]
