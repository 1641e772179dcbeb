"""Weight compression: quantization (RTN, GPTQ, AWQ, W8A8 with shadow outliers) and N:M sparsity
(magnitude, Wanda, SparseGPT, MaskLLM) for the nn.Linear layers of any torch module.

    from edgemm.compress import apply, config_from_dict
    from edgemm.compress.calibration import shapes_forward_loop

    loop = shapes_forward_loop(processor)
    apply(model, config_from_dict({"method": "gptq", "bits": 4, "group_size": 32}), forward_loop=loop)

Each method is one module (rtn, gptq, awq, w8a8, magnitude, wanda, sparsegpt, maskllm) with a dataclass
config and one entry function `(model, config, forward_loop=None) -> report`. Packed layers follow
docs/formats.md and save/load as edgemm checkpoints (see restore.py). Importing this package does not
import torch (the configs are plain dataclasses); the methods do.
"""

from __future__ import annotations

import importlib
import time

from ..errors import EdgemmError
from .config import (CONFIGS, QUANT_METHODS, SPARSE_METHODS, AWQConfig, GPTQConfig, MagnitudeConfig, MaskLLMConfig,
                     RTNConfig, SparseGPTConfig, W8A8Config, WandaConfig, config_from_dict)

# method -> (module, entry function)
ENTRY = {
    "rtn": ("rtn", "rtn_quantize"),
    "gptq": ("gptq", "gptq_quantize"),
    "awq": ("awq", "awq_quantize"),
    "w8a8": ("w8a8", "w8a8_quantize"),
    "magnitude": ("magnitude", "magnitude_prune"),
    "wanda": ("wanda", "wanda_prune"),
    "sparsegpt": ("sparsegpt", "sparsegpt_prune"),
    "maskllm": ("maskllm", "maskllm_prune"),
}


def entry_function(config):
    cls = type(config)
    method = getattr(cls, "method", None)
    if method not in ENTRY or CONFIGS.get(method) is not cls:
        raise EdgemmError(f"not a compression config: {cls.__name__} (use one of {', '.join(c.__name__ for c in CONFIGS.values())})")
    mod, fn = ENTRY[method]
    return getattr(importlib.import_module(f"{__name__}.{mod}"), fn)


def apply(model, config, forward_loop=None, quiet: bool = True) -> dict:
    """Apply one method (or a list of configs, in order) to `model` in place.

    Dispatches on the config's type (like torchao's quantize_). Returns a report: the method, the
    layers touched, uncalibrated layers (never reached by forward_loop; they fall back to RTN or
    magnitude), and the model's weight bytes before and after (as saved)."""
    if isinstance(config, dict):
        config = config_from_dict(config)
    if isinstance(config, (list, tuple)):
        reports = [apply(model, c, forward_loop, quiet) for c in config]
        return {"method": "+".join(r["method"] for r in reports), "stages": reports,
                "weight_bytes_before": reports[0]["weight_bytes_before"] if reports else weight_bytes(model),
                "weight_bytes_after": weight_bytes(model)}
    fn = entry_function(config)
    before = weight_bytes(model)
    t0 = time.perf_counter()
    rep = fn(model, config, forward_loop=forward_loop, quiet=quiet)
    rep = {**rep, "config": config.to_dict(), "layers_touched": len(rep.get("layers", [])),
           "weight_bytes_before": before, "weight_bytes_after": weight_bytes(model),
           "wall_s": round(time.perf_counter() - t0, 2)}
    return rep


def weight_bytes(model) -> int:
    """Bytes of the model's tensors as an edgemm checkpoint stores them: packed integer weights, scales,
    zero points, biases, norms, embeddings (N:M-sparse layers count as stored: dense with their zeros)."""
    from ..models.checkpoint import state_dict_for_saving

    return sum(t.numel() * t.element_size() for t in state_dict_for_saving(model).values())


def layer_formats(model) -> dict[str, dict]:
    """Per nn.Linear / packed layer: its storage format and, when sparse, its N:M layout."""
    from torch import nn

    from .common import NM_ATTR
    from .modules import PackedLinear

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, PackedLinear):
            d = mod.metadata()
        elif isinstance(mod, nn.Linear):
            d = {"format": str(mod.weight.dtype).replace("torch.", "").replace("float32", "fp32").replace("float16", "fp16")
                 .replace("bfloat16", "bf16"), "in_features": mod.in_features, "out_features": mod.out_features,
                 "bias": mod.bias is not None}
        else:
            continue
        nm = getattr(mod, NM_ATTR, None)
        if nm is not None:
            d = {**d, "nm": f"{nm['n']}:{nm['m']}", "sparsity_method": nm.get("method")}
        d["bytes"] = sum(t.numel() * t.element_size() for t in mod.state_dict().values())
        out[name] = d
    return out


def __getattr__(name):  # lazy: the methods import torch
    for method, (mod, fn) in ENTRY.items():
        if name == fn:
            return getattr(importlib.import_module(f"{__name__}.{mod}"), fn)
    if name in ("QuantLinear", "W8A8Linear", "PackedLinear"):
        return getattr(importlib.import_module(f"{__name__}.modules"), name)
    raise AttributeError(name)


__all__ = ["apply", "config_from_dict", "weight_bytes", "layer_formats", "RTNConfig", "GPTQConfig", "AWQConfig",
           "W8A8Config", "MagnitudeConfig", "WandaConfig", "SparseGPTConfig", "MaskLLMConfig", "CONFIGS",
           "QUANT_METHODS", "SPARSE_METHODS", *[fn for _, fn in ENTRY.values()]]
