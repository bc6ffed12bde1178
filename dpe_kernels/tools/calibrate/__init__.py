"""The paper's two detection steps (docs/method.md, "The key-dimension mask and the configuration search") as tools
that work for any Hugging Face RoPE model with Llama-style attention (q_proj / k_proj).

Step 1, key dimensions (:func:`select_dims`): run the model over essay text at several
lengths; forward hooks on every layer's ``q_proj`` and ``k_proj`` see the pre-RoPE q and k
and accumulate ``C[l, h, i] = mean_t ||q_t^(i)|| * ||k_t^(i)||`` (k from KV head
``h // n_rep``) while the forward runs: a layer's q is held only until its k arrives, reduced
to a ``[H_q, P]`` sum at once, and freed, so no q/k tensor outlives its layer. Scores are the
mean over samples and lengths; the key dimensions of ``(l, h)`` are its top-k pairs.
Written to safetensors: ``scores`` ``[L, H_q, P]``, ``mask`` (top-k per query head),
``scores_kv`` ``[L, H_k, P]`` (mean of the scores of a KV head's query heads) and ``mask_kv``.

Step 2, effective length per group (:func:`detect`): with the window and the mask fixed,
coordinate ascent from the Self-Extend point (every group at ``2 * ceil(target / train)``, the
paper's sweep default) at the target length: each group's scale is swept over ``{1, 2, 4, ...}``
with the other groups at their current best; a change is accepted only when the mean paired
gain on the same samples exceeds its standard error; passes repeat while anything changes
(bounded); the final configuration and the start are then scored on fresh samples and the
better one is kept, so the result cannot be worse than Self-Extend on fresh samples of its own
objective. One JSONL record per scored (configuration, sample): an interrupted calibration
resumes. (This replaced the first per-group sweep, which fixed the other groups at the default
and combined the per-group picks without scoring the combination.)

Scorers: ``passkey-logprob`` / ``niah-logprob`` (teacher-forced log-probability of the answer,
one forward pass per sample: a score with information in every sample), ``passkey`` (exact
key) and ``niah`` (4-needle recall fraction) by greedy generation, ``ppl`` (minus the mean
next-token loss beyond the pre-training length: a cheap prox

The package: :mod:`.dims` (step 1), :mod:`.ascent` (step 2), :mod:`.claims` (several processes
sharing one step-2 run), :mod:`.from_eval` (the step-2 start's scores from evaluation records).
"""
from .ascent import (SCORERS, DetectResult, MissingScore, coordinate_ascent, detect, detect_setting, replay,
                     score_sample, scorer_sample, self_extend_scales, sweep_frontier)
from .from_eval import start_records_from_eval
from .dims import default_top_k, key_dimension_scores, load_dims_mask, select_dims, top_k_masks

__all__ = ["key_dimension_scores", "top_k_masks", "select_dims", "load_dims_mask", "default_top_k",
           "self_extend_scales", "scorer_sample", "score_sample", "coordinate_ascent", "replay", "sweep_frontier",
           "detect", "detect_setting", "start_records_from_eval", "DetectResult", "MissingScore", "SCORERS"]
