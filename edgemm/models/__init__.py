"""The reference model (EdgeVLM), its configs, checkpoints and importers."""

from __future__ import annotations

from pathlib import Path

from ..errors import EdgemmError
from .config import ProjectorConfig, TextConfig, VisionConfig, VLMConfig

BUILTIN = ("demo", "demo-small", "demo-kd")  # demo-kd: demo-small's architecture distilled from demo (edgemm distill)


def builtin_path(name: str) -> Path:
    return Path(__file__).resolve().parent.parent / "assets" / name


def resolve(spec: str) -> tuple[str, Path]:
    """-> (kind, path) with kind 'edgemm' or 'hf'."""
    if spec in BUILTIN:
        p = builtin_path(spec)
        if not (p / "config.json").is_file():
            raise EdgemmError(f"the built-in model {spec!r} is missing from this install ({p}); run `edgemm train-demo`")
        return "edgemm", p
    p = Path(spec)
    if not p.exists():
        raise EdgemmError(f"unknown model {spec!r}: not a built-in name ({', '.join(BUILTIN)}) nor an existing path")
    if not p.is_dir():
        raise EdgemmError(f"a model is a directory (config.json, model.safetensors, tokenizer.json), got a file: {p}")
    from .checkpoint import read_config
    from .hf import is_hf_llava

    if is_hf_llava(p):
        return "hf", p
    cfg = read_config(p)
    if cfg.get("format") == "edgemm":
        return "edgemm", p
    raise EdgemmError(f"{p} is neither an edgemm checkpoint nor a Hugging Face LLaVA directory")


def load_model(spec: str):
    """'demo', 'demo-small', an edgemm checkpoint directory or a HF LLaVA directory -> LoadedModel."""
    kind, path = resolve(str(spec))
    if kind == "hf":
        from .hf import from_hf

        return from_hf(path)
    from .checkpoint import load_checkpoint

    return load_checkpoint(path, source=str(spec))


def from_hf(path):
    from .hf import from_hf as _from_hf

    return _from_hf(path)


def __getattr__(name):  # lazy: importing edgemm.models must not import torch
    if name in ("EdgeVLM", "KVCache"):
        from . import modeling

        return getattr(modeling, name)
    if name in ("save_checkpoint", "load_checkpoint", "LoadedModel"):
        from . import checkpoint

        return getattr(checkpoint, name)
    if name in ("generate", "SamplingConfig", "GenerationResult", "GenerationStats"):
        from . import generation

        return getattr(generation, name)
    raise AttributeError(name)


__all__ = ["VLMConfig", "VisionConfig", "TextConfig", "ProjectorConfig", "load_model", "from_hf", "resolve",
           "EdgeVLM", "KVCache", "save_checkpoint", "load_checkpoint", "LoadedModel", "generate", "SamplingConfig"]
