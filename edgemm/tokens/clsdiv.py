"""New (not in any single paper): [CLS] importance x diversity.

FasterVLM keeps what the [CLS] token looks at, but its top-k often piles onto one object; DivPrune
covers the image but spends tokens on diverse background. clsdiv runs DivPrune's greedy max-min on
the projected tokens with each candidate's distance weighted by its importance:
    w_p = a_p / max_q a_q  (a = FasterVLM's head-mean [CLS] attention of the feature block),
    first = argmax_p a_p, then repeatedly argmax_p  min_{s selected} D[s, p] * w_p ** alpha,
ties to the lower index, original order kept. alpha = 0 is max-min diversity started at the most
attended patch; large alpha tends to FasterVLM.
"""

from __future__ import annotations

from . import attention_block
from .base import Ctx, Out, cls_importance, cosine_distance, gather_tokens, max_min_select


def blocks(cfg, setting) -> list[int]:
    return [attention_block(cfg, setting.option("layer"))]


def run(ctx: Ctx) -> Out:
    a = cls_importance(ctx.attns, blocks(ctx.cfg, ctx.setting))
    w = (a / a.max(dim=-1, keepdim=True).values).pow(float(ctx.setting.option("alpha")))
    embeds = ctx.project(ctx.feats)
    idx = max_min_select(cosine_distance(embeds), ctx.k, a.argmax(dim=-1), weight=w)
    return Out(idx, embeds=gather_tokens(embeds, idx))
