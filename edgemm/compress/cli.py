"""`edgemm quantize` and `edgemm sparsify` (registered through edgemm.cli.COMMAND_MODULES)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import EdgemmError

MODEL_HELP = "demo, demo-small, an edgemm checkpoint directory or a Hugging Face LLaVA directory"
CALIB_HELP = "calibration data in the eval format (a dataset directory or shapes:N:SEED); default: the shapes task with the calibration seed"


def _setup(threads: Optional[int]):
    import torch

    torch.set_num_threads(threads or min(2, os.cpu_count() or 1))


def _selection(include: Optional[List[str]], exclude: Optional[List[str]], include_lm_head: bool) -> dict:
    from .config import DEFAULT_EXCLUDE, DEFAULT_INCLUDE

    inc = list(include) if include else list(DEFAULT_INCLUDE)
    exc = list(exclude) if exclude else ([] if include_lm_head else list(DEFAULT_EXCLUDE))
    if include_lm_head:
        exc = [p for p in exc if p not in DEFAULT_EXCLUDE]
    return {"include": inc, "exclude": exc}


def _forward_loop(config, processor, calib: Optional[str], calib_n: int, calib_batch_size: int):
    from .calibration import dataset_forward_loop, shapes_forward_loop

    if config.method in ("rtn", "magnitude"):
        return None
    if calib_n < 1:
        raise EdgemmError("--calib-n must be >= 1")
    if calib:
        return dataset_forward_loop(processor, calib, calib_n, calib_batch_size)
    return shapes_forward_loop(processor, calib_n, batch_size=calib_batch_size)


def _run(model: str, out: Path, config, calib, calib_n, calib_batch_size, threads, as_json, command: str):
    from ..cli import _print_json, out as console
    from ..models import load_model
    from ..models.checkpoint import save_checkpoint
    from . import apply
    from .common import layer_entries

    _setup(threads)
    t0 = time.perf_counter()
    lm = load_model(model)
    quant, sparse = layer_entries(lm.model)
    if quant:
        what = "sparsify" if command == "sparsify" else "quantize"
        raise EdgemmError(f"{model} is already quantized ({len(quant)} packed layers); {what} a float model"
                          + (" (sparsify first, then quantize: quantization keeps the zeros)" if what == "sparsify" else ""))
    loop = _forward_loop(config, lm.processor, calib, calib_n, calib_batch_size)
    rep = apply(lm.model, config, forward_loop=loop, quiet=as_json)
    meta = {"compressed_by": f"edgemm {command}", "method": config.method}
    save_checkpoint(lm.model, lm.processor, out, metadata=meta)
    rep = {"model": model, "out": str(out), "calibration": None if loop is None else {"data": loop.name, "samples": len(loop)},
           **rep, "total_wall_s": round(time.perf_counter() - t0, 2)}
    if as_json:
        _print_json(rep)
        return
    b0, b1 = rep["weight_bytes_before"], rep["weight_bytes_after"]
    console.print(f"{command} {config.method}: {rep['layers_touched']} layers of {model} -> {out}")
    console.print(f"weight bytes {b0:,} -> {b1:,} ({b1 / b0:.3f}x) in {rep['total_wall_s']:.1f} s"
                  + (f"; calibration: {len(loop)} samples of {loop.name}" if loop is not None else ""))
    if rep.get("uncalibrated"):
        console.print(f"[yellow]{len(rep['uncalibrated'])} layers never ran during calibration "
                      f"(fell back to {'magnitude' if config.kind == 'sparsify' else 'RTN'}): "
                      f"{', '.join(rep['uncalibrated'][:4])}{' ...' if len(rep['uncalibrated']) > 4 else ''}")
    if rep.get("outliers") is not None:
        console.print(f"W8A8: {len(rep.get('clipped_layers', []))} layers use the clipped scale; "
                      f"{sum(rep['outliers'].values())} outlier channels in {len(rep['outliers'])} layers; "
                      f"shadow path {'on' if rep['shadow'] else 'off'}")
    console.print(f"per-layer formats: edgemm info {out}")


def register(app: typer.Typer) -> None:
    @app.command()
    def quantize(model: str = typer.Argument(..., help=MODEL_HELP),
                 out: Path = typer.Option(..., "-o", "--out", help="output checkpoint directory"),
                 method: str = typer.Option("gptq", "--method", help="rtn | gptq | awq | w8a8"),
                 bits: int = typer.Option(4, "--bits", help="4 or 8 (w8a8: 8)"),
                 group_size: Optional[int] = typer.Option(None, "--group-size", help="inputs per scale (32, 64, 128, ...; 0 = per output channel); default 32 (w8a8: per channel)"),
                 asym: bool = typer.Option(False, "--asym", help="asymmetric codes with zero points (default symmetric)"),
                 act_order: bool = typer.Option(True, "--act-order/--no-act-order", help="gptq: columns by decreasing Hessian diagonal"),
                 damp: float = typer.Option(0.01, "--damp", help="gptq: Hessian damping (fraction of the mean diagonal)"),
                 shadow: bool = typer.Option(True, "--shadow/--no-shadow", help="w8a8: float shadow path for clipped activations"),
                 act_scale: str = typer.Option("auto", "--act-scale", help="w8a8: auto | maxabs | clipped"),
                 clip_percentile: float = typer.Option(99.9, "--clip-percentile", help="w8a8: percentile of |x| for the clipped range"),
                 outlier_threshold: float = typer.Option(4.0, "--outlier-threshold", help="w8a8: use the clipped scale when max-abs >= this x clipped"),
                 smoothquant: Optional[float] = typer.Option(None, "--smoothquant", help="w8a8: SmoothQuant migration strength alpha (e.g. 0.5)"),
                 calib: Optional[str] = typer.Option(None, "--calib", help=CALIB_HELP),
                 calib_n: int = typer.Option(128, "--calib-n", help="calibration samples"),
                 calib_batch_size: int = typer.Option(16, "--calib-batch-size", help="calibration batch size"),
                 include: Optional[List[str]] = typer.Option(None, "--include", help="module-name pattern to quantize (repeatable; default all linears)"),
                 exclude: Optional[List[str]] = typer.Option(None, "--exclude", help="module-name pattern to skip (repeatable; default *lm_head)"),
                 include_lm_head: bool = typer.Option(False, "--include-lm-head", help="quantize the LM head too"),
                 threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default 2)"),
                 as_json: bool = typer.Option(False, "--json", help="print the report as JSON")):
        """Quantize a model's weights (int8/int4 weight-only, or W8A8 with shadow outliers) into an edgemm checkpoint."""
        from .config import QUANT_METHODS, config_from_dict

        method = method.lower()
        if method not in QUANT_METHODS:
            raise EdgemmError(f"unknown quantization method {method!r}; choose one of {', '.join(QUANT_METHODS)}")
        sel = _selection(include, exclude, include_lm_head)
        if method == "w8a8":
            if bits != 8:
                raise EdgemmError("w8a8 is 8-bit (int8 weights and activations): use --bits 8")
            if group_size not in (None, 0):
                raise EdgemmError("w8a8 weights are per output channel: --group-size does not apply")
            d = {"method": "w8a8", "shadow": shadow, "scale": act_scale, "clip_percentile": clip_percentile,
                 "outlier_threshold": outlier_threshold, "smoothquant": smoothquant, **sel}
        else:
            d = {"method": method, "bits": bits, "group_size": 32 if group_size is None else group_size,
                 "symmetric": not asym, **sel}
            if method == "gptq":
                d.update(act_order=act_order, damp=damp)
        config = config_from_dict(d)
        _run(model, out, config, calib, calib_n, calib_batch_size, threads, as_json, "quantize")

    @app.command()
    def sparsify(model: str = typer.Argument(..., help=MODEL_HELP),
                 out: Path = typer.Option(..., "-o", "--out", help="output checkpoint directory"),
                 method: str = typer.Option("sparsegpt", "--method", help="magnitude | wanda | sparsegpt | maskllm"),
                 pattern: str = typer.Option("2:4", "--pattern", help="N:M: at most N nonzeros in every M consecutive inputs"),
                 steps: int = typer.Option(400, "--steps", help="maskllm: optimizer steps"),
                 lr: float = typer.Option(0.05, "--lr", help="maskllm: learning rate of the mask logits"),
                 prior: str = typer.Option("sparsegpt", "--prior", help="maskllm: one-shot prior mask (sparsegpt | wanda | magnitude | none)"),
                 calib: Optional[str] = typer.Option(None, "--calib", help=CALIB_HELP),
                 calib_n: int = typer.Option(128, "--calib-n", help="calibration samples"),
                 calib_batch_size: int = typer.Option(16, "--calib-batch-size", help="calibration batch size (maskllm: one step per batch)"),
                 include: Optional[List[str]] = typer.Option(None, "--include", help="module-name pattern to sparsify (repeatable; default all linears)"),
                 exclude: Optional[List[str]] = typer.Option(None, "--exclude", help="module-name pattern to skip (repeatable; default *lm_head)"),
                 include_lm_head: bool = typer.Option(False, "--include-lm-head", help="sparsify the LM head too"),
                 threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default 2)"),
                 as_json: bool = typer.Option(False, "--json", help="print the report as JSON")):
        """Make a model's linear layers N:M sparse (2:4 by default) into an edgemm checkpoint."""
        from .config import SPARSE_METHODS, config_from_dict

        method = method.lower()
        if method not in SPARSE_METHODS:
            raise EdgemmError(f"unknown sparsity method {method!r}; choose one of {', '.join(SPARSE_METHODS)}")
        d = {"method": method, "pattern": pattern, **_selection(include, exclude, include_lm_head)}
        if method == "maskllm":
            d.update(steps=steps, lr=lr, prior=prior)
        config = config_from_dict(d)
        _run(model, out, config, calib, calib_n, calib_batch_size, threads, as_json, "sparsify")
