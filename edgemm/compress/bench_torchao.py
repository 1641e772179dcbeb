"""Benchmark (not a test): edgemm's weight methods against torchao's CPU weight-only configs on a model.

    python -m edgemm.compress.bench_torchao --model demo --data shapes:2400:777 \
        --results runs/compress/bench.json --save-dir runs/compress/ckpt --markdown runs/compress/table.md

For every entry it compresses a fresh copy of the model (the whole model: vision encoder with its
patch embedding, projector, LLM; the LM head stays float everywhere, torchao included), then for the
edgemm entries saves an edgemm checkpoint, loads it back and evaluates the loaded model (so the numbers
are those of the checkpoint `edgemm eval` reads); torchao entries are evaluated in memory. It records
accuracy on the held-out set, % of the fp32 accuracy, the bytes of the stored weights and the wall
times. Results are cached per entry in the --results JSON (rerun with --force to redo one).

torchao on this CPU build: Int8WeightOnlyConfig (int8 per row) and Int8DynamicActivationInt8WeightConfig
run; Int4WeightOnlyConfig needs CUDA or the mslk package for every packing format, so the int4
comparison uses IntxWeightOnlyConfig(int4, PerGroup(32)), which stores one int4 value per int8 byte.
Group size 128 does not divide the demo's 192-wide vision layers nor its 704-wide MLP down
projection, so the larger-group entries use 64.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

from ..data import CALIBRATION_SEED, HELDOUT

G = 32
ENTRIES: list[tuple[str, str, str, object]] = [
    # key, label, kind, spec (edgemm: list of config dicts; torchao: name)
    ("fp32", "fp32 (reference)", "none", None),
    ("torchao-int8wo", "torchao Int8WeightOnlyConfig (int8 per row)", "torchao", "int8wo"),
    ("int8-rtn-ch", "edgemm int8 RTN per channel", "edgemm", [{"method": "rtn", "bits": 8, "group_size": 0}]),
    ("int8-rtn-g32", "edgemm int8 RTN g32 (= Q8_0)", "edgemm", [{"method": "rtn", "bits": 8, "group_size": G}]),
    ("int8-gptq-ch", "edgemm int8 GPTQ per channel", "edgemm", [{"method": "gptq", "bits": 8, "group_size": 0}]),
    ("torchao-w8a8-dyn", "torchao Int8DynamicActivationInt8WeightConfig (dynamic per-token A8)", "torchao", "w8a8dyn"),
    ("w8a8-shadow", "edgemm W8A8 static, shadow outliers", "edgemm", [{"method": "w8a8", "shadow": True}]),
    ("w8a8-maxabs", "edgemm W8A8 static, max-abs scales, no shadow", "edgemm", [{"method": "w8a8", "shadow": False}]),
    ("w8a8-clipped-noshadow", "edgemm W8A8 static, clipped scales, no shadow", "edgemm",
     [{"method": "w8a8", "shadow": False, "scale": "clipped"}]),
    ("torchao-int4-g32", "torchao IntxWeightOnlyConfig(int4, PerGroup(32))", "torchao", "int4wo"),
    ("int4-rtn-g32", "edgemm int4 RTN g32", "edgemm", [{"method": "rtn", "bits": 4, "group_size": G}]),
    ("int4-gptq-g32", "edgemm int4 GPTQ g32", "edgemm", [{"method": "gptq", "bits": 4, "group_size": G}]),
    ("int4-awq-g32", "edgemm int4 AWQ g32", "edgemm", [{"method": "awq", "bits": 4, "group_size": G}]),
    ("int4-rtn-g64", "edgemm int4 RTN g64", "edgemm", [{"method": "rtn", "bits": 4, "group_size": 64}]),
    ("int4-gptq-g64", "edgemm int4 GPTQ g64", "edgemm", [{"method": "gptq", "bits": 4, "group_size": 64}]),
    ("int4-awq-g64", "edgemm int4 AWQ g64", "edgemm", [{"method": "awq", "bits": 4, "group_size": 64}]),
    ("int4-rtn-g32-asym", "edgemm int4 RTN g32 asym", "edgemm", [{"method": "rtn", "bits": 4, "group_size": G, "symmetric": False}]),
    ("int4-gptq-g32-asym", "edgemm int4 GPTQ g32 asym", "edgemm", [{"method": "gptq", "bits": 4, "group_size": G, "symmetric": False}]),
    ("int4-awq-g32-asym", "edgemm int4 AWQ g32 asym", "edgemm", [{"method": "awq", "bits": 4, "group_size": G, "symmetric": False}]),
    ("s24-magnitude", "edgemm 2:4 magnitude", "edgemm", [{"method": "magnitude", "pattern": "2:4"}]),
    ("s24-wanda", "edgemm 2:4 Wanda", "edgemm", [{"method": "wanda", "pattern": "2:4"}]),
    ("s24-sparsegpt", "edgemm 2:4 SparseGPT", "edgemm", [{"method": "sparsegpt", "pattern": "2:4"}]),
    ("s24-maskllm", "edgemm 2:4 MaskLLM", "edgemm", [{"method": "maskllm", "pattern": "2:4"}]),
    ("s24-maskllm-recon", "edgemm 2:4 MaskLLM + OBS reconstruction of the kept weights", "edgemm",
     [{"method": "maskllm", "pattern": "2:4", "reconstruct": True}]),
    ("s24-maskllm+int4-gptq-g32", "edgemm 2:4 MaskLLM + int4 GPTQ g32", "edgemm",
     [{"method": "maskllm", "pattern": "2:4"}, {"method": "gptq", "bits": 4, "group_size": G}]),
    ("s24-sparsegpt+int4-gptq-g32", "edgemm 2:4 SparseGPT + int4 GPTQ g32", "edgemm",
     [{"method": "sparsegpt", "pattern": "2:4"}, {"method": "gptq", "bits": 4, "group_size": G}]),
]
EXCLUDE = ["*lm_head"]


def tensor_bytes(t) -> int:
    """Bytes of a tensor, or of the inner tensors of a tensor subclass (torchao's quantized weights)."""
    if hasattr(t, "__tensor_flatten__") and type(t).__name__ not in ("Tensor", "Parameter"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def model_bytes(model) -> int:
    from ..models.checkpoint import state_dict_for_saving

    try:
        return sum(tensor_bytes(t) for t in state_dict_for_saving(model).values())
    except Exception:  # torchao subclasses may refuse .contiguous()/data_ptr: count the state dict directly
        sd = model.state_dict()
        if model.config.text.tie_word_embeddings:
            sd.pop("text.lm_head.weight", None)
        return sum(tensor_bytes(t) for t in sd.values())


def apply_torchao(model, name: str) -> None:
    import torch
    from torch import nn
    from torchao.quantization import (Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig,
                                      quantize_)
    from torchao.quantization.granularity import PerGroup

    cfg = {"int8wo": lambda: Int8WeightOnlyConfig(),
           "int4wo": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(G)),
           "w8a8dyn": lambda: Int8DynamicActivationInt8WeightConfig()}[name]()
    quantize_(model, cfg, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and not fqn.endswith("lm_head"))


def cli_command(key: str, spec, model: str, calib_n: int, maskllm_calib_n: int) -> str:
    """The equivalent `edgemm quantize/sparsify` command line(s) of an edgemm entry."""
    if not isinstance(spec, list):
        return ""
    cmds, src = [], model
    for i, d in enumerate(spec):
        out = f"out/{key}" if i == len(spec) - 1 else f"out/{key}.stage{i}"
        m = d["method"]
        if m in ("magnitude", "wanda", "sparsegpt", "maskllm"):
            c = f"edgemm sparsify {src} -o {out} --method {m} --pattern {d['pattern']}"
            if m == "maskllm":
                c += f" --calib-n {maskllm_calib_n}"
                if d.get("reconstruct"):
                    c += "  # + reconstruct: true (recipe / Python option, no CLI flag)"
            elif m != "magnitude":
                c += f" --calib-n {calib_n}"
        elif m == "w8a8":
            c = f"edgemm quantize {src} -o {out} --method w8a8 --bits 8"
            if not d.get("shadow", True):
                c += " --no-shadow"
            if d.get("scale", "auto") != "auto":
                c += f" --act-scale {d['scale']}"
            c += f" --calib-n {calib_n}"
        else:
            c = f"edgemm quantize {src} -o {out} --method {m} --bits {d['bits']} --group-size {d['group_size']}"
            if not d.get("symmetric", True):
                c += " --asym"
            if m != "rtn":
                c += f" --calib-n {calib_n}"
        cmds.append(c)
        src = out
    return " && ".join(cmds)


def run_entry(key, label, kind, spec, args, fp32_acc):
    import torch

    from .. import runtimes
    from ..data import load_dataset
    from ..eval import evaluate
    from ..models import load_model
    from ..models.checkpoint import LoadedModel, load_checkpoint, save_checkpoint
    from . import apply, config_from_dict
    from .calibration import shapes_forward_loop

    base = load_model(args.model)
    model = copy.deepcopy(base.model)
    t0 = time.perf_counter()
    report = None
    if kind == "torchao":
        apply_torchao(model, spec)
        loaded = LoadedModel(model, base.processor, f"{args.model}+{key}")
    elif kind == "edgemm":
        reports = []
        for d in spec:
            cfg = config_from_dict({**d, "exclude": EXCLUDE})
            n = args.maskllm_calib_n if d["method"] == "maskllm" else args.calib_n
            loop = None if d["method"] in ("rtn", "magnitude") else shapes_forward_loop(base.processor, n, CALIBRATION_SEED, args.calib_batch_size)
            r = apply(model, cfg, forward_loop=loop, quiet=False)
            r.pop("layers", None)
            reports.append(r)
        report = reports
        loaded = LoadedModel(model, base.processor, key)
        if args.save_dir:
            path = Path(args.save_dir) / key
            save_checkpoint(model, base.processor, path, metadata={"compressed_by": "edgemm.compress.bench_torchao"})
            loaded = load_checkpoint(path, source=key)
    else:
        loaded = LoadedModel(model, base.processor, args.model)
    compress_s = time.perf_counter() - t0
    wbytes = model_bytes(loaded.model)
    ds = load_dataset(args.data)
    sess = runtimes.load(loaded)
    rep = evaluate(sess, ds, key, batch_size=args.batch_size, quiet=False)
    acc = rep["accuracy"]
    return {"key": key, "label": label, "kind": kind, "spec": spec, "accuracy": acc, "per_type": rep["per_type"],
            "n": rep["n"], "pct_of_fp32": round(100 * acc / fp32_acc, 2) if fp32_acc else None,
            "weight_bytes": wbytes, "compress_s": round(compress_s, 1), "eval_s": rep["wall_s"],
            "questions_per_s": rep["questions_per_s"], "threads": torch.get_num_threads(),
            "command": cli_command(key, spec, args.model, args.calib_n, args.maskllm_calib_n), "reports": report}


def markdown(results: dict, fp32_bytes: int | None) -> str:
    rows = ["| method | accuracy | % of fp32 | weight bytes | vs fp32 | compress s | eval s |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for key, label, _kind, _spec in ENTRIES:
        r = results.get(key)
        if not r:
            continue
        ratio = f"{r['weight_bytes'] / fp32_bytes:.3f}" if fp32_bytes else ""
        pct = "" if r["pct_of_fp32"] is None else f"{r['pct_of_fp32']:.2f}%"
        rows.append(f"| {label} | {100 * r['accuracy']:.2f}% | {pct} | {r['weight_bytes']:,} | {ratio} | "
                    f"{r['compress_s']:.0f} | {r['eval_s']:.0f} |")
    return "\n".join(rows) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgemm.compress.bench_torchao", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--data", default=HELDOUT)
    ap.add_argument("--only", default="", help="comma-separated entry keys, run in that order (default: all)")
    ap.add_argument("--results", default="runs/compress/bench.json")
    ap.add_argument("--save-dir", default="runs/compress/ckpt", help="where the edgemm checkpoints go ('' = do not save)")
    ap.add_argument("--markdown", default="", help="also write the table here")
    ap.add_argument("--calib-n", type=int, default=128)
    ap.add_argument("--maskllm-calib-n", type=int, default=512)
    ap.add_argument("--calib-batch-size", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--force", action="store_true", help="recompute entries already in --results")
    ap.add_argument("--list", action="store_true", help="list the entries and exit")
    args = ap.parse_args(argv)
    if args.list:
        for key, label, kind, spec in ENTRIES:
            print(f"{key:32s} {label}")
        return 0
    import torch

    from ..fileio import atomic_file, write_json

    torch.set_num_threads(args.threads)
    res_file = Path(args.results)
    results = json.loads(res_file.read_text()) if res_file.is_file() else {}
    meta = results.get("_meta", {})
    if meta and (meta.get("model"), meta.get("data")) != (args.model, args.data):
        raise SystemExit(f"{res_file} holds results for {meta.get('model')} on {meta.get('data')}; use another --results")
    results["_meta"] = {"model": args.model, "data": args.data, "calib_n": args.calib_n,
                        "maskllm_calib_n": args.maskllm_calib_n, "threads": args.threads, "machine": platform.machine(),
                        "cpus": os.cpu_count()}
    only = [k for k in args.only.split(",") if k]
    unknown = [k for k in only if k not in {e[0] for e in ENTRIES}]
    if unknown:
        raise SystemExit(f"unknown entries: {unknown}; see --list")
    by_key = {e[0]: e for e in ENTRIES}
    todo = [by_key["fp32"]] + ([by_key[k] for k in only if k != "fp32"] if only else [e for e in ENTRIES if e[0] != "fp32"])
    for key, label, kind, spec in todo:
        if key in results and not args.force:
            continue
        fp32 = results.get("fp32", {}).get("accuracy")
        print(f"=== {key}: {label}", flush=True)
        r = run_entry(key, label, kind, spec, args, fp32)
        results[key] = r
        if key == "fp32":
            r["pct_of_fp32"] = 100.0
            for k, v in results.items():
                if k != "_meta" and k != "fp32":
                    v["pct_of_fp32"] = round(100 * v["accuracy"] / r["accuracy"], 2) if r["accuracy"] else None
        write_json(res_file, results)
        print(f"=== {key}: accuracy {100 * r['accuracy']:.2f}% ({r['pct_of_fp32']}% of fp32), {r['weight_bytes']:,} bytes, "
              f"compress {r['compress_s']} s, eval {r['eval_s']} s", flush=True)
    table = markdown({k: v for k, v in results.items() if k != "_meta"}, results.get("fp32", {}).get("weight_bytes"))
    print(table)
    if args.markdown:
        with atomic_file(args.markdown, "w") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
