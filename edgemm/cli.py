"""The `edgemm` command line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import EdgemmError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="edgemm: compress, export and run multimodal LLMs on phones and laptops.")
data_app = typer.Typer(no_args_is_help=True, help="Make datasets.")
app.add_typer(data_app, name="data")
out = Console()
err = Console(stderr=True)

MODEL_HELP = "demo, demo-small, an edgemm checkpoint directory, a Hugging Face LLaVA directory, or (run/eval) an exported bundle"


def _print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


def _threads(threads: Optional[int]) -> int:
    """CPU threads for a command: the option, else 2 (this project's benchmark setting), capped by the CPUs."""
    if threads is not None and threads < 1:
        raise EdgemmError("--threads must be >= 1")
    return threads or min(2, os.cpu_count() or 1)


VT_HELP = ("visual-token compression METHOD:KEEP applied on top of the model, e.g. fastervlm:0.25 or divprune:16 "
           "(keep: a ratio or a count; 'none' turns a stored setting off); see `edgemm tokens list`")


def _session(model: str, runtime: Optional[str], threads: int, visual_tokens: Optional[str]):
    """Open `model` in `runtime`; with --visual-tokens, the setting is stored in the loaded model's config."""
    from . import runtimes

    if visual_tokens is None:
        return runtimes.load(model, runtime=runtime, threads=threads)
    from .tokens import parse, set_visual_tokens

    setting = parse(visual_tokens)  # bad syntax fails before anything loads
    if runtimes.is_bundle(model):
        raise EdgemmError("a bundle's visual-token setting is fixed when it is exported; export again with the setting")
    if runtime not in (None, "torch"):
        raise EdgemmError(f"runtime {runtime!r} runs exported bundles; export the model first (edgemm export)")
    from .models import load_model

    lm = load_model(model)
    set_visual_tokens(lm, setting)
    return runtimes.load(lm, runtime="torch", threads=threads)


def _vt_info(sess) -> Optional[dict]:
    """The visual-token setting of a torch session's model: {setting, tokens per image, of how many}."""
    cfg = getattr(getattr(sess, "loaded", None), "config", None)
    if cfg is None:
        return None
    from .tokens import get_setting, visual_token_count

    s = get_setting(cfg)
    return {"setting": s.to_dict() if s else None, "tokens": visual_token_count(cfg), "of": cfg.num_visual_tokens}


# ----------------------------------------------------------------------------------------------- info


@app.command()
def info(model: str = typer.Argument(..., help=MODEL_HELP), as_json: bool = typer.Option(False, "--json", help="print JSON")):
    """Architecture, parameters and bytes per component."""
    from .models import load_model
    from .models.checkpoint import component_bytes

    lm = load_model(model)
    cfg = lm.config
    params = {c: _param_count(lm.model, c) for c in ("vision", "projector", "text")}
    nbytes = component_bytes(lm.model)
    report = {
        "model": model,
        "architecture": "EdgeVLM",
        "vision": {"image_size": cfg.vision.image_size, "patch_size": cfg.vision.patch_size, "hidden_size": cfg.vision.hidden_size,
                   "layers": cfg.vision.num_layers, "heads": cfg.vision.num_heads, "feature_layer": cfg.vision_feature_layer,
                   "blocks_run": cfg.feature_layer_index, "visual_tokens": cfg.num_visual_tokens},
        "text": {"vocab_size": cfg.text.vocab_size, "hidden_size": cfg.text.hidden_size, "layers": cfg.text.num_layers,
                 "heads": cfg.text.num_heads, "kv_heads": cfg.text.num_kv_heads, "head_dim": cfg.text.head_dim,
                 "intermediate_size": cfg.text.intermediate_size, "context": cfg.text.max_position_embeddings},
        "parameters": {**params, "total": sum(params.values())},
        "bytes": {**nbytes, "total": sum(nbytes.values())},
        **_compression_info(lm.model),
    }
    if as_json:
        _print_json(report)
        return
    t = Table(title=f"{model}: EdgeVLM")
    for col in ("component", "parameters", "bytes", "shape"):
        t.add_column(col, justify="right" if col != "shape" else "left")
    v, x = report["vision"], report["text"]
    shapes = {
        "vision": f"ViT {v['image_size']}px/{v['patch_size']}, d={v['hidden_size']}, {v['layers']} blocks ({v['blocks_run']} run), {v['heads']} heads",
        "projector": f"MLP {cfg.vision.hidden_size}->{cfg.text.hidden_size}->{cfg.text.hidden_size}, {cfg.projector.hidden_act}",
        "text": f"Llama d={x['hidden_size']}, {x['layers']} layers, {x['heads']}/{x['kv_heads']} heads x {x['head_dim']}, ffn {x['intermediate_size']}, vocab {x['vocab_size']}",
    }
    for c in ("vision", "projector", "text"):
        t.add_row(c, f"{params[c]:,}", f"{nbytes.get(c, 0):,}", shapes[c])
    t.add_row("total", f"{report['parameters']['total']:,}", f"{report['bytes']['total']:,}", f"{v['visual_tokens']} visual tokens per image")
    out.print(t)
    _print_layers(model, report)


def _param_count(model, comp: str) -> int:
    """Parameters of a component; a packed (quantized) layer counts its logical in x out weights."""
    n = sum(p.numel() for name, p in model.named_parameters() if name.startswith(comp + "."))
    for name, mod in model.named_modules():
        if name.startswith(comp + ".") and hasattr(mod, "qweight") and hasattr(mod, "in_features"):
            n += mod.in_features * mod.out_features
    return n


def _compression_info(model) -> dict:
    """Per-layer storage formats (edgemm.compress), W8A8 outlier channels, N:M layouts, total weight bytes."""
    from .compress import layer_formats, weight_bytes

    layers = layer_formats(model)
    summary: dict[str, dict] = {}
    for d in layers.values():
        key = d["format"] + (f"+{d['nm']}" if "nm" in d else "")
        s = summary.setdefault(key, {"layers": 0, "bytes": 0})
        s["layers"] += 1
        s["bytes"] += d["bytes"]
    return {"weight_bytes": weight_bytes(model), "formats": summary, "layers": layers}


def _print_layers(model: str, report: dict) -> None:
    t = Table(title=f"{model}: linear layers")
    for col in ("layer", "shape", "format", "group", "N:M", "outliers", "bytes"):
        t.add_column(col, justify="right" if col in ("group", "outliers", "bytes") else "left",
                     overflow="fold")
    for name, d in report["layers"].items():
        fmt = d["format"] + (f" ({d['method']})" if d.get("method") else "")
        if d["format"] in ("int4", "int8"):
            fmt += "" if d.get("symmetric", True) else " asym"
        outl = str(d["outlier_channels"]) + ("" if d.get("shadow", True) else " (no shadow)") if d["format"] == "w8a8" else ""
        group = "" if "group_size" not in d else ("channel" if d["group_size"] == d["in_features"] else str(d["group_size"]))
        nm = f"{d['nm']} ({d.get('sparsity_method')})" if "nm" in d else ""
        t.add_row(name, f"{d['out_features']}x{d['in_features']}", fmt, group, nm, outl, f"{d['bytes']:,}")
    out.print(t)
    fm = ", ".join(f"{k}: {v['layers']} layers" for k, v in report["formats"].items())
    out.print(f"total weight bytes {report['weight_bytes']:,} ({fm})")


# ------------------------------------------------------------------------------------------------ run


@app.command()
def run(model: str = typer.Argument(..., help=MODEL_HELP),
        image: Optional[Path] = typer.Option(None, "--image", help="PNG/JPEG image (omit for text only)"),
        prompt: str = typer.Option(..., "--prompt", help="the question"),
        max_new_tokens: int = typer.Option(32, help="stop after this many tokens"),
        temperature: float = typer.Option(0.0, help="0 = greedy"),
        top_k: int = typer.Option(0, help="sample among the k most likely tokens (0 = off)"),
        top_p: float = typer.Option(1.0, help="nucleus sampling mass (1 = off)"),
        seed: Optional[int] = typer.Option(None, help="sampling seed"),
        runtime: Optional[str] = typer.Option(None, help="torch (models) or onnxruntime, executorch, llamacpp, native (bundles); default: torch for a model, the bundle's own runtime for a bundle"),
        threads: Optional[int] = typer.Option(None, help="CPU threads (default 2)"),
        visual_tokens: Optional[str] = typer.Option(None, "--visual-tokens", help=VT_HELP),
        as_json: bool = typer.Option(False, "--json", help="print JSON with timings")):
    """Answer one question about an image."""
    from .processor import load_image

    if not prompt.strip():
        raise EdgemmError("the prompt is empty")
    img = load_image(image) if image is not None else None
    sess = _session(model, runtime, _threads(threads), visual_tokens)
    opts = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    if as_json:
        answer = sess.generate(img, prompt, **opts)
        _print_json({"model": model, "runtime": sess.runtime, "prompt": prompt, "image": str(image) if image else None,
                     "visual_tokens": _vt_info(sess), "answer": answer, "timings": sess.stats})
        return
    for piece in sess.generate(img, prompt, stream=True, **opts):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


# ----------------------------------------------------------------------------------------------- eval


@app.command("eval")
def eval_cmd(model: str = typer.Argument(..., help=MODEL_HELP),
             data: str = typer.Option(..., "--data", help="dataset directory, or shapes:N:SEED to generate on the fly"),
             limit: Optional[int] = typer.Option(None, help="evaluate only the first N records"),
             batch_size: int = typer.Option(64, help="questions per batch"),
             predictions: Optional[Path] = typer.Option(None, help="write each record plus its prediction (JSONL)"),
             runtime: Optional[str] = typer.Option(None, help="torch (models) or onnxruntime, executorch, llamacpp, native (bundles); default: torch for a model, the bundle's own runtime for a bundle"),
             threads: Optional[int] = typer.Option(None, help="CPU threads (default 2)"),
             visual_tokens: Optional[str] = typer.Option(None, "--visual-tokens", help=VT_HELP),
             as_json: bool = typer.Option(False, "--json", help="print one JSON object")):
    """Exact-match accuracy, overall and per question type."""
    from .data import load_dataset
    from .eval import evaluate

    if limit is not None and limit < 1:
        raise EdgemmError("--limit must be >= 1")
    if batch_size < 1:
        raise EdgemmError("--batch-size must be >= 1")
    ds = load_dataset(data, limit)
    sess = _session(model, runtime, _threads(threads), visual_tokens)
    rep = evaluate(sess, ds, model, batch_size=batch_size, quiet=as_json, predictions=predictions)
    rep["visual_tokens"] = _vt_info(sess)
    if as_json:
        _print_json(rep)
        return
    t = Table(title=f"{model} on {ds.name} ({rep['n']} questions, {rep['runtime']})")
    t.add_column("type")
    t.add_column("accuracy", justify="right")
    for k, v in rep["per_type"].items():
        t.add_row(k, f"{100 * v:.2f}%")
    t.add_row("[bold]all", f"[bold]{100 * rep['accuracy']:.2f}%")
    out.print(t)
    out.print(f"{rep['questions_per_s']} questions/s")


# --------------------------------------------------------------------------------------------- export


@app.command()
def export(model: str = typer.Argument(..., help=MODEL_HELP),
           target: str = typer.Option(..., "--target", help="gguf, onnx, executorch, coreml, laptop, android-cpu, android-npu or ios"),
           out_dir: Path = typer.Option(..., "-o", "--out", help="bundle directory to write"),
           precision: Optional[str] = typer.Option(None, help="format-specific precision (e.g. f16, q8_0, q4_0 for gguf; fp32, int8, int4 for onnx)"),
           as_json: bool = typer.Option(False, "--json", help="print the manifest as JSON")):
    """Export a model to a bundle (manifest.json + artifacts) for a format or a device target."""
    from .export import export as do_export

    opts = {"precision": precision} if precision else {}
    manifest = do_export(model, target, out_dir, **opts)
    if as_json:
        _print_json(manifest)
        return
    t = Table(title=f"{out_dir} ({target})")
    for c in ("artifact", "role", "format", "precision", "lane", "runtime", "MB"):
        t.add_column(c)
    for a in manifest["artifacts"]:
        t.add_row(a["file"], a["role"], a["format"], a["precision"], a["lane"], a.get("runtime", ""), f"{a['bytes'] / 1e6:.2f}")
    out.print(t)
    for n in manifest.get("notes", []):
        out.print(f"note: {n}")


# ----------------------------------------------------------------------------------------------- data


@data_app.command("shapes")
def data_shapes(out_dir: Path = typer.Argument(..., help="directory to write (images/ and data.jsonl)"),
                n: int = typer.Option(2000, "--n", help="number of questions"),
                seed: int = typer.Option(0, "--seed", help="random seed"),
                as_json: bool = typer.Option(False, "--json", help="print a JSON summary")):
    """Write a shapes-task dataset (spec v1, deterministic for a seed)."""
    from .data import write_shapes
    from .progress import progress

    with progress(n, f"writing {out_dir}", quiet=as_json) as bar:
        write_shapes(out_dir, n, seed, progress=bar.advance)
    if as_json:
        _print_json({"out": str(out_dir), "n": n, "seed": seed})
    else:
        out.print(f"wrote {n} questions to {out_dir}")


# ------------------------------------------------------------------------------------------ train-demo


@app.command("train-demo")
def train_demo_cmd(out_dir: Optional[Path] = typer.Option(None, "--out", help="where to write the models (default: the package's built-in models)"),
                   models: str = typer.Option("demo,demo-small", help="comma-separated: demo, demo-small"),
                   work_dir: Path = typer.Option(Path("runs/train-demo"), help="resumable training state"),
                   seed: int = typer.Option(0, help="random seed"),
                   vision_steps: Optional[int] = typer.Option(None, help="override the vision pre-training steps"),
                   vlm_steps: Optional[int] = typer.Option(None, help="override demo's VLM training steps (default 3000)"),
                   small_vlm_steps: Optional[int] = typer.Option(None, help="override demo-small's VLM training steps (default 1500)"),
                   threads: Optional[int] = typer.Option(None, help="CPU threads (default 2)"),
                   as_json: bool = typer.Option(False, "--json", help="print the training report as JSON")):
    """Train the demo models (seeded, CPU) and write them as edgemm checkpoints."""
    from .models import builtin_path
    from .train.demo import DemoRecipe, train_demo

    names = tuple(m.strip() for m in models.split(",") if m.strip())
    bad = [m for m in names if m not in ("demo", "demo-small")]
    if bad or not names:
        raise EdgemmError(f"--models takes demo and/or demo-small, got {models!r}")
    recipe = DemoRecipe(seed=seed)
    if vision_steps is not None:
        recipe.vision_steps = vision_steps
    if vlm_steps is not None:
        recipe.vlm_steps = vlm_steps
    if small_vlm_steps is not None:
        recipe.small_vlm_steps = small_vlm_steps
    if min(recipe.vision_steps, recipe.vlm_steps, recipe.small_vlm_steps) < 1:
        raise EdgemmError("step counts must be >= 1")
    import torch

    torch.set_num_threads(_threads(threads))
    root = out_dir if out_dir is not None else builtin_path("demo").parent
    rep = train_demo(root, names, recipe, work_dir, quiet=as_json)
    if as_json:
        _print_json(rep)
    else:
        for n in names:
            out.print(f"{n}: {rep[n]['params']:,} parameters, {rep[n]['steps']} steps in {rep[n]['wall_s']:.0f} s -> {root / n}")
        out.print(f"vision pre-training: {rep['vision_pretrain']['steps']} steps in {rep['vision_pretrain']['wall_s']:.0f} s; total {rep['total_wall_s']:.0f} s")


# ----------------------------------------------------------------------------------------------- demo


@app.command()
def demo(n: int = typer.Option(300, help="questions in the accuracy check (and per stage of the compression story)"),
         seed: int = typer.Option(2024, help="seed of the demo questions"),
         story: bool = typer.Option(True, "--story/--no-story", help="then run a compression recipe stage by stage"),
         recipe: str = typer.Option("tiny", help="the recipe of the compression story (tiny: one-shot methods, a few minutes; phone-npu trains MaskLLM masks: tens of minutes on 2 cores)"),
         cache_dir: Optional[Path] = typer.Option(None, help="stage cache of the story (default $EDGEMM_CACHE or ~/.cache/edgemm)"),
         train: bool = typer.Option(False, "--train", help="run a distill stage that is not cached (an hour or more) instead of using demo-small in its place"),
         as_json: bool = typer.Option(False, "--json", help="print JSON")):
    """A tour on the built-in demo model: answer questions about shapes images, measure, then compress it."""
    from .demo import run_demo

    rep = run_demo(n=n, seed=seed, console=None if as_json else out, story=story, recipe=recipe, cache_dir=cache_dir, train=train)
    if as_json:
        _print_json(rep)


# ------------------------------------------------------------------------------------ more commands

# Each feature area registers its own commands: a module with `register(app)` (imports inside the
# command functions, so that `edgemm --help` stays fast and torch-free).
COMMAND_MODULES: list[str] = ["edgemm.tokens.cli", "edgemm.distill.cli", "edgemm.recipes.cli", "edgemm.compress.cli", "edgemm.chat", "edgemm.bench.cli"]


def _register() -> None:
    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(app)


_register()


# ----------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    debug = os.environ.get("EDGEMM_DEBUG") == "1"
    try:
        rc = app(args=argv, standalone_mode=False)
        return rc if isinstance(rc, int) else 0  # typer.Exit(n) comes back as the return value here
    except EdgemmError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except SystemExit as e:
        return int(e.code or 0)
    except ModuleNotFoundError as e:
        if debug:
            raise
        err.print(f"[red]error:[/red] this needs the Python package {e.name!r}, which is not installed: "
                  f"pip install 'edgemm[all]' (or the extra that provides it, see pyproject.toml)", highlight=False, soft_wrap=True)
        return 1
    except Exception as e:  # usage errors from typer's (vendored) click, and anything unexpected
        kind = type(e).__name__
        if kind == "Exit":
            return int(getattr(e, "exit_code", 0))
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):
            if e.format_message():  # (no-args help raises one with no message)
                err.print(f"[red]error:[/red] {e.format_message()}", highlight=False, soft_wrap=True)
            return int(e.exit_code) or 2
        if kind == "Abort":
            err.print("aborted")
            return 130
        if debug:
            raise
        err.print(f"[red]error:[/red] {type(e).__name__}: {e} (set EDGEMM_DEBUG=1 for a traceback)", highlight=False, soft_wrap=True)
        return 1


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
