"""`python -m edgemm.bench.attention_ab BUNDLE [--threads 2] [--repeats 3] [--json]`: time-to-first-token of
one image+prompt question on the native engine with each attention precision, in one process, A/B/A
(auto, fp32, auto), so the two are compared under the same machine state.

Each mode loads the bundle, runs one warm-up question, then `--repeats` questions, each with a slightly
changed image so the encoding is recomputed. Reports image encode, prefill and TTFT per run."""

from __future__ import annotations

import gc
import json
import statistics
from pathlib import Path

import numpy as np
import typer

from ..errors import EdgemmError

PROMPT = "describe the image in detail, and count the objects."


def measure(bundle: Path, threads: int = 2, repeats: int = 3, modes=("auto", "fp32", "auto")) -> dict:
    from .. import _native
    from ..runtimes.native_runtime import _artifact

    try:
        manifest = json.loads((bundle / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise EdgemmError(f"cannot read {bundle / 'manifest.json'}: {e}") from None
    path = bundle / _artifact(manifest)["file"]
    size = int(manifest["model"]["config"]["vision"]["image_size"])
    img = np.random.default_rng(0).integers(0, 255, (size, size, 3)).astype(np.uint8)
    runs = []
    for mode in modes:
        m = _native.Model(path, n_threads=threads, attention=mode)
        s = _native.Session(m)
        rows = []
        for i in range(repeats + 1):
            img[0, 0, 0] ^= 1  # a new image: the cached encoding is not reused
            s.set_image_rgb8(img)
            _, st = s.generate(PROMPT, max_new_tokens=1)
            if i:
                rows.append({k: round(st[k], 2) for k in ("image_encode_ms", "prefill_ms", "ttft_ms")} |
                            {"prefill_tokens": st["prefill_tokens"]})
        runs.append({"mode": mode, "attention": m.info().get("attention"), "runs": rows,
                     "median_ttft_ms": statistics.median(r["ttft_ms"] for r in rows),
                     "median_image_encode_ms": statistics.median(r["image_encode_ms"] for r in rows)})
        s.close()
        m.close()
        gc.collect()
    return {"bundle": str(bundle), "threads": threads, "repeats": repeats, "modes": runs}


def main(bundle: Path = typer.Argument(..., help="a native bundle directory"),
         threads: int = typer.Option(2, help="engine threads"),
         repeats: int = typer.Option(3, help="timed questions per mode (after one warm-up)"),
         as_json: bool = typer.Option(False, "--json", help="print the report as JSON")):
    try:
        rep = measure(bundle, threads, repeats)
    except EdgemmError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    if as_json:
        typer.echo(json.dumps(rep, indent=1))
        return
    for r in rep["modes"]:
        typer.echo(f"{r['mode']:5s} {json.dumps(r['attention'])}: image {r['median_image_encode_ms']:.0f} ms, "
                   f"TTFT {r['median_ttft_ms']:.0f} ms ({r['runs'][0]['prefill_tokens']} tokens)")


if __name__ == "__main__":
    typer.run(main)
