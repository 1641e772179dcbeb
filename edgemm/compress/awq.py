"""AWQ (Lin et al., 2023): activation-aware weight quantization.

1. Scale search: for every group of linears sharing one input X whose scale can be folded into the
   preceding op (see smoothing.py), try s = mean|X|^alpha (normalised) for alpha on a grid in [0, 1),
   quantize W * s, and keep the alpha with the smallest output error ||X (Q(W s)/s - W)^T||^2; fold s.
2. Clip search: for every layer and every (row, group), shrink the quantization range by a ratio in
   [1 - max_shrink, 1] and keep the ratio with the smallest output error of that group.
Both errors are evaluated exactly from H = X^T X (sum over calibration tokens), so no activations are
stored. Layers whose input cannot be rescaled (after a GELU, the residual stream, the pixels) get the
clip search only.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from ..errors import EdgemmError
from . import qformat
from .common import LayerStats, get_module, single_thread, need_forward_loop, run_calibrated, select_layers, set_module, sync_extras
from .config import AWQConfig
from .modules import QuantLinear
from .rtn import quantize_linear_rtn
from .smoothing import fold, scale_groups

__all__ = ["AWQConfig", "awq_quantize", "search_scale", "search_clip"]


def _output_error(D: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """sum_t ||x_t D^T||^2 = sum of (D H) * D."""
    return ((D @ H) * D).sum()


def _fake_quant(W: torch.Tensor, bits: int, group: int, symmetric: bool, clip=None) -> torch.Tensor:
    u, scale, zero = qformat.rtn(W, bits, group, symmetric, clip)
    return qformat.dequantize(u, scale, zero)


def search_scale(weights: list[torch.Tensor], H: torch.Tensor, mean_abs: torch.Tensor, bits: int, group: int,
                 symmetric: bool, n_grid: int = 20):
    """-> (best s [K], {alpha: error}); alpha = 0 (s = 1) is always a candidate, so AWQ never does worse
    than RTN on this objective."""
    H = H.float()
    x = mean_abs.float().clamp(min=1e-4)
    errors = {}
    best, best_s = None, torch.ones_like(x)
    for i in range(n_grid):
        alpha = i / n_grid
        s = x.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for W in weights:
            Wq = _fake_quant(W.float() * s[None, :], bits, group, symmetric) / s[None, :]
            err += float(_output_error(Wq - W.float(), H))
        errors[round(alpha, 4)] = err
        if best is None or err < best:
            best, best_s = err, s
    return best_s, errors


def search_clip(W: torch.Tensor, H: torch.Tensor, bits: int, group: int, symmetric: bool, max_shrink: float = 0.5,
                clip_grid: int = 20) -> torch.Tensor:
    """Per (row, group) clip ratio [N, K/G] minimising that group's output error d_g^T H_gg d_g."""
    W = W.float()
    n, k = W.shape
    G = k // group
    Hg = torch.stack([H[g * group:(g + 1) * group, g * group:(g + 1) * group] for g in range(G)]).float()
    best_err = torch.full((n, G), float("inf"))
    best = torch.ones(n, G)
    for i in range(max(1, int(max_shrink * clip_grid))):
        r = 1.0 - i / clip_grid
        clip = torch.full((n, G), r)
        D = (_fake_quant(W, bits, group, symmetric, clip) - W).reshape(n, G, group)
        err = torch.einsum("ngk,gkl,ngl->ng", D, Hg, D)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, clip, best)
    return best


@torch.no_grad()
def awq_quantize(model: nn.Module, config: AWQConfig, forward_loop=None, quiet: bool = True) -> dict:
    """Quantize the selected nn.Linear layers with AWQ (scales folded where the graph allows)."""
    config.validate()
    need_forward_loop(forward_loop, "awq")
    t0 = time.perf_counter()
    layers = select_layers(model, config.include, config.exclude)
    groups = {name: qformat.resolve_group(layer.in_features, config.group_size, name, config.bits) for name, layer in layers.items()}
    sgroups = scale_groups(model, layers) if config.scale_search else []
    folded: list[dict] = []

    def process(names, stats):
        inblock = set(names)
        for sg in sgroups:
            if not set(sg.linears) <= inblock or any(n not in stats for n in sg.linears):
                continue
            st = stats[sg.linears[0]]
            ws = [get_module(model, n).weight.detach() for n in sg.linears]
            g = groups[sg.linears[0]]
            with single_thread():
                s, errs = search_scale(ws, st.hessian, st.mean_abs, config.bits, g, config.symmetric, config.n_grid)
            fold(model, sg, s)
            for n in sg.linears:  # the inputs of the group are now X / s
                stats[n].hessian = stats[n].hessian / (s.double()[:, None] * s.double()[None, :])
                stats[n].abs_sum = stats[n].abs_sum / s.double()
            best_alpha = min(errs, key=errs.get)
            folded.append({"prev": sg.prev, "linears": sg.linears, "alpha": best_alpha,
                           "gain": round(errs[0.0] / errs[best_alpha], 4) if errs[best_alpha] > 0 else None})
        for name in names:
            layer = get_module(model, name)
            if not isinstance(layer, nn.Linear):
                raise EdgemmError(f"awq: {name} is no longer a float nn.Linear")
            st = stats.get(name)
            clip = None
            if st is not None and st.n > 0 and config.clip_search:
                with single_thread():
                    clip = search_clip(layer.weight.detach(), st.hessian, config.bits, groups[name], config.symmetric,
                                       config.max_shrink, config.clip_grid)
            method = "awq" if st is not None and st.n > 0 else "rtn"
            set_module(model, name, quantize_linear_rtn(layer, config.bits, config.group_size, config.symmetric, name,
                                                        method=method, clip=clip))

    missing = run_calibrated(model, list(layers), forward_loop, lambda n, m: LayerStats(m.in_features, hessian=True),
                             process, config.sequential, "awq", quiet)
    sync_extras(model)
    return {"method": "awq", "layers": list(layers), "uncalibrated": missing, "scaled_groups": folded,
            "wall_s": round(time.perf_counter() - t0, 2)}
