"""Magnitude N:M pruning: keep the N largest |w| of every group of M consecutive inputs of a row."""

from __future__ import annotations

import time

import torch
from torch import nn

from ..errors import EdgemmError
from .common import select_layers, sync_extras
from .config import MagnitudeConfig
from .nm import apply_mask, check_layer, topn_mask

__all__ = ["MagnitudeConfig", "magnitude_prune", "magnitude_mask"]


def magnitude_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    return topn_mask(w.detach().abs().float(), n, m)


@torch.no_grad()
def magnitude_prune(model: nn.Module, config: MagnitudeConfig, forward_loop=None, quiet: bool = True) -> dict:
    config.validate()
    n, m = config.nm
    t0 = time.perf_counter()
    layers = select_layers(model, config.include, config.exclude, kinds=(nn.Linear,))
    for name, layer in layers.items():
        check_layer(layer.in_features, m, name)
    for name, layer in layers.items():
        if not isinstance(layer, nn.Linear):
            raise EdgemmError(f"magnitude: {name} is not a float nn.Linear")
        apply_mask(layer, magnitude_mask(layer.weight, n, m), n, m, "magnitude")
    sync_extras(model)
    return {"method": "magnitude", "pattern": f"{n}:{m}", "layers": list(layers), "wall_s": round(time.perf_counter() - t0, 2)}
