"""N:M structured sparsity: at most N nonzeros in every group of M consecutive inputs of a row."""

from __future__ import annotations

import itertools
from math import comb

import torch
from torch import nn

from ..errors import EdgemmError
from .common import NM_ATTR

MAX_CANDIDATES = 256  # MaskLLM learns a distribution over the C(M, N) masks of each group


def parse_pattern(pattern) -> tuple[int, int]:
    """'2:4' (or [2, 4] / {"n": 2, "m": 4}) -> (2, 4), with one-line errors."""
    if isinstance(pattern, bool) or isinstance(pattern, (int, float)):
        raise EdgemmError(f"sparsity pattern must be a string like '2:4', got the number {pattern!r} "
                          "(in YAML, quote it: an unquoted 2:4 is read as a base-60 number)")
    try:
        if isinstance(pattern, str):
            a, b = pattern.strip().split(":")
            n, m = int(a), int(b)
        elif isinstance(pattern, dict):
            n, m = int(pattern["n"]), int(pattern["m"])
        else:
            n, m = (int(v) for v in pattern)
    except (ValueError, TypeError, KeyError):
        raise EdgemmError(f"bad sparsity pattern {pattern!r}: expected N:M such as 2:4") from None
    if not (0 < n < m):
        raise EdgemmError(f"bad sparsity pattern {n}:{m}: need 0 < N < M")
    if m > 32:
        raise EdgemmError(f"bad sparsity pattern {n}:{m}: M must be <= 32")
    return n, m


def check_layer(k: int, m: int, name: str) -> None:
    if k % m:
        raise EdgemmError(f"N:M sparsity with M={m} needs in_features divisible by {m}; {name} has {k}")


def topn_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean [N_out, K] keeping the n highest scores of each group of m consecutive inputs."""
    rows, k = score.shape
    g = score.reshape(rows, k // m, m)
    idx = g.topk(n, dim=-1).indices
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.reshape(rows, k)


def group_nonzeros(w: torch.Tensor, m: int) -> torch.Tensor:
    """Nonzeros per group [N_out, K/m]."""
    rows, k = w.shape
    return (w.reshape(rows, k // m, m) != 0).sum(-1)


def satisfies(w: torch.Tensor, n: int, m: int) -> bool:
    return bool((group_nonzeros(w, m) <= n).all())


def candidates(n: int, m: int) -> torch.Tensor:
    """All C(m, n) masks of a group as float [C, m] (MaskLLM's candidate set)."""
    c = comb(m, n)
    if c > MAX_CANDIDATES:
        raise EdgemmError(f"{n}:{m} has {c} candidate masks per group; learnable masks support at most {MAX_CANDIDATES}")
    out = torch.zeros(c, m)
    for i, keep in enumerate(itertools.combinations(range(m), n)):
        out[i, list(keep)] = 1
    return out


def mark(layer: nn.Module, n: int, m: int, method: str) -> None:
    setattr(layer, NM_ATTR, {"n": n, "m": m, "method": method})


def apply_mask(layer: nn.Linear, mask: torch.Tensor, n: int, m: int, method: str) -> None:
    with torch.no_grad():
        layer.weight.mul_(mask.to(layer.weight.dtype))
    mark(layer, n, m, method)


def existing_mask(layer: nn.Module) -> torch.Tensor | None:
    """The boolean keep-mask of a layer already marked N:M sparse (weights that are nonzero), else None."""
    if getattr(layer, NM_ATTR, None) is None or not isinstance(layer, nn.Linear):
        return None
    return layer.weight.detach() != 0
