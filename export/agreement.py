"""Agreement of every exported artifact with the torch reference (issue 5, item 8).

    python -m edgemm.export.agreement [--model demo] [--out DIR] [--heldout CONFIGS] [--only CONFIGS] [--json]

For each configuration (torch; onnx fp32/int8/int4; gguf f16/q8_0/q4_0; executorch fp32/8da8w/8da4w;
the android-npu bundle run chunk by chunk on onnxruntime's CPU provider) it exports the model with
`edgemm.export.export` (what `edgemm export MODEL --target T --precision P -o DIR` runs) unless the bundle
is already in DIR, then runs `edgemm eval BUNDLE --runtime R --data SPEC --predictions F --json` as a
subprocess, on the agreement split (shapes:200:778) and, for the configurations `--heldout` names, on
the held-out split (shapes:2400:777). Agreement = the fraction of questions whose greedy answer string
is identical to torch's on the same split. Float and int8 artifacts must agree on >= 99 %
(`target` column); int4 artifacts are reported beside them with their accuracy.

Everything lands in DIR (bundles, predictions JSONL, eval JSON); a rerun reuses what is there, so the
table can be rebuilt or extended (`--only`, `--heldout`). Writes DIR/agreement.json and
DIR/agreement.md (the markdown table in docs/export.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from edgemm.errors import EdgemmError

AGREEMENT_TARGET = 0.99


@dataclass
class Config:
    name: str
    target: str | None  # export target (None: the torch reference, no export)
    runtime: str
    kind: str  # float | int8 | int4 | mixed (W8A8 prefill + int4 decode); the >= 99 % target applies to float and int8
    options: dict = field(default_factory=dict)
    label: str = ""


CONFIGS = [
    Config("torch", None, "torch", "float", label="torch (reference, fp32)"),
    Config("onnx-fp32", "onnx", "onnxruntime", "float", {"precision": "fp32"}, "ONNX fp32"),
    Config("onnx-int8", "onnx", "onnxruntime", "int8", {"precision": "int8"}, "ONNX int8 (dynamic int8 MatMul)"),
    Config("onnx-int4", "onnx", "onnxruntime", "int4", {"precision": "int4"}, "ONNX int4 (MatMulNBits block 32, int8 vision)"),
    Config("gguf-f16", "gguf", "llamacpp", "float", {"precision": "f16"}, "GGUF F16 (llama.cpp)"),
    Config("gguf-q8_0", "gguf", "llamacpp", "int8", {"precision": "q8_0"}, "GGUF Q8_0 (llama.cpp)"),
    Config("gguf-q4_0", "gguf", "llamacpp", "int4", {"precision": "q4_0"}, "GGUF Q4_0 (llama.cpp)"),
    Config("executorch-fp32", "executorch", "executorch", "float", {"precision": "fp32"}, "ExecuTorch fp32 (XNNPACK)"),
    Config("executorch-8da8w", "executorch", "executorch", "int8", {"precision": "8da8w"}, "ExecuTorch 8da8w (XNNPACK)"),
    Config("executorch-8da4w", "executorch", "executorch", "int4", {"precision": "8da4w"},
           "ExecuTorch 8da4w (XNNPACK; int8 vision)"),
    Config("android-npu", "android-npu", "onnxruntime", "mixed", {"native": False},
           "android-npu (W8A8 QDQ chunked prefill + int4 CPU decode, ORT CPU EP)"),
]
BY_NAME = {c.name: c for c in CONFIGS}
SPLITS = {"agreement": "shapes:200:778", "heldout": "shapes:2400:777"}


def _names(spec: str | None, default: list[str]) -> list[str]:
    if spec is None:
        return default
    if spec in ("all",):
        return [c.name for c in CONFIGS]
    if spec in ("none", ""):
        return []
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in BY_NAME]
    if bad:
        raise EdgemmError(f"unknown configuration {bad[0]!r}; choose from {', '.join(BY_NAME)}")
    return names


def export_bundle(cfg: Config, model, out: Path, log=print) -> Path | None:
    """The bundle of `cfg` in `out` (exported now unless already there). None for torch."""
    if cfg.target is None:
        return None
    from .bundle import MANIFEST

    b = out / "bundles" / cfg.name
    if (b / MANIFEST).is_file():
        return b
    from . import export

    t = time.time()
    export(model, cfg.target, b, **cfg.options)
    log(f"exported {cfg.name} in {time.time() - t:.0f} s -> {b}")
    return b


def run_eval(cfg: Config, data: str, bundle: Path | None, model_name: str, split: str, out: Path,
             threads: int, log=print) -> dict:
    """`edgemm eval` in a subprocess (the documented command); cached in out/preds."""
    preds = out / "preds" / f"{split}_{cfg.name}.jsonl"
    rep_f = out / "preds" / f"{split}_{cfg.name}.json"
    if preds.is_file() and rep_f.is_file():
        return json.loads(rep_f.read_text())
    preds.parent.mkdir(parents=True, exist_ok=True)
    target = str(bundle) if bundle is not None else model_name
    cmd = [sys.executable, "-m", "edgemm", "eval", target, "--runtime", cfg.runtime, "--data", data,
           "--predictions", str(preds), "--threads", str(threads), "--json"]
    t = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    if r.returncode != 0:
        raise EdgemmError(f"{' '.join(cmd)} failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    rep = json.loads(r.stdout[r.stdout.index("{"):])
    rep["command"] = "edgemm " + " ".join(cmd[3:])
    rep["elapsed_s"] = round(time.time() - t, 1)
    from edgemm.fileio import write_json

    write_json(rep_f, rep)
    log(f"{split} {cfg.name}: accuracy {100 * rep['accuracy']:.2f} % ({rep['elapsed_s']:.0f} s)")
    return rep


def _predictions(out: Path, split: str, name: str) -> list[str] | None:
    f = out / "preds" / f"{split}_{name}.jsonl"
    if not f.is_file():
        return None
    return [json.loads(line)["prediction"] for line in f.read_text().splitlines() if line.strip()]


def summarize(out: Path, names: list[str], splits: dict | None = None) -> dict:
    """Agreement and accuracy per configuration and split, from the cached predictions."""
    rows = []
    for n in names:
        cfg = BY_NAME[n]
        row = {"name": n, "label": cfg.label, "runtime": cfg.runtime, "kind": cfg.kind}
        for split in SPLITS:
            rep_f = out / "preds" / f"{split}_{n}.json"
            got, ref = _predictions(out, split, n), _predictions(out, split, "torch")
            if got is None or not rep_f.is_file():
                continue
            rep = json.loads(rep_f.read_text())
            d = {"n": rep["n"], "accuracy": rep["accuracy"], "per_type": rep.get("per_type"),
                 "questions_per_s": rep.get("questions_per_s"), "command": rep.get("command")}
            if ref is not None and n != "torch":
                if len(ref) != len(got):
                    raise EdgemmError(f"{split}: {n} has {len(got)} predictions, torch {len(ref)}")
                same = sum(a == b for a, b in zip(got, ref))
                d.update(agree=same, agreement=same / len(ref))
                if cfg.kind in ("float", "int8"):
                    d["meets_target"] = d["agreement"] >= AGREEMENT_TARGET
            row[split] = d
        bundle = out / "bundles" / n / "manifest.json"
        if bundle.is_file():
            m = json.loads(bundle.read_text())
            row["bundle_mb"] = round(sum(a["bytes"] for a in m["artifacts"]) / 1e6, 2)
            row["notes"] = m.get("notes", [])
        rows.append(row)
    splits = splits or SPLITS
    return {"agreement_split": splits["agreement"], "heldout_split": splits["heldout"], "target": AGREEMENT_TARGET,
            "rows": rows}


def markdown(summary: dict) -> str:
    def pct(x):
        return f"{100 * x:.2f} %" if x is not None else "-"

    lines = [f"| artifact | runtime | answers equal torch's ({summary['agreement_split']}) | accuracy ({summary['agreement_split']}) "
             f"| held-out accuracy ({summary['heldout_split']}) | answers equal torch's, held-out | MB |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in summary["rows"]:
        a, h = r.get("agreement") or {}, r.get("heldout") or {}
        if r["name"] == "torch":
            agree, hagree = "(reference)", "(reference)"
        else:
            agree = f"{a['agree']}/{a['n']} ({pct(a['agreement'])})" if "agree" in a else "not measured"
            if r["kind"] in ("float", "int8") and "agree" in a:
                agree = f"**{agree}**" if a["meets_target"] else f"{agree} (below 99 %)"
            elif r["kind"] == "int4" and "agree" in a:
                agree += " (int4)"
            elif r["kind"] == "mixed" and "agree" in a:
                agree += " (W8A8 + int4)"
            hagree = f"{h['agree']}/{h['n']} ({pct(h['agreement'])})" if "agree" in h else "-"
        lines.append(f"| {r['label']} | {r['runtime']} | {agree} | {pct(a.get('accuracy'))} | "
                     f"{pct(h.get('accuracy')) if h else 'not measured'} | {hagree} | {r.get('bundle_mb', '-')} |")
    per_type = [r for r in summary["rows"] if (r.get("heldout") or {}).get("per_type")]
    if per_type:
        types = list(per_type[0]["heldout"]["per_type"])
        lines += ["", f"| held-out accuracy per type ({summary['heldout_split']}) | " + " | ".join(types) + " |",
                  "| --- |" + " --- |" * len(types)]
        for r in per_type:
            pt = r["heldout"]["per_type"]
            lines.append(f"| {r['label']} | " + " | ".join(f"{100 * pt[t]:.2f}" for t in types) + " |")
    return "\n".join(lines) + "\n"


def run(model: str = "demo", out: str | Path = "agreement-run", only: str | None = None, heldout: str | None = "torch",
        threads: int = 2, agreement_data: str | None = None, heldout_data: str | None = None, log=print) -> dict:
    from edgemm.models import load_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    splits = {"agreement": agreement_data or SPLITS["agreement"], "heldout": heldout_data or SPLITS["heldout"]}
    stamp = out / "splits.json"  # cached predictions belong to these splits and this model
    key = {"model": model, **splits}
    if stamp.is_file() and json.loads(stamp.read_text()) != key:
        raise EdgemmError(f"{out} holds results for {json.loads(stamp.read_text())}; use another --out for {key}")
    from edgemm.fileio import write_json

    write_json(stamp, key)
    names = _names(only, [c.name for c in CONFIGS])
    if "torch" not in names:
        names = ["torch"] + names
    held = _names(heldout, ["torch"])
    loaded = load_model(model)
    for n in names:
        cfg = BY_NAME[n]
        bundle = export_bundle(cfg, loaded, out, log)
        run_eval(cfg, splits["agreement"], bundle, model, "agreement", out, threads, log)
        summarize(out, names, splits)  # fail early on an inconsistent cache
    for n in held:
        cfg = BY_NAME[n]
        bundle = export_bundle(cfg, loaded, out, log)
        run_eval(cfg, splits["heldout"], bundle, model, "heldout", out, threads, log)
    summary = summarize(out, names + [n for n in held if n not in names], splits)
    summary["model"] = model
    summary["model_source"] = str(loaded.source)
    from edgemm.fileio import atomic_file

    write_json(out / "agreement.json", summary)
    with atomic_file(out / "agreement.md", "w") as f:
        f.write(markdown(summary))
    return summary


def main(model: str = "demo", out: Path = Path("agreement-run"), only: Optional[str] = None,
         heldout: Optional[str] = "torch", threads: int = 2, as_json: bool = False,
         agreement_data: Optional[str] = None, heldout_data: Optional[str] = None):
    """Export every format/precision, run each in its runtime, compare greedy answers with torch."""
    summary = run(model, out, only, heldout, threads, agreement_data, heldout_data, log=(lambda m: print(m, file=sys.stderr)) if as_json else print)
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        print(markdown(summary))


def _cli(argv=None) -> int:
    import typer

    app = typer.Typer(add_completion=False)

    @app.command()
    def cmd(model: str = typer.Option("demo", help="model to export (demo, demo-small, a checkpoint directory)"),
            out: Path = typer.Option(Path("agreement-run"), "--out", "-o", help="working directory (bundles, predictions, table)"),
            only: Optional[str] = typer.Option(None, help=f"comma-separated configurations (default all): {', '.join(BY_NAME)}"),
            heldout: Optional[str] = typer.Option("torch", help="configurations also run on the held-out split "
                                                  "(comma-separated, 'all' or 'none'; default torch)"),
            threads: int = typer.Option(2, help="CPU threads per eval"),
            agreement_data: Optional[str] = typer.Option(None, help=f"agreement split (default {SPLITS['agreement']})"),
            heldout_data: Optional[str] = typer.Option(None, help=f"held-out split (default {SPLITS['heldout']})"),
            as_json: bool = typer.Option(False, "--json", help="print the summary as JSON")):
        """Export every format/precision, run each in its runtime, compare greedy answers with torch."""
        try:
            main(model, out, only, heldout, threads, as_json, agreement_data, heldout_data)
        except EdgemmError as e:
            print(f"error: {e}", file=sys.stderr)
            raise typer.Exit(1)

    try:
        app(argv, standalone_mode=False)
    except typer.Exit as e:
        return e.exit_code
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.ClickException):
            e.show()
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
