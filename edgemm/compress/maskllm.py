"""MaskLLM-style learnable N:M masks (Fang et al., 2024), for any module and any forward_loop.

Every group of M consecutive inputs of a selected layer gets logits over its C(M, N) candidate masks.
Training samples a soft mask per group with Gumbel-softmax (temperature tau, logits scaled by kappa,
both annealed linearly), multiplies the frozen weights by it and minimises the distance between the
model's outputs and the dense model's outputs on the calibration data (KL for logits, or MSE), minus a
small reward for keeping large weights. The logits start from a one-shot mask (SparseGPT by default)
as a prior. At the end each group takes its most likely candidate: exactly N nonzeros per group.

Training is driven through `forward_loop(model)`: a hook on the model's output computes the loss of
each forward call and takes one optimizer step, so any model with any inputs works. The loop must be
deterministic (the same batches in the same order every time) and must keep autograd on.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import EdgemmError
from ..progress import progress
from .common import need_forward_loop, select_layers, set_module, sync_extras
from .config import MaskLLMConfig, SparseGPTConfig, WandaConfig
from .magnitude import magnitude_mask
from .nm import apply_mask, candidates, check_layer

__all__ = ["MaskLLMConfig", "maskllm_prune", "MaskedLinear"]


class MaskedLinear(nn.Module):
    """A frozen nn.Linear whose weight is multiplied by a learnable N:M mask (training only)."""

    def __init__(self, linear: nn.Linear, n: int, m: int, cands: torch.Tensor, init_std: float,
                 prior_keep: torch.Tensor | None, prior_strength: float, gen: torch.Generator):
        super().__init__()
        self.linear, self.n, self.m = linear, n, m
        rows, k = linear.weight.shape
        self.register_buffer("cands", cands)
        gate = torch.randn(rows * k // m, cands.shape[0], generator=gen) * init_std
        if prior_keep is not None and prior_strength > 0:
            overlap = prior_keep.float().reshape(-1, 1, m).mul(cands[None]).sum(-1)  # [G, C] in 0..N
            gate += (overlap - (n - 1)) * gate.std() * prior_strength
        self.gate = nn.Parameter(gate)
        self.tau, self.kappa = 1.0, 1.0
        self.calls = 0
        self.mask: torch.Tensor | None = None  # the soft mask of the last call

    def soft_mask(self) -> torch.Tensor:
        probs = F.gumbel_softmax(self.gate * self.kappa, tau=self.tau, hard=False)
        return (probs @ self.cands).reshape(self.linear.weight.shape)

    def hard_mask(self) -> torch.Tensor:
        return self.cands[self.gate.argmax(-1)].reshape(self.linear.weight.shape).bool()

    def forward(self, x):
        self.calls += 1
        self.mask = self.soft_mask()
        return F.linear(x, self.linear.weight * self.mask, self.linear.bias)


def _first_tensor(out):
    if torch.is_tensor(out):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        for o in out:
            t = _first_tensor(o)
            if t is not None:
                return t
    if hasattr(out, "logits"):
        return out.logits
    return None


def _prior_masks(model: nn.Module, config: MaskLLMConfig, names: list[str], forward_loop) -> dict[str, torch.Tensor]:
    if config.prior is None:
        return {}
    n, m = config.nm
    if config.prior == "magnitude":
        return {nm_: magnitude_mask(model.get_submodule(nm_).weight, n, m) for nm_ in names}
    from .sparsegpt import sparsegpt_prune
    from .wanda import wanda_prune

    twin = copy.deepcopy(model)
    kw = dict(include=list(names), exclude=[], pattern=config.pattern)
    if config.prior == "sparsegpt":
        sparsegpt_prune(twin, SparseGPTConfig(**kw), forward_loop)
    else:
        wanda_prune(twin, WandaConfig(**kw), forward_loop)
    masks = {nm_: twin.get_submodule(nm_).weight.detach() != 0 for nm_ in names}
    del twin
    return masks


@torch.no_grad()
def _reconstruct(model: nn.Module, names: list[str], forward_loop, n: int, m: int, quiet: bool) -> None:
    """SparseGPT's OBS weight update with the learned masks held fixed, block by block."""
    from .common import LayerStats, get_module, run_calibrated
    from .sparsegpt import sparsegpt_weight

    def process(block, stats):
        for name in block:
            layer = get_module(model, name)
            st = stats.get(name)
            if st is None or st.n == 0:
                continue
            keep = layer.weight.detach() != 0
            w, _ = sparsegpt_weight(layer.weight, st.H(), n, m, keep=keep, name=name)
            layer.weight.copy_(w.to(layer.weight.dtype))

    run_calibrated(model, names, forward_loop, lambda nm_, mod: LayerStats(mod.in_features, hessian=True),
                   process, True, "maskllm reconstruct", quiet)


