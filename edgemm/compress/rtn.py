"""Round-to-nearest weight-only quantization (int8 / int4, symmetric or asymmetric, per channel or
group-wise). No calibration; the baseline GPTQ and AWQ are measured against."""

from __future__ import annotations

import time

import torch
from torch import nn

from ..progress import progress
from . import qformat
from .common import select_layers, set_module, sync_extras
from .config import RTNConfig
from .modules import QuantLinear

__all__ = ["RTNConfig", "rtn_quantize", "quantize_linear_rtn"]


def quantize_linear_rtn(layer: nn.Linear, bits: int, group_size: int, symmetric: bool, name: str = "layer",
                        method: str = "rtn", clip=None) -> QuantLinear:
    """One nn.Linear -> QuantLinear by round-to-nearest (zeros of a sparse layer stay exactly zero)."""
    w = layer.weight.detach().float()
    g = qformat.resolve_group(w.shape[1], group_size, name, bits)
    u, scale, zero = qformat.rtn(w, bits, g, symmetric, clip)
    return QuantLinear.from_codes(layer, u, scale, zero, bits, symmetric, method)


@torch.no_grad()
def rtn_quantize(model: nn.Module, config: RTNConfig, forward_loop=None, quiet: bool = True) -> dict:
    """Quantize the selected nn.Linear layers of `model` in place; returns a small report."""
    config.validate()
    t0 = time.perf_counter()
    layers = select_layers(model, config.include, config.exclude)
    for name, layer in layers.items():  # validate every layer before touching any
        qformat.resolve_group(layer.in_features, config.group_size, name, config.bits)
    with progress(len(layers), "rtn", quiet=quiet) as bar:
        for name, layer in layers.items():
            set_module(model, name, quantize_linear_rtn(layer, config.bits, config.group_size, config.symmetric, name))
            bar.advance(1, info=name)
    sync_extras(model)
    return {"method": "rtn", "layers": list(layers), "wall_s": round(time.perf_counter() - t0, 2)}
