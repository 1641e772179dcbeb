"""Random selection, the floor every method must beat.

To be reproducible by every runtime without a shared RNG, the subset is fixed per (seed, number of
patches): patch i gets the key splitmix64((seed << 32) | i) (64-bit arithmetic), and the k patches
with the smallest keys are kept (splitmix64 is a bijection, so keys never tie), in raster order.
The same subset is used for every image.
"""

from __future__ import annotations

import torch

from .base import Ctx, Out, gather_tokens

MASK = (1 << 64) - 1


def blocks(cfg, setting) -> list[int]:
    return []


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK
    z = x
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def subset(n: int, k: int, seed: int) -> list[int]:
    keys = [splitmix64(((seed << 32) | i) & MASK) for i in range(n)]
    return sorted(sorted(range(n), key=lambda i: keys[i])[:k])


def run(ctx: Ctx) -> Out:
    b, p, _ = ctx.feats.shape
    idx = torch.tensor(subset(p, ctx.k, int(ctx.setting.option("seed"))), dtype=torch.long).expand(b, -1).clone()
    return Out(idx, feats=gather_tokens(ctx.feats, idx))
