"""ToMe-style bipartite soft matching between the vision encoder and the LLM.

Works on the ViT features at the feature layer (before the projector), so the projector also runs
on fewer tokens. Rounds until k tokens remain; in each round with n tokens (in raster order of
their representative patch):
- A = tokens at even positions 0, 2, 4, ..., B = tokens at odd positions;
- every a in A finds its most similar b in B (cosine of the current features; ties: lower b);
- the r = min(n - k, |A|) a's with the highest similarity (ties: lower a) are merged into their b:
  b <- (s_b x_b + sum s_a x_a) / (s_b + sum s_a), s_b <- s_b + sum s_a, where s is the number of
  patches a token stands for (size-weighted average; the size-weighted mean of all tokens is kept);
- survivors (unmerged a's and all b's) are re-sorted by representative patch index; a merged token's
  representative is its b's.
The [CLS] token (fed only with vision_feature_select 'full') is protected: it never enters the
matching. ToMe's proportional attention (log size added to attention logits) is not applied: the
LLM stays a plain decoder, so every runtime can use it unchanged.
"""

from __future__ import annotations

import torch

from .base import Ctx, Out, unit


def blocks(cfg, setting) -> list[int]:
    return []


def merge(x: torch.Tensor, k: int):
    """x [B, N, D] -> (merged [B, k, D] float32, sizes [B, k], representative index [B, k])."""
    b, n, d = x.shape
    x = x.float()
    size = torch.ones(b, n)
    pos = torch.arange(n).expand(b, n).clone()
    while n > k:
        xa, xb = x[:, 0::2], x[:, 1::2]
        sa, sb = size[:, 0::2], size[:, 1::2]
        pa, pb = pos[:, 0::2], pos[:, 1::2]
        r = min(n - k, xa.shape[1])
        sim = unit(xa) @ unit(xb).transpose(-1, -2)  # [B, |A|, |B|]
        best, dst = sim.max(dim=-1)  # first maximum: lowest b among ties
        order = torch.sort(best, dim=-1, descending=True, stable=True).indices
        m, u = order[:, :r], order[:, r:]
        dst_m = dst.gather(1, m)
        sa_m = sa.gather(1, m)
        xa_m = xa.gather(1, m[..., None].expand(-1, -1, d))
        num = (xb * sb[..., None]).scatter_add(1, dst_m[..., None].expand(-1, -1, d), xa_m * sa_m[..., None])
        sb = sb.scatter_add(1, dst_m, sa_m)
        xb = num / sb[..., None]
        x = torch.cat([xa.gather(1, u[..., None].expand(-1, -1, d)), xb], dim=1)
        size = torch.cat([sa.gather(1, u), sb], dim=1)
        pos = torch.cat([pa.gather(1, u), pb], dim=1)
        o = pos.argsort(dim=-1)  # representatives are distinct: the order is unique
        x, size, pos = x.gather(1, o[..., None].expand(-1, -1, d)), size.gather(1, o), pos.gather(1, o)
        n = x.shape[1]
    return x, size, pos


def run(ctx: Ctx) -> Out:
    x, _, pos = merge(ctx.feats, ctx.k)
    return Out(pos, feats=x.to(ctx.feats.dtype))
