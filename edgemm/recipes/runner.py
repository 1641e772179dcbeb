"""Run a recipe: stage after stage, each output cached as a checkpoint, a report after each stage.

Layout of OUT:
    stages/00-input/row.json          the input model's row (accuracy, bytes, FLOPs)
    stages/NN-<name>/model/           the stage's output checkpoint
    stages/NN-<name>/stage.json       its cache key, info and row (written after the checkpoint)
    stages/NN-<name>.work/            resumable state while a training stage (distill) runs
    model/                            the final compressed checkpoint
    report.json, report.md, report.png

A stage's cache key is the sha256 of its spec and of the identity of its input (the content hash of
the input model, or of the previous stage's output), so a rerun after an interruption (or with a
recipe changed at stage i) reuses the stages before the change and recomputes from there, and a
stage recomputed with a different output invalidates everything after it; a distill stage also
resumes mid-way.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import EdgemmError
from ..fileio import atomic_dir, write_json
from . import EXTRA_STAGES, Recipe, Stage, load_recipe, weight_config
from .metrics import prefill_flops, prompt_text_tokens, weight_bytes

REPORT_VERSION = 1


@dataclass
class RunContext:
    out: Path
    work_dir: Path
    quiet: bool = False
    say: Callable[[str], None] = lambda s: None
    eval_data: str = ""
    eval_limit: int | None = None
    batch_size: int = 64
    prompt: str = ""
    log: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ stages


def stage_tokens(loaded, opts: dict, ctx: RunContext):
    from ..tokens import set_visual_tokens, visual_token_count

    s = set_visual_tokens(loaded, opts)
    return loaded, {"visual_tokens": s.to_dict(), "tokens": visual_token_count(loaded.config),
                    "of": loaded.config.num_visual_tokens}


def stage_distill(loaded, opts: dict, ctx: RunContext):
    from ..models.checkpoint import LoadedModel
    from ..distill.trainer import DistillConfig, distill, student_config

    student_spec = opts.get("student", "demo-small")
    cfg = DistillConfig.from_dict({k: v for k, v in opts.items() if k != "student"})
    scfg = student_config(student_spec, loaded.config)
    res = distill(loaded.model, loaded.processor, scfg, cfg, ctx.work_dir, quiet=ctx.quiet)
    info = {"student": student_spec, "steps": res.config.steps, "params": sum(p.numel() for p in res.student.parameters()),
            "stages": [{k: v for k, v in s.items() if k != "history"} | {"final": s["history"][-1] if s["history"] else {}}
                       for s in res.stages]}
    return LoadedModel(res.student, res.processor, f"{loaded.source} distilled"), info


def stage_weights(loaded, opts: dict, ctx: RunContext):
    from ..compress import apply
    from ..compress.calibration import shapes_forward_loop
    from ..data import CALIBRATION_SEED

    cfg = weight_config(opts)
    cal = opts.get("calibration", {})
    forward_loop = shapes_forward_loop(loaded.processor, n=int(cal.get("n", 64)), seed=int(cal.get("seed", CALIBRATION_SEED)))
    info = apply(loaded.model, cfg, forward_loop=forward_loop)
    return loaded, _jsonable(info or {})


STAGE_RUNNERS = {"tokens": stage_tokens, "distill": stage_distill, "sparsify": stage_weights, "quantize": stage_weights}


def _jsonable(x):
    try:
        return json.loads(json.dumps(x, default=lambda o: repr(o)))
    except (TypeError, ValueError):
        return {"info": repr(x)}


# --------------------------------------------------------------------------------------- measuring


def measure(loaded, ctx: RunContext, label: str) -> dict:
    """The report row of a model: accuracy on the eval set, weight bytes, prefill FLOPs, tokens."""
    from ..data import load_dataset
    from ..eval import evaluate
    from ..runtimes.torch_runtime import TorchSession
    from ..tokens import get_setting, visual_token_count

    ds = load_dataset(ctx.eval_data, ctx.eval_limit)
    rep = evaluate(TorchSession(loaded), ds, label, batch_size=ctx.batch_size, quiet=ctx.quiet)
    nbytes, source = weight_bytes(loaded.model)
    flops = prefill_flops(loaded.config, prompt_text_tokens(loaded.processor, ctx.prompt))
    s = get_setting(loaded.config)
    return {"accuracy": rep["accuracy"], "per_type": rep["per_type"], "n": rep["n"], "data": ds.name,
            "weight_bytes": nbytes, "weight_bytes_source": source,
            "params": sum(p.numel() for p in loaded.model.parameters()),
            "visual_tokens": visual_token_count(loaded.config), "visual_token_setting": s.to_dict() if s else None,
            "prefill_flops": flops["total"], "prefill_flops_detail": flops, "eval_wall_s": rep["wall_s"]}


# ------------------------------------------------------------------------------------------ runner


def fingerprint_model(loaded) -> str:
    """sha256 of a loaded model's canonical config and its tensors (names, dtypes, shapes, bytes): the
    same for the same weights however the checkpoint files were written."""
    import torch

    from ..models.checkpoint import state_dict_for_saving

    h = hashlib.sha256()
    h.update(json.dumps(loaded.config.to_dict(), sort_keys=True).encode())
    for k, v in sorted(state_dict_for_saving(loaded.model).items()):
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}".encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _chain(prev: str, stage: Stage) -> str:
    return hashlib.sha256((prev + json.dumps(stage.to_dict(), sort_keys=True)).encode()).hexdigest()


def _read(p: Path) -> dict | None:
    try:
        return json.loads(p.read_text()) if p.is_file() else None
    except json.JSONDecodeError:
        return None


def _eval_key(ctx: RunContext) -> str:
    return json.dumps({"data": ctx.eval_data, "limit": ctx.eval_limit, "prompt": ctx.prompt})


def stages_to_run(model: str, recipe, out: str | Path, prebuilt: dict | None = None) -> list[str]:
    """Names of the stages a `run_recipe` with these arguments would compute (neither cached in OUT
    nor prebuilt): the first one not cached and every one after it."""
    from ..models import load_model

    rec: Recipe = load_recipe(recipe)
    prev = fingerprint_model(load_model(model))
    todo: list[str] = []
    for i, st in enumerate(rec.stages, 1):
        d = Path(out) / "stages" / f"{i:02d}-{st.name}"
        meta = _read(d / "stage.json") if prev else None
        cached = (meta is not None and meta.get("key") == _chain(prev, st) and bool(meta.get("output"))
                  and (d / "model" / "config.json").is_file())
        if cached:
            prev = meta["output"]
            continue
        prev = ""  # the stages after a recomputed one depend on its new output
        if st.name not in (prebuilt or {}):
            todo.append(st.name)
    return todo


def run_recipe(model: str, recipe, out: str | Path, eval_data: str | None = None, eval_limit: int | None = None,
               batch_size: int | None = None, quiet: bool = False, say: Callable[[str], None] | None = None,
               prebuilt: dict[str, str | Path] | None = None) -> dict:
    """Run `recipe` (name, path, dict or Recipe) on `model`, writing OUT as described above. Returns the report.

    `prebuilt` maps a stage name to a checkpoint directory that already holds that stage's output for
    this input (e.g. the shipped distilled demo student): when the stage is not cached, the checkpoint
    is copied in instead of running the stage, and its info says so."""
    from ..data import HELDOUT
    from ..models import load_model
    from ..models.checkpoint import load_checkpoint, save_checkpoint
    from .metrics import FLOPS_PROMPT
    from .report import write_report

    rec: Recipe = load_recipe(recipe)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise EdgemmError(f"-o {out} exists and is not a directory")
    say = say or (lambda s: None)
    ev = rec.eval
    ctx = RunContext(out=out, work_dir=out, quiet=quiet, say=say,
                     eval_data=eval_data or ev.get("data") or HELDOUT,
                     eval_limit=eval_limit if eval_limit is not None else ev.get("limit"),
                     batch_size=batch_size or int(ev.get("batch_size", 64)),
                     prompt=str(ev.get("prompt") or FLOPS_PROMPT))
    stages_dir = out / "stages"
    t_start = time.time()
    current = load_model(model)
    key = fingerprint_model(current)
    ekey = _eval_key(ctx)
    rows: list[dict] = []

    # the input model's row
    row_file = stages_dir / "00-input" / "row.json"
    cached_row = _read(row_file)
    if cached_row and cached_row.get("key") == key and cached_row.get("eval_key") == ekey:
        row = cached_row["row"] | {"cached": True}
        say(f"input {model}: measured before (cached)")
    else:
        say(f"input {model}: measuring")
        row = measure(current, ctx, f"{model} (input)") | {"stage": "input", "type": "input", "stage_wall_s": 0.0}
        write_json(row_file, {"key": key, "eval_key": ekey, "row": row})
        row = row | {"cached": False}
    rows.append(row)
    base_acc = row["accuracy"]
    rows[0]["pct_of_input"] = 100.0

    def report():
        return write_report(out, {"version": REPORT_VERSION, "model": model, "recipe": rec.to_dict(), "recipe_source": rec.source,
                                  "eval": {"data": ctx.eval_data, "limit": ctx.eval_limit, "prompt": ctx.prompt},
                                  "rows": rows, "final_model": str(out / "model"),
                                  "wall_s": round(time.time() - t_start, 1)})

    report()
    loaded_is_current = True  # `current` holds the output of the last stage (False: only on disk)
    last_dir = None
    prev_output = key  # identity of the previous stage's output (content hash)
    for i, st in enumerate(rec.stages, 1):
        key = _chain(prev_output, st)
        d = stages_dir / f"{i:02d}-{st.name}"
        meta = _read(d / "stage.json")
        done = (meta is not None and meta.get("key") == key and bool(meta.get("output"))
                and (d / "model" / "config.json").is_file())
        if done:
            say(f"stage {i} {st.name}: cached ({d})")
            loaded_is_current = False
            info, wall = meta.get("info", {}), meta.get("wall_s", 0.0)
            cached = True
        else:
            if not loaded_is_current:
                current = load_checkpoint(last_dir / "model", source=f"{model} after {rec.stages[i - 2].name}")
                loaded_is_current = True
            ctx.work_dir = stages_dir / f"{i:02d}-{st.name}.work"
            t0 = time.time()
            pre = (prebuilt or {}).get(st.name)
            if pre is not None:
                say(f"stage {i} {st.name}: using the prebuilt checkpoint {pre}")
                current = load_checkpoint(Path(pre), source=str(pre))
                info = {"prebuilt": str(pre)}
                log = Path(pre) / "distill_log.json"
                if log.is_file():
                    info["prebuilt_wall_s"] = json.loads(log.read_text()).get("wall_s")
            else:
                say(f"stage {i} {st.name}: running ({st.type})")
                runner = STAGE_RUNNERS.get(st.type) or EXTRA_STAGES[st.type][1]
                current, info = runner(current, dict(st.options), ctx)
            wall = round(time.time() - t0, 1)
            save_checkpoint(current.model, current.processor, d / "model", metadata={"recipe": rec.name, "stage": st.name})
            meta = {"key": key, "output": fingerprint_model(current), "stage": st.to_dict(), "info": info, "wall_s": wall,
                    "row": None}
            write_json(d / "stage.json", meta)  # the stage is complete from here on
            shutil.rmtree(ctx.work_dir, ignore_errors=True)
            cached = False
        if meta.get("row") and meta.get("eval_key") == ekey:
            row = meta["row"]
        else:
            if not loaded_is_current:
                current = load_checkpoint(d / "model", source=f"{model} after {st.name}")
                loaded_is_current = True
            say(f"stage {i} {st.name}: measuring")
            row = measure(current, ctx, f"{model} after {st.name}") | {"stage": st.name, "type": st.type,
                                                                         "stage_wall_s": wall, "info": info}
            meta = meta | {"row": row, "eval_key": ekey}
            write_json(d / "stage.json", meta)
        row = dict(row) | {"cached": cached, "pct_of_input": 100.0 * row["accuracy"] / base_acc if base_acc else None}
        rows.append(row)
        last_dir = d
        prev_output = meta["output"]
        report()
    final = out / "model"
    with atomic_dir(final) as tmp:
        for f in (last_dir / "model").iterdir():
            shutil.copy2(f, tmp / f.name)
    return report()


__all__ = ["run_recipe", "stages_to_run", "measure", "STAGE_RUNNERS", "RunContext", "fingerprint_model"]
