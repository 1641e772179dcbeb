"""Shared pieces of the visual-token methods: the per-call context, the result, and the exact,
deterministic primitives every exporter and the native engine must reproduce (see docs/tokens.md).

Conventions (all methods):
- scores and similarities are computed in float32;
- top-k keeps the k largest scores, ties going to the lower patch index (a stable descending sort);
- the kept / produced tokens are returned in ascending order of their (representative) patch index,
  i.e. raster order of the patch grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass
class Ctx:
    cfg: object  # VLMConfig
    setting: object  # TokenSetting
    feats: torch.Tensor  # [B, P, D_vision] patch features at the feature layer ([CLS] excluded)
    attns: dict  # {ViT block: [B, H, P]} [CLS]->patch attention of the blocks the method asked for
    k: int  # patch tokens to produce (1 <= k < P)
    project: Callable[[torch.Tensor], torch.Tensor]  # the model's projector (per token)


@dataclass
class Out:
    index: torch.Tensor  # [B, k] int64: kept patch index, or the representative patch of a merged/pooled token
    feats: torch.Tensor | None = None  # [B, k, D_vision] to be projected, or
    embeds: torch.Tensor | None = None  # [B, k, D_text] already projected


def keep_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[B, P] scores -> [B, k] indices of the k largest, ties to the lower index, in ascending order."""
    order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices[:, :k]
    return order.sort(dim=-1).values


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, N, D], index [B, k] -> [B, k, D]."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def cls_importance(attns: dict, blocks) -> torch.Tensor:
    """Sum over `blocks` of the head-mean [CLS]->patch attention: [B, P] float32."""
    return sum(attns[b].float().mean(dim=1) for b in blocks)


def unit(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (norm clamped at 1e-12), float32."""
    return F.normalize(x.float(), dim=-1, eps=1e-12)


def cosine_distance(x: torch.Tensor) -> torch.Tensor:
    """x [B, N, D] -> [B, N, N] with 1 - cos(x_i, x_j), float32."""
    u = unit(x)
    return 1.0 - u @ u.transpose(-1, -2)


def max_min_select(dist: torch.Tensor, k: int, first: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy max-min diversity: start from `first` [B]; then repeatedly add the token whose distance to
    the nearest selected token (times `weight`, if given) is largest, ties to the lower index.

    dist [B, N, N] (symmetric), weight [B, N] >= 0. Returns [B, k] indices in ascending order.
    """
    b, n, _ = dist.shape
    rows = torch.arange(b)
    chosen = torch.zeros(b, n, dtype=torch.bool)
    sel = torch.empty(b, k, dtype=torch.long)
    sel[:, 0] = first
    chosen[rows, first] = True
    mind = dist[rows, first].clone()  # distance of every token to its nearest selected token
    for i in range(1, k):
        score = mind if weight is None else mind * weight
        score = score.masked_fill(chosen, float("-inf"))
        j = score.argmax(dim=-1)  # first maximum = lowest index among ties
        sel[:, i] = j
        chosen[rows, j] = True
        mind = torch.minimum(mind, dist[rows, j])
    return sel.sort(dim=-1).values
