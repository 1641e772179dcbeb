"""Sweep visual-token methods x keeps on an evaluation set (the table in docs/tokens.md)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..errors import EdgemmError
from ..fileio import write_json
from . import parse


def _spec(method: str, keep: str) -> str:
    """'vtccls::start=2' + '0.25' -> 'vtccls:0.25:start=2'."""
    name, _, opts = method.partition("::")
    return f"{name}:{keep}" + (f":{opts}" if opts else "")


def sweep(model: str, methods: list[str], keeps: list[str], data: str, limit: int | None = None, batch_size: int = 64,
          threads: int | None = None, quiet: bool = False, out: Path | None = None) -> dict:
    import torch

    from .. import runtimes
    from ..data import load_dataset
    from ..eval import evaluate
    from ..models import load_model
    from . import set_visual_tokens, visual_token_count

    settings = [[parse(_spec(m, k)) for k in keeps] for m in methods]  # validate everything before evaluating
    if any(s is None for row in settings for s in row):
        raise EdgemmError("sweep settings must compress (not 'none')")
    torch.set_num_threads(threads or min(2, os.cpu_count() or 1))
    lm = load_model(model)
    for row in settings:
        for s in row:
            s.validate_for(lm.config)
    stored = lm.config.extras.get("visual_tokens")
    ds = load_dataset(data, limit)
    sess = runtimes.load(lm)
    set_visual_tokens(lm, None)
    t0 = time.perf_counter()
    base = evaluate(sess, ds, f"{model} (all tokens)", batch_size=batch_size, quiet=quiet)
    rows = []
    for m, row in zip(methods, settings):
        for k, s in zip(keeps, row):
            set_visual_tokens(lm, s)
            rep = evaluate(sess, ds, f"{model} {s}", batch_size=batch_size, quiet=quiet)
            rows.append({"method": m, "keep": s.keep, "setting": s.to_dict(), "tokens": visual_token_count(lm.config),
                         "accuracy": rep["accuracy"], "pct_of_uncompressed": 100 * rep["accuracy"] / base["accuracy"] if base["accuracy"] else None,
                         "per_type": rep["per_type"], "questions_per_s": rep["questions_per_s"]})
            if out:  # partial results after every setting (a long sweep that is interrupted keeps what it measured)
                write_json(out, {"model": model, "data": ds.name, "n": len(ds), "partial": True,
                                 "uncompressed": {"accuracy": base["accuracy"], "per_type": base["per_type"]},
                                 "methods": methods, "keeps": keeps, "rows": rows})
    lm.config.extras.pop("visual_tokens", None)
    if stored:
        lm.config.extras["visual_tokens"] = stored
    result = {"model": model, "data": ds.name, "n": len(ds), "uncompressed": {"accuracy": base["accuracy"], "tokens": lm.config.num_visual_tokens,
                                                                           "per_type": base["per_type"]},
              "methods": methods, "keeps": keeps, "rows": rows,
              "wall_s": round(time.perf_counter() - t0, 1)}
    if out:
        write_json(out, result)
    return result


def markdown(rep: dict) -> str:
    keeps = rep["keeps"]
    lines = [f"| method | " + " | ".join(f"keep {k}" for k in keeps) + " |", "|---|" + "---|" * len(keeps)]
    for m in rep["methods"]:
        cells = []
        for r in [x for x in rep["rows"] if x["method"] == m]:
            cells.append(f"{r['pct_of_uncompressed']:.1f}% ({100 * r['accuracy']:.2f}, {r['tokens']} tok)")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_table(rep: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    u = rep["uncompressed"]
    t = Table(title=f"{rep['model']} on {rep['data']}: % of the uncompressed accuracy ({100 * u['accuracy']:.2f}%, {u['tokens']} tokens)")
    t.add_column("method")
    for k in rep["keeps"]:
        t.add_column(f"keep {k}", justify="right")
    for m in rep["methods"]:
        cells = [f"{r['pct_of_uncompressed']:.1f}% ({r['tokens']})" for r in rep["rows"] if r["method"] == m]
        t.add_row(m, *cells)
    Console().print(t)