def maskllm_prune(model: nn.Module, config: MaskLLMConfig, forward_loop=None, quiet: bool = True) -> dict:
    """Learn N:M masks for the selected nn.Linear layers (weights frozen) and apply them in place."""
    config.validate()
    need_forward_loop(forward_loop, "maskllm")
    n, m = config.nm
    t0 = time.perf_counter()
    layers = select_layers(model, config.include, config.exclude)
    for name, layer in layers.items():
        check_layer(layer.in_features, m, name)
    cands = candidates(n, m)
    was_training = model.training
    model.eval()

    # 1. the dense model's outputs on the calibration data (the targets)
    teacher: list[torch.Tensor] = []

    def record(_m, _a, out):
        t = _first_tensor(out)
        if t is None:
            raise EdgemmError("maskllm: the model's output holds no tensor to match")
        teacher.append(t.detach().float().clone())

    h = model.register_forward_hook(record)
    try:
        with torch.no_grad():
            forward_loop(model)
    finally:
        h.remove()
    if not teacher:
        raise EdgemmError("maskllm: forward_loop never called the model")

    # 2. learnable masks, initialised from the one-shot prior
    priors = _prior_masks(model, config, list(layers), forward_loop)
    gen = torch.Generator().manual_seed(config.seed)
    wrappers: dict[str, MaskedLinear] = {}
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    for name, layer in layers.items():
        wrappers[name] = MaskedLinear(layer, n, m, cands, config.init_std, priors.get(name), config.prior_strength, gen)
        set_module(model, name, wrappers[name])
    gates = [w.gate for w in wrappers.values()]
    opt = torch.optim.AdamW(gates, lr=config.lr, weight_decay=0.0)
    torch.manual_seed(config.seed)
    state = {"step": 0, "call": 0, "loss": 0.0, "history": []}
    loss_masks = getattr(forward_loop, "loss_masks", None)
    if loss_masks is not None and len(loss_masks) != len(teacher):
        loss_masks = None
    norms = {name: float(layer.weight.detach().float().pow(2).sum()) or 1.0 for name, layer in layers.items()}

    def schedule(step: int) -> float:
        t = step / max(config.steps - 1, 1)
        for w in wrappers.values():
            w.tau = config.tau[0] + (config.tau[1] - config.tau[0]) * t
            w.kappa = config.kappa[0] + (config.kappa[1] - config.kappa[0]) * t
        return t

    def train_step(_m, _a, out):
        if state["step"] >= config.steps:
            return None
        y = _first_tensor(out)
        target = teacher[state["call"] % len(teacher)]
        state["call"] += 1
        if y is None or tuple(y.shape) != tuple(target.shape):
            raise EdgemmError("maskllm: forward_loop must feed the same batches every time (output shapes differ between passes)")
        if not y.requires_grad:
            raise EdgemmError("maskllm: forward_loop runs without autograd (torch.no_grad?); mask training needs gradients")
        yf, tf = y.float(), target
        sel = None
        if config.positions == "answers" and loss_masks is not None:
            sel = loss_masks[(state["call"] - 1) % len(loss_masks)]
            if tuple(sel.shape) != tuple(y.shape[:sel.ndim]):
                raise EdgemmError("maskllm: the forward_loop's loss_masks do not match the model's outputs")
            yf, tf = yf[sel], tf[sel]
        if config.objective == "kl":
            v = y.shape[-1]
            loss = F.kl_div(F.log_softmax(yf.reshape(-1, v), -1), F.log_softmax(tf.reshape(-1, v), -1),
                            log_target=True, reduction="batchmean")
        else:
            loss = F.mse_loss(yf, tf) / tf.pow(2).mean().clamp(min=1e-12)
        t = schedule(state["step"])
        if config.weight_reg > 0:
            used = [(nm_, w) for nm_, w in wrappers.items() if w.mask is not None]
            kept = sum((w.linear.weight.detach().float().pow(2) * w.mask).sum() / norms[nm_] for nm_, w in used)
            loss_total = loss - config.weight_reg * (1 - t) * kept / max(len(used), 1)
        else:
            loss_total = loss
        opt.zero_grad(set_to_none=True)
        loss_total.backward()
        opt.step()
        for w in wrappers.values():
            w.mask = None
        state["step"] += 1
        state["loss"] = float(loss.detach())
        if state["step"] % max(1, config.steps // 20) == 0 or state["step"] == config.steps:
            state["history"].append({"step": state["step"], "loss": round(state["loss"], 6),
                                     "tau": round(wrappers[next(iter(wrappers))].tau, 4)})
        bar.advance(1, info=f"loss {state['loss']:.4f}")
        return None

    def restore():
        for name, w in wrappers.items():
            set_module(model, name, w.linear)
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)

    h = model.register_forward_hook(train_step)
    try:
        with progress(config.steps, "maskllm", quiet=quiet) as bar, torch.enable_grad():
            schedule(0)
            while state["step"] < config.steps:
                before = state["step"]
                forward_loop(model)
                if state["step"] == before:
                    raise EdgemmError("maskllm: forward_loop never called the model")
    except BaseException:
        h.remove()
        restore()  # the model stays dense
        raise
    h.remove()
    restore()
    # 3. hard masks: the most likely candidate of every group
    missing = []
    with torch.no_grad():
        for name, w in wrappers.items():
            if w.calls == 0:
                missing.append(name)
            if w.calls == 0 and name not in priors:
                apply_mask(w.linear, magnitude_mask(w.linear.weight, n, m), n, m, "magnitude")
            else:
                apply_mask(w.linear, w.hard_mask(), n, m, "maskllm")
    if config.reconstruct:
        _reconstruct(model, list(layers), forward_loop, n, m, quiet)
    sync_extras(model)
    changed = {}
    for name in layers:
        if name in priors:
            keep = model.get_submodule(name).weight.detach() != 0
            changed[name] = round(float((keep != priors[name]).float().mean()) / 2, 4)
    return {"method": "maskllm", "pattern": f"{n}:{m}", "layers": list(layers), "uncalibrated": missing,
            "steps": state["step"], "final_loss": state["loss"], "history": state["history"],
            "changed_vs_prior": round(sum(changed.values()) / max(len(changed), 1), 4) if changed else None,
            "wall_s": round(time.perf_counter() - t0, 2)}
