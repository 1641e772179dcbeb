"""FasterVLM: keep the patches the [CLS] token attends to most.

Score of patch p = mean over heads of the [CLS]->p attention (softmax over [CLS] + all patches) in
the ViT block that produces the features (vision_feature_layer -2 -> block L-2, the same layer as
the features; option `layer` overrides). Keep the top k (ties: lower index), raster order kept.
The score does not depend on the prompt, so the selection can be cached per image.

Option `early` (with `layer` before the feature block): the selection happens inside the ViT, after
block `layer`; the blocks after it run on the [CLS] token and the kept patches only (in raster order),
so they cost k/P of their work. The kept tokens' features then no longer see the dropped patches in
those blocks: a different (cheaper, approximate) computation, evaluated separately (docs/tokens.md).
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
