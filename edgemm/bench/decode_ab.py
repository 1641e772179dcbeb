"""`python -m edgemm.bench.decode_ab BUNDLE_A BUNDLE_B [--lib L1,L2] [--rounds 8] [--json]`: decode
tokens/s of two native bundles (say dense and 2:4) interleaved in one process, so that both see the same
machine state -- on a shared VM the same bundle's decode rate drifts by tens of percent over minutes, and
only an interleaved comparison gives a usable ratio.

Each round resets a session per bundle and generates `--tokens` tokens from the same text prompt, bundle A
then bundle B; `--context N` makes the prompt at least N tokens long (decode then attends to N+ cached
positions). With `--lib`, each round runs one subprocess per native library (EDGEMM_NATIVE_LIB),
libraries alternating, to compare two builds of the engine on both bundles. Reports every run, the
medians, the ratio of medians B/A and the median of the per-round ratios."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Optional

import typer

from ..errors import EdgemmError

PROMPT = "describe a red circle and a blue square " * 4


def prompt_of(model, context: int) -> str:
    """PROMPT repeated until it is at least `context` tokens long."""
    p = PROMPT
    while len(model.tokenize(p)) < context:
        p += PROMPT
    return p


def run_rounds(bundles: list[Path], rounds: int, tokens: int, threads: int, context: int = 0) -> list[list[float]]:
    """Decode tok/s per bundle per round, bundles alternating within each round (this process's library)."""
    from .. import _native
    from ..export.native import model_path

    sessions = []
    for b in bundles:
        m = _native.Model(model_path(b), n_threads=threads)
        sessions.append((m, _native.Session(m)))
    prompt = prompt_of(sessions[0][0], context)
    out: list[list[float]] = [[] for _ in bundles]
    try:
        for _ in range(rounds):
            for i, (_, s) in enumerate(sessions):
                s.reset()
                _, st = s.generate(prompt, max_new_tokens=tokens, apply_template=False)
                out[i].append(round(st["decode_tokens"] / (st["decode_ms"] / 1e3), 2))
    finally:
        for m, s in sessions:
            s.close()
            m.close()
    return out


def summarize(a: list[float], b: list[float]) -> dict:
    return {"a_tok_s": a, "b_tok_s": b, "a_median": statistics.median(a), "b_median": statistics.median(b),
            "ratio_of_medians": round(statistics.median(b) / statistics.median(a), 3),
            "median_paired_ratio": round(statistics.median(y / x for x, y in zip(a, b)), 3)}


def measure(bundle_a: Path, bundle_b: Path, rounds: int = 8, tokens: int = 48, threads: int = 2,
            libs: Optional[list[str]] = None, context: int = 0) -> dict:
    from ..export.native import model_path

    bundles = [Path(bundle_a), Path(bundle_b)]
    for b in bundles:
        model_path(b)  # a clear error before any subprocess starts
    rep = {"bundle_a": str(bundle_a), "bundle_b": str(bundle_b), "rounds": rounds, "tokens": tokens, "threads": threads,
           "context": context}
    if not libs:
        a, b = run_rounds(bundles, rounds, tokens, threads, context)
        return rep | summarize(a, b)
    for lib in libs:
        if not Path(lib).is_file():
            raise EdgemmError(f"native library {lib} does not exist")
    runs = {lib: ([], []) for lib in libs}
    for _ in range(rounds):
        for lib in libs:
            cmd = [sys.executable, "-m", "edgemm.bench.decode_ab", str(bundle_a), str(bundle_b), "--rounds", "1",
                   "--tokens", str(tokens), "--threads", str(threads), "--context", str(context), "--json"]
            p = subprocess.run(cmd, env=dict(os.environ, EDGEMM_NATIVE_LIB=lib), capture_output=True, text=True)
            if p.returncode:
                raise EdgemmError(f"decode A/B with {lib} failed: {p.stderr.strip().splitlines()[-1:]}")
            r = json.loads(p.stdout)
            runs[lib][0].extend(r["a_tok_s"])
            runs[lib][1].extend(r["b_tok_s"])
    return rep | {"libraries": {lib: summarize(*ab) for lib, ab in runs.items()}}


def main(bundle_a: Path = typer.Argument(..., help="native bundle A (the reference, e.g. dense int4)"),
         bundle_b: Path = typer.Argument(..., help="native bundle B (e.g. 2:4 int4)"),
         rounds: int = typer.Option(8, help="interleaved rounds"),
         tokens: int = typer.Option(48, help="tokens generated per run"),
         threads: int = typer.Option(2, help="engine threads"),
         context: int = typer.Option(0, help="prompt length in tokens at least (0: a 36-token prompt)"),
         lib: Optional[str] = typer.Option(None, "--lib", help="comma-separated native libraries to compare (one subprocess each per round)"),
         as_json: bool = typer.Option(False, "--json", help="print the report as JSON")):
    if rounds < 1 or tokens < 1 or context < 0:
        typer.echo("error: --rounds and --tokens must be at least 1, --context at least 0", err=True)
        raise typer.Exit(1)
    try:
        rep = measure(bundle_a, bundle_b, rounds, tokens, threads, lib.split(",") if lib else None, context)
    except EdgemmError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    if as_json:
        typer.echo(json.dumps(rep))
        return
    for name, r in (rep["libraries"].items() if "libraries" in rep else [("", rep)]):
        typer.echo(f"{name + ': ' if name else ''}A median {r['a_median']:.2f} tok/s, B median {r['b_median']:.2f}; "
                   f"B/A {r['ratio_of_medians']:.3f} (ratio of medians), {r['median_paired_ratio']:.3f} (median of rounds)")


if __name__ == "__main__":
    typer.run(main)
