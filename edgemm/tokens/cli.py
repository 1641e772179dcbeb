"""`edgemm tokens ...`: list the visual-token methods, store a setting in a checkpoint, sweep methods."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from ..errors import EdgemmError


def register(app: typer.Typer) -> None:
    tokens_app = typer.Typer(no_args_is_help=True, help="Visual-token compression (methods, settings, sweeps).")
    app.add_typer(tokens_app, name="tokens")

    @tokens_app.command("list")
    def list_cmd(as_json: bool = typer.Option(False, "--json", help="print JSON")):
        """The visual-token methods and their options."""
        from . import describe_methods

        rows = describe_methods()
        if as_json:
            sys.stdout.write(json.dumps(rows, indent=2) + "\n")
            return
        from rich.console import Console
        from rich.table import Table

        t = Table(title="visual-token methods (--visual-tokens METHOD:KEEP[:OPTION=VALUE,...])")
        for c in ("method", "options", "what it does"):
            t.add_column(c)
        for r in rows:
            t.add_row(r["method"], ", ".join(f"{k}={v}" for k, v in r["options"].items()), r["description"])
        Console().print(t)

    @tokens_app.command("set")
    def set_cmd(model: str = typer.Argument(..., help="demo, demo-small or an edgemm checkpoint directory"),
                spec: str = typer.Argument(..., help="METHOD:KEEP, e.g. fastervlm:0.25 ('none' removes a stored setting)"),
                out_dir: Path = typer.Option(..., "-o", "--out", help="checkpoint directory to write"),
                as_json: bool = typer.Option(False, "--json", help="print JSON")):
        """Write a copy of MODEL whose config carries the visual-token setting."""
        from ..models import load_model
        from ..models.checkpoint import save_checkpoint
        from . import parse, set_visual_tokens, visual_token_count

        setting = parse(spec)
        lm = load_model(model)
        set_visual_tokens(lm, setting)
        save_checkpoint(lm.model, lm.processor, out_dir, metadata={"visual_tokens": str(setting)})
        rep = {"out": str(out_dir), "visual_tokens": setting.to_dict() if setting else None,
               "tokens": visual_token_count(lm.config), "of": lm.config.num_visual_tokens}
        if as_json:
            sys.stdout.write(json.dumps(rep, indent=2) + "\n")
        else:
            typer.echo(f"wrote {out_dir}: {rep['tokens']} of {rep['of']} visual tokens per image ({setting or 'no compression'})")

    @tokens_app.command("sweep")
    def sweep_cmd(model: str = typer.Argument(..., help="demo, demo-small or an edgemm checkpoint directory"),
                  methods: str = typer.Option("fastervlm,vtccls,divprune,tome,clsdiv,clsmerge,pool,random",
                                              help="comma-separated methods, optionally with options after '::' "
                                                   "(vtccls::start=2); separate with ';' when options have commas"),
                  keep: str = typer.Option("0.5,0.25,0.1", help="comma-separated keep ratios or counts"),
                  data: str = typer.Option("shapes:2400:777", "--data", help="evaluation set (default: the held-out set)"),
                  limit: Optional[int] = typer.Option(None, help="evaluate only the first N questions"),
                  batch_size: int = typer.Option(64, help="questions per batch"),
                  threads: Optional[int] = typer.Option(None, help="CPU threads (default 2)"),
                  out: Optional[Path] = typer.Option(None, "-o", "--out", help="also write the results as JSON"),
                  as_json: bool = typer.Option(False, "--json", help="print JSON")):
        """Accuracy of every method at every keep, as % of the uncompressed model's accuracy."""
        from .sweep import print_table, sweep

        if batch_size < 1:
            raise EdgemmError("--batch-size must be >= 1")
        ms = [m.strip() for m in methods.split(";" if ";" in methods else ",") if m.strip()]
        ks = [k.strip() for k in keep.split(",") if k.strip()]
        if not ms or not ks:
            raise EdgemmError("--methods and --keep must each name at least one value")
        rep = sweep(model, ms, ks, data, limit=limit, batch_size=batch_size, threads=threads, quiet=as_json, out=out)
        if as_json:
            sys.stdout.write(json.dumps(rep, indent=2) + "\n")
        else:
            print_table(rep)
