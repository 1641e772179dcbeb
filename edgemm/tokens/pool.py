"""2-D average pooling of the patch grid (LLaVolta-style compression, no learned weights).

The g x g grid of patch features (before the projector) is pooled to an h x w grid with h*w = k,
h <= w, as square as possible (`pool_shape`); bins follow adaptive average pooling: output row i
covers input rows floor(i*g/h) .. ceil((i+1)*g/h) - 1 (likewise columns), so bins may overlap when g
is not a multiple of h. Tokens come out in raster order of the pooled grid; a token's representative
index is the top-left patch of its bin. A ratio keep picks the achievable count nearest to ratio*P.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import pool_shape
from .base import Ctx, Out


def blocks(cfg, setting) -> list[int]:
    return []


def pool(x: torch.Tensor, grid: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    b, p, d = x.shape
    h, w = pool_shape(k, grid)
    img = x.transpose(1, 2).reshape(b, d, grid, grid)
    out = F.adaptive_avg_pool2d(img.float(), (h, w)).reshape(b, d, h * w).transpose(1, 2)
    rows = torch.tensor([(i * grid) // h for i in range(h)])
    cols = torch.tensor([(j * grid) // w for j in range(w)])
    rep = (rows[:, None] * grid + cols[None, :]).reshape(-1).expand(b, -1)
    return out.to(x.dtype), rep.clone()


def run(ctx: Ctx) -> Out:
    feats, idx = pool(ctx.feats, ctx.cfg.vision.grid, ctx.k)
    return Out(idx, feats=feats)
