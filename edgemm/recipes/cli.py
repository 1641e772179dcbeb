"""`edgemm compress MODEL --recipe RECIPE -o OUT` and `edgemm recipes`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import EdgemmError


def register(app: typer.Typer) -> None:
    @app.command("compress")
    def compress_cmd(model: str = typer.Argument(..., help="demo, demo-small, an edgemm checkpoint or a HF LLaVA directory"),
                     recipe: str = typer.Option(..., "--recipe", help="a shipped recipe (laptop, phone-npu, tiny) or a YAML file"),
                     out_dir: Path = typer.Option(..., "-o", "--out", help="output directory (model/, report.*, stages/)"),
                     data: Optional[str] = typer.Option(None, "--data", help="evaluation set (default: the recipe's, else the held-out set)"),
                     limit: Optional[int] = typer.Option(None, help="evaluate only the first N questions"),
                     batch_size: Optional[int] = typer.Option(None, help="questions per evaluation batch"),
                     threads: Optional[int] = typer.Option(None, help="CPU threads (default 2)"),
                     reuse: Optional[List[str]] = typer.Option(None, "--reuse", help="STAGE=CHECKPOINT: take that stage's output "
                                                               "from an existing checkpoint (e.g. distill=out/kd) instead of running it"),
                     as_json: bool = typer.Option(False, "--json", help="print the report as JSON")):
        """Run a compression recipe; writes the compressed checkpoint and a report after every stage (resumable)."""
        import os

        from . import load_recipe

        if limit is not None and limit < 1:
            raise EdgemmError("--limit must be >= 1")
        if threads is not None and threads < 1:
            raise EdgemmError("--threads must be >= 1")
        rec = load_recipe(recipe)  # validate before loading anything heavy
        prebuilt = {}
        for item in reuse or []:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise EdgemmError(f"--reuse takes STAGE=CHECKPOINT, got {item!r}")
            if name not in [s.name for s in rec.stages]:
                raise EdgemmError(f"--reuse: the recipe has no stage {name!r} (stages: {', '.join(s.name for s in rec.stages)})")
            if not (Path(path) / "config.json").is_file():
                raise EdgemmError(f"--reuse: {path} is not an edgemm checkpoint directory")
            prebuilt[name] = path
        import torch

        from .runner import run_recipe

        torch.set_num_threads(threads or min(2, os.cpu_count() or 1))
        say = (lambda s: None) if as_json else (lambda s: typer.echo(s, err=True))
        rep = run_recipe(model, rec, out_dir, eval_data=data, eval_limit=limit, batch_size=batch_size, quiet=as_json, say=say,
                         prebuilt=prebuilt)
        if as_json:
            sys.stdout.write(json.dumps(rep, indent=2) + "\n")
            return
        from .report import markdown

        typer.echo(markdown(rep))
        typer.echo(f"compressed model: {out_dir / 'model'}; report: {out_dir / 'report.md'}, {out_dir / 'report.png'}")

    recipes_app = typer.Typer(no_args_is_help=True, help="Compression recipes.")
    app.add_typer(recipes_app, name="recipes")

    @recipes_app.command("list")
    def list_cmd(as_json: bool = typer.Option(False, "--json", help="print JSON")):
        """The shipped recipes."""
        from . import load_recipe, shipped

        rows = []
        for name in shipped():
            r = load_recipe(name)
            rows.append({"name": name, "description": r.description, "stages": [s.to_dict() for s in r.stages]})
        if as_json:
            sys.stdout.write(json.dumps(rows, indent=2) + "\n")
            return
        for r in rows:
            typer.echo(f"{r['name']}: {r['description'].strip()}")
            for s in r["stages"]:
                opts = {k: v for k, v in s.items() if k not in ("type", "name")}
                typer.echo(f"    {s['type']}: {opts}")

    @recipes_app.command("show")
    def show_cmd(recipe: str = typer.Argument(..., help="a shipped recipe name or a YAML file")):
        """Print a recipe's YAML."""
        from . import load_recipe

        r = load_recipe(recipe)
        p = Path(r.source)
        typer.echo(p.read_text() if p.is_file() else json.dumps(r.to_dict(), indent=2))
