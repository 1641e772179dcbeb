"""SparseGPT (Frantar & Alistarh, 2023) for N:M patterns: walk the columns with the inverse Hessian of
the layer's reconstruction loss; at the start of every group of M columns choose, per row, the M - N
weights with the smallest OBS saliency w_j^2 / [H_F^-1]_jj (F: the columns not yet processed when
column j's turn comes; [H_F^-1]_jj is the squared diagonal of the Cholesky factor), zero them and update the remaining weights
to compensate (lazy block updates as in GPTQ)."""

from __future__ import annotations

import time

import torch
from torch import nn

from ..errors import EdgemmError
from .common import (LayerStats, single_thread, get_module, hessian_inverse_chol, need_forward_loop, prepare_hessian, run_calibrated,
                     select_layers, sync_extras)
from .config import SparseGPTConfig
from .magnitude import magnitude_mask
from .nm import apply_mask, check_layer, mark

__all__ = ["SparseGPTConfig", "sparsegpt_prune", "sparsegpt_weight"]


def sparsegpt_weight(W: torch.Tensor, H: torch.Tensor, n: int, m: int, damp: float = 0.01, block_size: int = 128,
                     name: str = "layer", keep: torch.Tensor | None = None):
    """-> (updated weight [N_out, K] with exact N:M zeros, keep mask).

    With `keep` (bool [N_out, K], an N:M mask chosen elsewhere, e.g. learned by MaskLLM) the mask is
    fixed and only the OBS weight update runs."""
    with single_thread():
        return _sparsegpt_weight(W, H, n, m, damp, block_size, name, keep)


def _sparsegpt_weight(W, H, n, m, damp, block_size, name, fixed=None):
    W = W.detach().float()
    rows, k = W.shape
    W, H = prepare_hessian(W, H.float())
    Hinv = hessian_inverse_chol(H, damp, name)
    bs = max(m, (block_size // m) * m)
    keep = torch.zeros(rows, k, dtype=torch.bool)
    for i1 in range(0, k, bs):
        i2 = min(i1 + bs, k)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        K1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if i % m == 0:
                if fixed is not None:
                    K1[:, i:i + m] = fixed[:, i1 + i:i1 + i + m]
                else:
                    sal = W1[:, i:i + m] ** 2 / d[i:i + m][None, :] ** 2  # d = diag of the Cholesky factor
                    idx = sal.topk(n, dim=1).indices
                    K1[:, i:i + m].scatter_(1, idx, True)
            w = W1[:, i]
            q = torch.where(K1[:, i], w, torch.zeros_like(w))
            Q1[:, i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        keep[:, i1:i2] = K1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W * keep, keep


@torch.no_grad()
def sparsegpt_prune(model: nn.Module, config: SparseGPTConfig, forward_loop=None, quiet: bool = True) -> dict:
    """Make the selected nn.Linear layers N:M sparse with SparseGPT's mask selection and weight update."""
    config.validate()
    need_forward_loop(forward_loop, "sparsegpt")
    n, m = config.nm
    t0 = time.perf_counter()
    layers = select_layers(model, config.include, config.exclude)
    for name, layer in layers.items():
        check_layer(layer.in_features, m, name)

    def process(names, stats):
        for name in names:
            layer = get_module(model, name)
            if not isinstance(layer, nn.Linear):
                raise EdgemmError(f"sparsegpt: {name} is not a float nn.Linear (sparsify before quantizing)")
            st = stats.get(name)
            if st is None or st.n == 0:  # never reached by calibration: magnitude
                apply_mask(layer, magnitude_mask(layer.weight, n, m), n, m, "magnitude")
                continue
            w, _ = sparsegpt_weight(layer.weight, st.H(), n, m, config.damp, config.block_size, name)
            layer.weight.copy_(w.to(layer.weight.dtype))
            mark(layer, n, m, "sparsegpt")

    missing = run_calibrated(model, list(layers), forward_loop, lambda nm_, mod: LayerStats(mod.in_features, hessian=True),
                             process, config.sequential, "sparsegpt", quiet)
    sync_extras(model)
    return {"method": "sparsegpt", "pattern": f"{n}:{m}", "layers": list(layers), "uncalibrated": missing,
            "wall_s": round(time.perf_counter() - t0, 2)}
