"""VTC-CLS: like FasterVLM, but the [CLS] score is an ensemble over several ViT blocks.

Score of patch p = sum over blocks start..end (inclusive; end defaults to the feature block) of the
head-mean [CLS]->p attention. Top k (ties: lower index), raster order kept.
"""

from __future__ import annotations

from . import vtc_blocks
from .base import Ctx, Out, cls_importance, gather_tokens, keep_top


def blocks(cfg, setting) -> list[int]:
    return vtc_blocks(cfg, setting.option("start"), setting.option("end"))


def run(ctx: Ctx) -> Out:
    score = cls_importance(ctx.attns, blocks(ctx.cfg, ctx.setting))
    idx = keep_top(score, ctx.k)
    return Out(idx, feats=gather_tokens(ctx.feats, idx))
