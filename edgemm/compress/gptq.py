"""GPTQ (Frantar et al., 2022): quantize the columns of W one at a time and spread each column's error
over the not-yet-quantized columns with the inverse Hessian of the layer's reconstruction loss
(H = 2/n X^T X from calibration inputs), with damping, act-order and lazy block updates.

With act-order the columns are visited by decreasing diag(H) while the groups stay the original
consecutive inputs ("static groups": their scales come from the original weights), so the result is the
plain group-wise format of docs/formats.md. On an N:M-sparse layer the pruned weights are held at code
`zero` (exactly 0) and their error is propagated like any other, so quantization keeps the zeros.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from ..errors import EdgemmError
from . import qformat
from .common import (LayerStats, single_thread, get_module, hessian_inverse_chol, need_forward_loop, prepare_hessian, run_calibrated,
                     select_layers, set_module, sync_extras)
from .config import GPTQConfig
from .modules import QuantLinear
from .nm import existing_mask
from .rtn import quantize_linear_rtn

__all__ = ["GPTQConfig", "gptq_quantize", "gptq_weight"]


def gptq_weight(*args, **kwargs):
    """GPTQ on one weight matrix W [N, K] with Hessian H [K, K] -> (codes u, scale, zero) as in qformat.

    Arguments: W, H, bits, group, symmetric, damp=0.01, act_order=True, block_size=128, keep=None
    (bool [N, K]: the weights allowed to be nonzero under N:M sparsity; the others get code zero)."""
    with single_thread():
        return _gptq_weight(*args, **kwargs)


def _gptq_weight(W: torch.Tensor, H: torch.Tensor, bits: int, group: int, symmetric: bool, damp: float = 0.01,
                act_order: bool = True, block_size: int = 128, keep: torch.Tensor | None = None, name: str = "layer"):
    W = W.detach().float()
    n, k = W.shape
    W, H = prepare_hessian(W, H.float())
    if keep is not None:
        W = W * keep
    ngroups = k // group
    lo, hi = (1.0, 255.0) if (symmetric and bits == 8) else (0.0, float(qformat.QMAX[bits]))
    static = act_order or group == k
    if static:
        scale, zero = qformat.qparams(W, bits, group, symmetric)
    else:
        scale = torch.ones(n, ngroups)
        zero = torch.zeros(n, ngroups, dtype=torch.int16)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(k)
    W = W[:, perm]
    H = H[perm][:, perm]
    keep_p = keep[:, perm] if keep is not None else None
    Hinv = hessian_inverse_chol(H, damp, name)
    U = torch.zeros(n, k, dtype=torch.int16)
    gidx = perm // group
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = int(gidx[col])
            if not static and col % group == 0:
                # group parameters from the current (error-updated) weights of the group's columns
                inside = W1[:, i:min(i + group, i2 - i1)]
                beyond = W[:, i2:col + group] if col + group > i2 else W1[:, :0]
                wg = torch.cat([inside, beyond], 1)
                if keep_p is not None:
                    wg = wg * torch.cat([keep_p[:, col:min(col + group, i2)], keep_p[:, i2:col + group]], 1)
                s, z = qformat.qparams(wg, bits, group, symmetric)
                scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
            w = W1[:, i]
            s, z = scale[:, g], zero[:, g].float()
            u = torch.clamp(torch.round(w / s) + z, lo, hi)
            if keep_p is not None:
                u = torch.where(keep_p[:, col], u, z)
            q = (u - z) * s
            U[:, col] = u.to(torch.int16)
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    inv = torch.argsort(perm)
    return U[:, inv].contiguous(), scale, zero


@torch.no_grad()
def gptq_quantize(model: nn.Module, config: GPTQConfig, forward_loop=None, quiet: bool = True) -> dict:
    """Quantize the selected nn.Linear layers with GPTQ using `forward_loop(model)` for calibration."""
    config.validate()
    need_forward_loop(forward_loop, "gptq")
    t0 = time.perf_counter()
    layers = select_layers(model, config.include, config.exclude)
    groups = {name: qformat.resolve_group(layer.in_features, config.group_size, name, config.bits) for name, layer in layers.items()}

    def process(names, stats):
        for name in names:
            layer = get_module(model, name)
            if not isinstance(layer, nn.Linear):
                raise EdgemmError(f"gptq: {name} is no longer a float nn.Linear")
            st = stats.get(name)
            if st is None or st.n == 0:  # never reached by calibration: plain RTN
                q = quantize_linear_rtn(layer, config.bits, config.group_size, config.symmetric, name, method="rtn")
            else:
                u, scale, zero = gptq_weight(layer.weight, st.H(), config.bits, groups[name], config.symmetric, config.damp,
                                             config.act_order, config.block_size, existing_mask(layer), name)
                q = QuantLinear.from_codes(layer, u, scale, zero, config.bits, config.symmetric, "gptq")
            set_module(model, name, q)

    missing = run_calibrated(model, list(layers), forward_loop, lambda n, m: LayerStats(m.in_features, hessian=True),
                             process, config.sequential, "gptq", quiet)
    sync_extras(model)
    return {"method": "gptq", "layers": list(layers), "uncalibrated": missing, "wall_s": round(time.perf_counter() - t0, 2)}
