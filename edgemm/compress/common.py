"""What every weight method shares: layer selection, calibration statistics gathered through a
`forward_loop(model)`, sequential (block by block) processing, module replacement and the per-layer
metadata that ends up in `config.extras`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from ..errors import EdgemmError

ForwardLoop = Callable[[nn.Module], None]

# Attribute set on a layer (nn.Linear or a packed module) whose weight is N:M sparse: a dict
# {"n": N, "m": M, "method": ...}. It travels with the layer when the layer is quantized.
NM_ATTR = "_edgemm_nm"


@contextlib.contextmanager
def single_thread():
    """Run a loop of small tensor ops on one thread: on a busy 2-core machine OpenMP barriers make
    GPTQ's column-by-column loop ~50x slower with 2 threads than with 1 (measured; see docs/compression.md)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------ selection


@dataclass
class Selection:
    """Which nn.Linear layers a method touches: fnmatch patterns on the module names.

    A layer is selected when it matches one `include` pattern and no `exclude` pattern. The default
    covers the whole model (for EdgeVLM: the vision encoder with its patch embedding, the projector,
    the LLM) except the LM head (see docs/compression.md for why)."""

    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=lambda: ["*lm_head"])


def _patterns(v, what: str) -> list[str]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, (list, tuple)) or not all(isinstance(p, str) and p for p in v):
        raise EdgemmError(f"{what} must be a list of module-name patterns (strings), got {v!r}")
    return list(v)


def select_layers(model: nn.Module, include=("*",), exclude=("*lm_head",), kinds=(nn.Linear,)) -> dict[str, nn.Module]:
    """name -> module for the selected layers of `kinds`, in registration order."""
    include, exclude = _patterns(include, "include"), _patterns(exclude, "exclude")
    if isinstance(model, kinds):
        raise EdgemmError("the model is itself a single layer: wrap it in a container (e.g. nn.Sequential) to compress it")
    out = {}
    for name, mod in model.named_modules():
        if not name or not isinstance(mod, kinds):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in include) and not any(fnmatch.fnmatchcase(name, p) for p in exclude):
            out[name] = mod
    if not out:
        raise EdgemmError(f"no layer matches include={include} exclude={exclude}")
    tied = _tied_layers(model, out)
    if tied:
        raise EdgemmError(f"layer {tied[0]} shares its weight with another tensor (tied embeddings); exclude it")
    return out


def _tied_layers(model: nn.Module, layers: dict[str, nn.Module]) -> list[str]:
    ptrs: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        ptrs[p.data_ptr()] = ptrs.get(p.data_ptr(), 0) + 1
    return [n for n, m in layers.items() if isinstance(m, nn.Linear) and ptrs.get(m.weight.data_ptr(), 0) > 1]


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model if name == "" else model.get_submodule(name)


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    if name == "":
        raise EdgemmError("cannot replace the root module in place; wrap the layer in a container module")
    parent, _, child = name.rpartition(".")
    setattr(get_module(model, parent), child, new)


