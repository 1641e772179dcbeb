"""`edgemm distill TEACHER --student-config ... -o OUT`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from ..errors import EdgemmError


def register(app: typer.Typer) -> None:
    @app.command("distill")
    def distill_cmd(teacher: str = typer.Argument(..., help="teacher model: demo, or an edgemm checkpoint directory"),
                    student_config: str = typer.Option("demo-small", "--student-config",
                                                       help="student architecture: demo-small, a config.json or a checkpoint directory"),
                    out_dir: Path = typer.Option(..., "-o", "--out", help="student checkpoint directory to write"),
                    work_dir: Optional[Path] = typer.Option(None, help="resumable training state (default: .OUT.work beside OUT)"),
                    steps: Optional[int] = typer.Option(None, help="total steps over the three stages (default: the SFT baseline's, from demo-small's train_log.json)"),
                    split: str = typer.Option("0.3,0.2,0.5", help="fractions of the steps for DPT, SFT, DFT"),
                    mdist: bool = typer.Option(True, "--mdist/--no-mdist", help="MDist: KL on response and visual positions"),
                    rdist: bool = typer.Option(True, "--rdist/--no-rdist", help="RDist: visual-token relation distillation"),
                    temperature: float = typer.Option(2.0, help="KD temperature"),
                    w_visual: float = typer.Option(0.5, help="weight of MDist on the visual positions"),
                    w_rdist: float = typer.Option(10.0, help="weight of RDist"),
                    vit: str = typer.Option("frozen", help="frozen (LLaVA-KD) or finetune the shared ViT copy"),
                    batch_size: Optional[int] = typer.Option(None, help="batch per rank (default: the baseline's)"),
                    seed: Optional[int] = typer.Option(None, help="recipe seed (data seed = seed + 1; default: the baseline's)"),
                    baseline: str = typer.Option("demo-small", help="the SFT baseline whose train_log.json sets the default budget"),
                    threads: Optional[int] = typer.Option(None, help="CPU threads (default 2)"),
                    as_json: bool = typer.Option(False, "--json", help="print the distillation log as JSON")):
        """Distill TEACHER into a student (LLaVA-KD: MDist + RDist; DPT -> SFT -> DFT). Resumable; DDP under torchrun."""
        import os

        import torch

        from .trainer import DistillConfig, distill_to_checkpoint

        if threads is not None and threads < 1:
            raise EdgemmError("--threads must be >= 1")
        torch.set_num_threads(threads or min(2, os.cpu_count() or 1))
        try:
            fr = tuple(float(x) for x in split.split(","))
        except ValueError:
            raise EdgemmError(f"--split takes three comma-separated fractions, got {split!r}") from None
        cfg = DistillConfig(steps=steps, split=fr, mdist=mdist, rdist=rdist, temperature=temperature, w_visual=w_visual,
                            w_rdist=w_rdist, vit=vit, batch_size=batch_size, seed=seed, baseline=baseline or None).validate()
        log = distill_to_checkpoint(teacher, student_config, out_dir, cfg, work_dir, quiet=as_json)
        if as_json:
            sys.stdout.write(json.dumps({k: v for k, v in log.items() if k != "stages"} |
                                        {"stages": [{k: v for k, v in s.items() if k != "history"} for s in log["stages"]]},
                                        indent=2) + "\n")
        else:
            typer.echo(f"wrote {out_dir}: {log['params']:,} parameters, {log['config']['steps']} steps in {log['wall_s']:.0f} s")
