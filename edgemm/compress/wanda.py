"""Wanda (Sun et al., 2023) for N:M patterns: keep the N largest |w_ij| * ||X_j||_2 of every group of M
consecutive inputs (X_j: the j-th input feature over all calibration tokens); no weight update."""

from __future__ import annotations

import time

import torch
from torch import nn

from .common import LayerStats, collect_stats, need_forward_loop, select_layers, sync_extras
from .config import WandaConfig
from .magnitude import magnitude_mask
from .nm import apply_mask, check_layer, topn_mask

__all__ = ["WandaConfig", "wanda_prune", "wanda_mask"]


def wanda_mask(w: torch.Tensor, sq_sum: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """sq_sum: sum over calibration tokens of x_j^2 per input channel."""
    score = w.detach().abs().float() * sq_sum.float().sqrt()[None, :]
    return topn_mask(score, n, m)


@torch.no_grad()
def wanda_prune(model: nn.Module, config: WandaConfig, forward_loop=None, quiet: bool = True) -> dict:
    """One calibration pass on the dense model (as in Wanda), then masks for every selected layer."""
    config.validate()
    need_forward_loop(forward_loop, "wanda")
    n, m = config.nm
    t0 = time.perf_counter()
    layers = select_layers(model, config.include, config.exclude)
    for name, layer in layers.items():
        check_layer(layer.in_features, m, name)
    stats = collect_stats(model, layers, forward_loop, lambda nm_, mod: LayerStats(mod.in_features))
    missing = []
    for name, layer in layers.items():
        st = stats.get(name)
        if st is None or st.n == 0:
            missing.append(name)
            apply_mask(layer, magnitude_mask(layer.weight, n, m), n, m, "magnitude")
        else:
            apply_mask(layer, wanda_mask(layer.weight, st.sq_sum, n, m), n, m, "wanda")
    sync_extras(model)
    return {"method": "wanda", "pattern": f"{n}:{m}", "layers": list(layers), "uncalibrated": missing,
            "wall_s": round(time.perf_counter() - t0, 2)}