def block_key(name: str) -> str:
    """The block a layer belongs to: its name up to the last numeric component
    ('text.layers.3.mlp.up_proj' -> 'text.layers.3'), else its parent ('projector.linear_1' -> 'projector')."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1])


def blocks(names: Iterable[str]) -> list[list[str]]:
    """Consecutive layers of the same block, in order."""
    out: list[list[str]] = []
    last = None
    for n in names:
        k = block_key(n)
        if out and k == last:
            out[-1].append(n)
        else:
            out.append([n])
        last = k
    return out


# ------------------------------------------------------------------------------------- calibration


class LayerStats:
    """Statistics of one layer's inputs X [T, K] over calibration, gathered batch by batch.

    `hessian`: sum of X^T X (float64); `abs_sum`: sum of |x| per channel; `sq_sum`: sum of x^2 per
    channel; `max`/`min`: per channel; `samples`: a random sample of the input elements (for quantiles).
    """

    def __init__(self, k: int, hessian=False, samples: int = 0, seed: int = 0):
        self.k = k
        self.n = 0
        self.hessian = torch.zeros(k, k, dtype=torch.float64) if hessian else None
        self.abs_sum = torch.zeros(k, dtype=torch.float64)
        self.sq_sum = torch.zeros(k, dtype=torch.float64)
        self.max = torch.full((k,), -math.inf)
        self.min = torch.full((k,), math.inf)
        self.per_batch_samples = samples
        self.samples: list[torch.Tensor] = []
        self.gen = torch.Generator().manual_seed(seed)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if x.shape[-1] != self.k:
            raise EdgemmError(f"a calibrated layer got inputs with {x.shape[-1]} features, expected {self.k}")
        self.n += x.shape[0]
        if self.hessian is not None:
            xd = x.double()
            self.hessian += xd.T @ xd
        self.abs_sum += x.abs().sum(0).double()
        self.sq_sum += (x * x).sum(0).double()
        self.max = torch.maximum(self.max, x.max(0).values)
        self.min = torch.minimum(self.min, x.min(0).values)
        if self.per_batch_samples:
            flat = x.reshape(-1)
            if flat.numel() > self.per_batch_samples:
                idx = torch.randint(0, flat.numel(), (self.per_batch_samples,), generator=self.gen)
                flat = flat[idx]
            self.samples.append(flat.clone())

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.n, 1)).float()

    @property
    def absmax(self) -> torch.Tensor:
        return torch.maximum(self.max.abs(), self.min.abs())

    def H(self) -> torch.Tensor:
        """The GPTQ Hessian 2/n X^T X (float32)."""
        return (2.0 / max(self.n, 1) * self.hessian).float()


class _StopForward(Exception):
    """Raised inside a calibration forward once every hooked layer has seen its input."""


def collect_stats(model: nn.Module, layers: dict[str, nn.Module], forward_loop: ForwardLoop,
                  make: Callable[[str, nn.Module], LayerStats], stop_at: dict[str, nn.Module] | None = None) -> dict[str, LayerStats]:
    """Run `forward_loop(model)` once with input hooks on `layers`; layers never called get no entry.

    `stop_at`: layers that run after all of `layers` (later blocks). When one of them is about to run
    and every hooked layer has already run in this forward call, the rest of the forward is skipped
    (the model call returns None), which makes block-by-block calibration about twice as fast."""
    stats: dict[str, LayerStats] = {}
    handles = []
    seen: set[str] = set()

    def reset(*_a):
        seen.clear()

    def stop(*_a):
        if len(seen) == len(layers):
            raise _StopForward

    original = model.forward if stop_at else None
    own_forward = model.__dict__.get("forward")
    if stop_at:
        def forward(*args, **kwargs):
            try:
                return original(*args, **kwargs)
            except _StopForward:
                return None
        model.forward = forward
        handles.append(model.register_forward_pre_hook(reset))
        for mod in stop_at.values():
            handles.append(mod.register_forward_pre_hook(stop))

    def hook_for(name, mod):
        def hook(_m, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            if name not in stats:
                stats[name] = make(name, mod)
            stats[name].update(x)
            seen.add(name)
        return hook

    for name, mod in layers.items():
        handles.append(mod.register_forward_pre_hook(hook_for(name, mod), with_kwargs=True))
    try:
        with torch.no_grad():
            forward_loop(model)
    finally:
        for h in handles:
            h.remove()
        if original is not None:
            if own_forward is not None:
                model.forward = own_forward
            else:
                del model.forward  # back to the class's forward
    return stats


def need_forward_loop(forward_loop, method: str):
    if forward_loop is None:
        raise EdgemmError(f"{method} needs calibration data: pass forward_loop (a callable that runs the model on calibration inputs)")
    if not callable(forward_loop):
        raise EdgemmError(f"forward_loop must be callable, got {type(forward_loop).__name__}")
    return forward_loop


# ------------------------------------------------------------------------------------------ metadata


def layer_entries(model: nn.Module) -> tuple[dict[str, dict], dict[str, dict]]:
    """(quantization layers, sparsity layers) metadata read off the modules themselves."""
    from .modules import PackedLinear

    quant, sparse = {}, {}
    for name, mod in model.named_modules():
        if isinstance(mod, PackedLinear):
            quant[name] = mod.metadata()
        nm = getattr(mod, NM_ATTR, None)
        if nm is not None:
            sparse[name] = dict(nm)
    return quant, sparse


def sync_extras(model: nn.Module) -> None:
    """Write the per-layer metadata into model.config.extras (EdgeVLM and anything with such a config)."""
    extras = getattr(getattr(model, "config", None), "extras", None)
    if not isinstance(extras, dict):
        return
    quant, sparse = layer_entries(model)
    for key, layers in (("quantization", quant), ("sparsity", sparse)):
        if layers:
            extras[key] = {"format_version": 1, "layers": layers}
        else:
            extras.pop(key, None)



def run_calibrated(model: nn.Module, layer_names: list[str], forward_loop: ForwardLoop,
                   make: Callable[[str, nn.Module], LayerStats],
                   process: Callable[[list[str], dict[str, LayerStats]], None],
                   sequential: bool, desc: str, quiet: bool = True) -> list[str]:
    """Gather input statistics and process layers, block by block when `sequential` (each block then
    sees the inputs produced by the already-processed blocks before it), else all from one pass.

    `process(names, stats)` handles one block; layers that calibration never reached have no entry in
    `stats`. Returns the names of those uncalibrated layers."""
    groups = blocks(layer_names) if sequential else [list(layer_names)]
    missing: list[str] = []
    reached: set[str] | None = None
    from ..progress import progress

    with progress(len(layer_names), desc, quiet=quiet) as bar:
        for names in groups:
            if reached is not None and not reached & set(names):
                # calibration never reaches this block (e.g. ViT blocks after the feature layer): no pass
                stats = {}
            else:
                mods = {n: get_module(model, n) for n in names}
                probe = [] if reached is not None else [
                    get_module(model, n).register_forward_pre_hook(lambda *_a, _n=n: seen.add(_n)) for n in layer_names]
                seen: set[str] = set()
                later = [n for g in groups[groups.index(names) + 1:] for n in g]
                stop_at = {n: get_module(model, n) for n in later} if reached is not None and sequential else None
                try:
                    stats = collect_stats(model, mods, forward_loop, make, stop_at)
                finally:
                    for h in probe:
                        h.remove()
                if reached is None:
                    reached = seen
            missing += [n for n in names if n not in stats or stats[n].n == 0]
            process(names, stats)
            bar.advance(len(names), info=block_key(names[0]) or names[0])
    return missing


def hessian_inverse_chol(H: torch.Tensor, damp: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1 (GPTQ / SparseGPT), retrying with more
    damping when H is numerically singular."""
    k = H.shape[0]
    mean_diag = float(torch.diag(H).mean())
    lam = max(damp, 1e-6)
    for _ in range(8):
        Hd = H + lam * mean_diag * torch.eye(k, dtype=H.dtype)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
        lam *= 10
    raise EdgemmError(f"{name}: the calibration Hessian is not positive definite even with strong damping")


def prepare_hessian(W: torch.Tensor, H: torch.Tensor):
    """Dead inputs (never nonzero in calibration) get H_jj = 1 and zero weight, as in GPTQ."""
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W = W.clone()
    W[:, dead] = 0
    return W, H
