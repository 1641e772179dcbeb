"""A small training loop: AdamW, warmup + cosine LR, gradient clipping, bf16 autocast, progress,
atomic checkpoints with resume, and torch.distributed data parallelism when run under torchrun.

The loss is computed inside a module (`LossModule`) so that DistributedDataParallel sees the whole
forward pass and synchronises gradients, whatever submodules the loss touches.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save
from torch import nn

from ..errors import EdgemmError
from ..fileio import atomic_file, write_json
from ..progress import progress


@dataclass
class TrainConfig:
    steps: int
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    batch_size: int = 32
    seed: int = 0
    bf16: bool = True
    ckpt_every: int = 100
    log_every: int = 50


@dataclass
class TrainResult:
    steps: int
    wall_s: float
    history: list[dict] = field(default_factory=list)


def dist_info() -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    if world > 1:
        return torch.distributed.get_rank(), world
    return 0, 1


class LossModule(nn.Module):
    def __init__(self, model: nn.Module, fn: Callable):
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, step: int):
        return self.fn(self.model, step)


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def _save_state(path: Path, model: nn.Module, opt: torch.optim.Optimizer, meta: dict) -> None:
    tensors = {f"model.{k}": v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    sd = opt.state_dict()
    for idx, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"opt.{idx}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).contiguous()
    path.mkdir(parents=True, exist_ok=True)
    with atomic_file(path / "trainer.safetensors") as f:
        f.write(save(tensors))
    write_json(path / "trainer.json", {**meta, "param_groups": sd["param_groups"]})


def _load_state(path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    meta = json.loads((path / "trainer.json").read_text())
    tensors = load_file(str(path / "trainer.safetensors"))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta


def train(model: nn.Module, loss_fn: Callable[[nn.Module, int], tuple[torch.Tensor, dict]], cfg: TrainConfig,
          ckpt_dir: str | Path | None = None, desc: str = "train", resume: bool = True, quiet: bool = False,
          groups: list[tuple[list[nn.Parameter], float]] | None = None) -> TrainResult:
    """Run `cfg.steps` optimizer steps of `loss_fn(model, step) -> (loss, metrics)`.

    With `ckpt_dir`, state is saved every `cfg.ckpt_every` steps and at the end, and a later call
    with the same directory resumes from the last saved step. `groups` lists (parameters, lr scale);
    by default every parameter of `model` that requires grad trains at the full rate.
    """
    rank, world = dist_info()
    torch.manual_seed(cfg.seed)
    groups = groups if groups is not None else [(list(model.parameters()), 1.0)]
    pgroups, params = [], []
    for ps, scale in groups:
        ps = [p for p in ps if p.requires_grad]
        params += ps
        pgroups.append({"params": [p for p in ps if p.ndim >= 2], "weight_decay": cfg.weight_decay, "lr_scale": scale})
        pgroups.append({"params": [p for p in ps if p.ndim < 2], "weight_decay": 0.0, "lr_scale": scale})
    if not params:
        raise EdgemmError("nothing to train: no parameter requires grad")
    opt = torch.optim.AdamW([g for g in pgroups if g["params"]], lr=cfg.lr, betas=(0.9, 0.98))
    start, history, wall0 = 0, [], 0.0
    ckpt = Path(ckpt_dir) if ckpt_dir else None
    if ckpt and resume and (ckpt / "trainer.json").is_file():
        meta = _load_state(ckpt, model, opt)
        same = lambda c: {k: v for k, v in c.items() if k not in ("ckpt_every", "log_every")}  # noqa: E731
        if same(meta.get("config", {})) != same(asdict(cfg)):
            raise EdgemmError(f"cannot resume from {ckpt}: it was written with another training config")
        start, history, wall0 = meta["step"], meta["history"], meta["wall_s"]
    lm = LossModule(model, loss_fn)
    if world > 1:
        lm = nn.parallel.DistributedDataParallel(lm, find_unused_parameters=True)
    model.train()
    t0 = time.time()
    acc: dict[str, float] = {}
    n_acc = 0

    def save(step: int):
        if ckpt and rank == 0:
            _save_state(ckpt, model, opt, {"step": step, "history": history, "wall_s": wall0 + time.time() - t0,
                                            "config": asdict(cfg)})

    with progress(cfg.steps, desc, quiet=quiet or rank != 0) as bar:
        bar.advance(start)
        for step in range(start, cfg.steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg) * g["lr_scale"]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                loss, metrics = lm(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            metrics = {"loss": float(loss.detach()), **{k: float(v) for k, v in metrics.items()}}
            for k, v in metrics.items():
                acc[k] = acc.get(k, 0.0) + v
            n_acc += 1
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                row = {"step": step + 1, "lr": lr_at(step, cfg), **{k: round(v / n_acc, 5) for k, v in acc.items()}}
                history.append(row)
                acc, n_acc = {}, 0
            bar.advance(1, info=f"loss {metrics['loss']:.4f}")
            if ckpt and (step + 1) % cfg.ckpt_every == 0 and step + 1 < cfg.steps:
                save(step + 1)
    save(cfg.steps)
    model.eval()
    return TrainResult(cfg.steps, wall0 + time.time() - t0, history)
