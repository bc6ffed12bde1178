"""The one pre-training-length rule (dpe_kernels.integrations.lengths), used by the Hugging Face
integration's train_length and the vLLM plugin. Fake config dicts and objects: no network, no model."""
import json
from types import SimpleNamespace

import pytest

from dpe_kernels.integrations.lengths import pretraining_length

LLAMA31 = {  # meta-llama/Llama-3.1-8B config.json (the length fields)
    "architectures": ["LlamaForCausalLM"], "max_position_embeddings": 131072,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0}


@pytest.mark.parametrize("cfg, want, field", [
    (LLAMA31, 131072, "rope_type llama3"),
    # transformers >= 5 spelling of the same config
    ({"max_position_embeddings": 131072, "rope_parameters": {"rope_type": "llama3", "factor": 8.0,
      "original_max_position_embeddings": 8192, "rope_theta": 500000.0}}, 131072, "rope_type llama3"),
    ({"max_position_embeddings": 32768, "rope_scaling": {"type": "yarn", "factor": 4.0,
      "original_max_position_embeddings": 8192}}, 8192, "original_max_position_embeddings"),
    ({"max_position_embeddings": 8192, "rope_parameters": {"rope_type": "default", "rope_theta": 1e5}},
     8192, "max_position_embeddings"),
    ({"text_config": {"max_position_embeddings": 4096}}, 4096, "max_position_embeddings"),
    # a directory written by `dpe export-hf --dpe`: max_position_embeddings raised to the target
    ({"max_position_embeddings": 65536, "dpe": {"preset": "auto", "train_length": 8192,
                                                 "target_length": 65536}}, 8192, "dpe.train_length"),
])
def test_pretraining_length_rule(cfg, want, field):
    n, where = pretraining_length(cfg)
    assert n == want and field in where, (n, where)


def test_pretraining_length_unknown():
    assert pretraining_length({"hidden_size": 8})[0] is None


def test_config_objects_and_hf_train_length_follow_the_same_rule():
    """hf.train_length is the same rule on model.config (an object, not a dict)."""
    from dpe_kernels.integrations.hf import train_length

    obj = SimpleNamespace(**json.loads(json.dumps(LLAMA31)))
    assert pretraining_length(obj)[0] == 131072
    assert train_length(SimpleNamespace(config=obj)) == 131072  # not 8192: the llama3 rule
    assert train_length(SimpleNamespace(config=SimpleNamespace())) == 4096  # documented fallback
