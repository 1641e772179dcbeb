"""edgemm checkpoints: a directory with config.json, model.safetensors and tokenizer.json.

No pickle anywhere: tensors are safetensors, metadata is JSON. Writes are atomic (a temp directory
renamed into place), and every file is validated on load with one-line errors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import EdgemmError
from ..fileio import atomic_dir
from ..processor import Processor
from .config import VLMConfig
from .modeling import EdgeVLM

CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "config.json", "model.safetensors", "tokenizer.json"

# Later stages (quantization, sparsity, token compression) record themselves in config.extras; a
# restorer registered under that key rebuilds the matching modules before the weights load.
RESTORERS: dict[str, Callable[[EdgeVLM, object], None]] = {}


@dataclass
class LoadedModel:
    model: EdgeVLM
    processor: Processor
    source: str  # what the user asked for ("demo", a path, ...)
    path: Path | None = None

    @property
    def config(self) -> VLMConfig:
        return self.model.config


def state_dict_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous tensors with tied weights stored once (safetensors refuses shared storage)."""
    sd = model.state_dict()
    if getattr(getattr(model, "config", None), "text", None) is not None and model.config.text.tie_word_embeddings:
        sd.pop("text.lm_head.weight", None)
    out, seen = {}, {}
    for k, v in sd.items():
        key = (v.data_ptr(), v.dtype, tuple(v.shape), tuple(v.stride())) if v.numel() else None
        if key is not None and key in seen:
            v = v.clone()
        elif key is not None:
            seen[key] = k
        out[k] = v.detach().contiguous()
    return out


def save_checkpoint(model: EdgeVLM, tokenizer, path: str | Path, metadata: dict | None = None,
                    float_dtype: torch.dtype | None = None) -> Path:
    """Write config.json, model.safetensors and tokenizer.json into `path` atomically.

    `float_dtype` (e.g. torch.float16) stores floating-point tensors in that type; they load back
    into the model's float32 parameters."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
        meta = {"format": "edgemm"}
        if metadata:
            meta.update({k: str(v) for k, v in metadata.items()})
        sd = state_dict_for_saving(model)
        if float_dtype is not None:
            sd = {k: v.to(float_dtype) if v.dtype == torch.float32 else v for k, v in sd.items()}
        save_file(sd, str(tmp / WEIGHTS_FILE), metadata=meta)
        tok = tokenizer.tokenizer if isinstance(tokenizer, Processor) else tokenizer
        tok.save(str(tmp / TOKENIZER_FILE))
    return path


def read_config(path: Path) -> dict:
    f = path / CONFIG_FILE
    if not f.is_file():
        raise EdgemmError(f"no {CONFIG_FILE} in {path}")
    try:
        return json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdgemmError(f"{f} is not valid JSON ({e})") from None


def read_safetensors(f: Path) -> dict[str, torch.Tensor]:
    if not f.is_file():
        raise EdgemmError(f"missing weights file {f}")
    try:
        with safe_open(str(f), framework="pt") as st:
            return {k: st.get_tensor(k) for k in st.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        msg = str(e).splitlines()[0][:160]
        raise EdgemmError(f"corrupt or truncated safetensors file {f}: {msg}") from None


def load_state(model: torch.nn.Module, sd: dict[str, torch.Tensor], where: str) -> None:
    """Strict load with one-line errors for missing/unexpected keys and wrong shapes or dtypes."""
    expected = model.state_dict()
    if getattr(getattr(model, "config", None), "text", None) is not None and model.config.text.tie_word_embeddings:
        expected.pop("text.lm_head.weight", None)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing:
        raise EdgemmError(f"{where}: missing tensor {missing[0]} ({len(missing)} missing)")
    if unexpected:
        raise EdgemmError(f"{where}: unexpected tensor {unexpected[0]} ({len(unexpected)} unexpected)")
    for k, v in sd.items():
        e = expected[k]
        if tuple(v.shape) != tuple(e.shape):
            raise EdgemmError(f"{where}: tensor {k} has shape {list(v.shape)}, the config implies {list(e.shape)}")
        if v.dtype != e.dtype and not (v.is_floating_point() and e.is_floating_point()):
            raise EdgemmError(f"{where}: tensor {k} has dtype {v.dtype}, expected {e.dtype}")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise EdgemmError(f"{where}: tensor {k} holds NaN or Inf")
    model.load_state_dict(sd, strict=False)
    if model.config.text.tie_word_embeddings:
        model.text.lm_head.weight = model.text.embed_tokens.weight


def load_checkpoint(path: str | Path, source: str | None = None) -> LoadedModel:
    path = Path(path)
    if not path.is_dir():
        raise EdgemmError(f"not a model directory: {path}")
    cfg = VLMConfig.from_dict(read_config(path))
    tok_file = path / TOKENIZER_FILE
    if not tok_file.is_file():
        raise EdgemmError(f"no {TOKENIZER_FILE} in {path}")
    processor = Processor.from_file(tok_file, cfg)
    with torch.device("meta"):
        model = EdgeVLM(cfg)
    model = model.to_empty(device="cpu")
    if "quantization" in cfg.extras or "sparsity" in cfg.extras:
        import edgemm.compress.restore  # noqa: F401  (registers the restorers of packed / sparse layers)
    for key, restore in RESTORERS.items():
        if key in cfg.extras:
            restore(model, cfg.extras[key])
    load_state(model, read_safetensors(path / WEIGHTS_FILE), str(path / WEIGHTS_FILE))
    model.eval()
    return LoadedModel(model, processor, source or str(path), path)


def component_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of the stored tensors per top-level component (vision, projector, text)."""
    out: dict[str, int] = {}
    for k, v in state_dict_for_saving(model).items():
        comp = k.split(".", 1)[0]
        out[comp] = out.get(comp, 0) + v.numel() * v.element_size()
    return out
