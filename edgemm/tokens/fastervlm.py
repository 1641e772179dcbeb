"""FasterVLM: keep the patches the [CLS] token attends to most.

Score of patch p = mean over heads of the [CLS]->p attention (softmax over [CLS] + all patches) in
the ViT block that produces the features (vision_feature_layer -2 -> block L-2, the same layer as
the features; option `layer` overrides). Keep the top k (ties: lower index), raster order kept.
The score does not depend on the prompt, so the selection can be cached per image.
"""

from __future__ import annotations

from . import attention_block
from .base import Ctx, Out, cls_importance, gather_tokens, keep_top


def blocks(cfg, setting) -> list[int]:
    return [attention_block(cfg, setting.option("layer"))]


def run(ctx: Ctx) -> Out:
    score = cls_importance(ctx.attns, blocks(ctx.cfg, ctx.setting))
    idx = keep_top(score, ctx.k)
    return Out(idx, feats=gather_tokens(ctx.feats, idx))
