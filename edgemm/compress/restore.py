"""Checkpoint restorers: rebuild packed / sparse layers from config.extras before the weights load.

`config.extras["quantization"]` = {"format_version": 1, "layers": {name: metadata}} where metadata is
`PackedLinear.metadata()` (format int8 | int4 | w8a8, shapes, group size, ...); each named nn.Linear is
replaced by an empty packed layer whose tensors (qweight, scales, ...) then load from model.safetensors.
`config.extras["sparsity"]` = {"format_version": 1, "layers": {name: {"n", "m", "method"}}} marks the
layers whose weights are N:M sparse (stored dense with their zeros).
Imported by edgemm.models.checkpoint.load_checkpoint when either key is present.
"""

from __future__ import annotations

from torch import nn

from ..errors import EdgemmError
from ..models.checkpoint import RESTORERS
from .common import NM_ATTR
from .modules import restore_layer

FORMAT_VERSION = 1


def _layers(extra, key: str) -> dict:
    if not isinstance(extra, dict) or not isinstance(extra.get("layers"), dict):
        raise EdgemmError(f"config.extras.{key} must be an object with a 'layers' mapping")
    if int(extra.get("format_version", 1)) > FORMAT_VERSION:
        raise EdgemmError(f"config.extras.{key} has format_version {extra['format_version']}; this edgemm reads up to {FORMAT_VERSION}")
    return extra["layers"]


def _find(model: nn.Module, name: str, key: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise EdgemmError(f"config.extras.{key} names layer {name!r}, which this model does not have") from None


def restore_quantization(model: nn.Module, extra) -> None:
    from .common import set_module

    for name, meta in _layers(extra, "quantization").items():
        old = _find(model, name, "quantization")
        if not isinstance(old, nn.Linear):
            raise EdgemmError(f"config.extras.quantization: {name} is not a linear layer")
        if not isinstance(meta, dict):
            raise EdgemmError(f"config.extras.quantization: layer {name} must be an object")
        new = restore_layer(meta, name)
        if (new.in_features, new.out_features) != (old.in_features, old.out_features):
            raise EdgemmError(f"config.extras.quantization: layer {name} is {new.in_features}->{new.out_features}, "
                              f"the model config implies {old.in_features}->{old.out_features}")
        set_module(model, name, new)


def restore_sparsity(model: nn.Module, extra) -> None:
    from .nm import parse_pattern

    for name, meta in _layers(extra, "sparsity").items():
        mod = _find(model, name, "sparsity")
        if not isinstance(meta, dict):
            raise EdgemmError(f"config.extras.sparsity: layer {name} must be an object")
        n, m = parse_pattern(meta)
        if mod.in_features % m:
            raise EdgemmError(f"config.extras.sparsity: {name} has {mod.in_features} inputs, not a multiple of M={m}")
        setattr(mod, NM_ATTR, {"n": n, "m": m, "method": str(meta.get("method", "?"))})


# quantization first: sparsity marks whatever module sits at the name afterwards
RESTORERS["quantization"] = restore_quantization
RESTORERS["sparsity"] = restore_sparsity
