"""New (not in any single paper): FasterVLM selection plus importance-weighted merging of the rest.

Keep the top-k patches by FasterVLM's score a (head-mean [CLS] attention of the feature block; ties
to the lower index). Every dropped patch d goes to the kept patch most similar to it (cosine of the
ViT features; ties to the kept patch with the lower index), and each kept token becomes the
attention-weighted average of itself and the patches assigned to it:
    x_j <- (a_j x_j + sum_{d -> j} a_d x_d) / (a_j + sum_{d -> j} a_d),
then goes through the projector. Nothing the [CLS] token attended to is thrown away outright.
Raster order of the kept patches.
"""

from __future__ import annotations

import torch

from . import attention_block
from .base import Ctx, Out, cls_importance, gather_tokens, keep_top, unit


def blocks(cfg, setting) -> list[int]:
    return [attention_block(cfg, setting.option("layer"))]


def merge_into_kept(x: torch.Tensor, weight: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """x [B, P, D], weight [B, P] > 0, kept [B, k] ascending -> [B, k, D] weighted averages."""
    b, p, d = x.shape
    k = kept.shape[1]
    xf = x.float()
    sim = unit(xf) @ unit(gather_tokens(xf, kept)).transpose(-1, -2)  # [B, P, k]
    assign = sim.argmax(dim=-1)  # lowest kept slot among ties
    assign.scatter_(1, kept, torch.arange(k).expand(b, k).clone())  # a kept patch stays in its own slot
    w = weight.float()
    num = torch.zeros(b, k, d).scatter_add(1, assign[..., None].expand(-1, -1, d), xf * w[..., None])
    den = torch.zeros(b, k).scatter_add(1, assign, w)
    return num / den[..., None]


def run(ctx: Ctx) -> Out:
    a = cls_importance(ctx.attns, blocks(ctx.cfg, ctx.setting))
    kept = keep_top(a, ctx.k)
    return Out(kept, feats=merge_into_kept(ctx.feats, a, kept).to(ctx.feats.dtype))
