"""DivPrune: keep a maximally diverse subset of the projected visual tokens (max-min diversity).

D = 1 - cosine similarity between the projected tokens (float32). The first token is the one whose
nearest other token is farthest (argmax over j of min_{i != j} D[i, j]); each next token maximizes
its distance to the nearest already selected token. Ties go to the lower index; the kept tokens
stay in their original order. Prompt-independent. The projector runs on every patch (the selection
needs the projected tokens), then only the kept ones enter the LLM.
"""

from __future__ import annotations

import torch

from .base import Ctx, Out, cosine_distance, gather_tokens, max_min_select


def blocks(cfg, setting) -> list[int]:
    return []


def first_token(dist: torch.Tensor) -> torch.Tensor:
    """[B, N, N] -> [B]: the token with the largest nearest-neighbour distance (self excluded)."""
    n = dist.shape[-1]
    eye = torch.eye(n, dtype=torch.bool)
    nearest = dist.masked_fill(eye, float("inf")).min(dim=-2).values
    return nearest.argmax(dim=-1)


def select(embeds: torch.Tensor, k: int) -> torch.Tensor:
    dist = cosine_distance(embeds)
    return max_min_select(dist, k, first_token(dist))


def run(ctx: Ctx) -> Out:
    embeds = ctx.project(ctx.feats)
    idx = select(embeds, ctx.k)
    return Out(idx, embeds=gather_tokens(embeds, idx))
