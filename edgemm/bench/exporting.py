"""The export half of a bench job: the preset's random model through edgemm.export into a cache entry.

Kept apart from the runners (worker.py) because its source is part of the export cache key: editing a
runner does not invalidate the cached exports, editing this file does.
"""

from __future__ import annotations

import time
from pathlib import Path

from .worker import peak_rss_mb

# export options per runtime besides the precision: the native exporter calibrates its W8A8 activation
# scales on shapes questions; with random weights the scales' quality does not matter for speed, so a
# small calibration set keeps the export short. The native bundle also runs the vision encoder W8A8 (on
# the "NPU lane", as mllm-NPU-style deployments do): the peers' int8 exports quantize theirs too
# (onnxruntime quantize_dynamic, ExecuTorch 8da8w); llama.cpp's mmproj stays F16.
EXPORT_OPTIONS = {"native": {"calib_n": 8, "vision": "w8a8"}}
SPARSE_SUFFIX = "-sp24"  # native w8a8-int4-sp24: the model is 2:4-pruned before the w8a8-int4 export


def export_job(job: dict) -> dict:
    """Export the preset's random model for a runtime/precision into job["out"] (a cache entry dir)."""
    import torch

    from edgemm.export import export

    from .presets import build_model, preset_config

    torch.set_num_threads(job["threads"])
    out = Path(job["out"])
    cfg = preset_config(job["preset"], text_layers=job.get("text_layers"))
    t0 = time.perf_counter()
    # the GGUF writer reads every weight as float32 one tensor at a time: building the model in bf16 halves
    # the export's peak memory (the 1.8B preset: ~4 GB instead of ~8.5 GB) and changes nothing in the file
    # but the random values' low bits
    dtype = torch.bfloat16 if job.get("model_dtype") == "bf16" else None
    loaded = build_model(cfg, seed=job.get("seed", 0), dtype=dtype)
    build_s = time.perf_counter() - t0
    rt, prec = job["runtime"], job["precision"]
    fmt = {"onnxruntime": "onnx", "executorch": "executorch", "llamacpp": "gguf", "native": "native"}[rt]
    res = {}
    if rt == "native" and prec.endswith(SPARSE_SUFFIX):
        # 2:4 (magnitude) on every LLM linear (the LM head stays dense, as every 2:4 method leaves it): the
        # engine's decode set then runs the sparse int4 GEMV, the W8A8 prefill set keeps the zeros densely
        from edgemm.compress import apply
        from edgemm.compress.config import MagnitudeConfig

        t2 = time.perf_counter()
        apply(loaded.model, MagnitudeConfig(pattern="2:4", include=["text.layers.*"]))
        res["sparsify_s"] = round(time.perf_counter() - t2, 2)
        prec = prec[: -len(SPARSE_SUFFIX)]
    opts = {"precision": prec, **EXPORT_OPTIONS.get(rt, {})}
    t1 = time.perf_counter()
    export(loaded, fmt, out / "bundle", **opts)
    export_s = time.perf_counter() - t1
    res.update(build_s=round(build_s, 2), export_s=round(export_s, 2), export_options=opts)
    vt = job.get("token_compression")
    if vt and rt in ("onnxruntime", "executorch"):
        t2 = time.perf_counter()
        res.update(export_pruned_vision(loaded, rt, prec, vt, out))
        res["pruned_export_s"] = round(time.perf_counter() - t2, 2)
    elif vt and rt == "native":  # the engine applies the manifest's token compression: a second bundle with it set
        from edgemm.tokens import set_visual_tokens, visual_token_count

        t2 = time.perf_counter()
        set_visual_tokens(loaded.model, vt)
        try:
            k = visual_token_count(loaded.config)
            export(loaded, fmt, out / "pruned_bundle", **opts)
        finally:
            set_visual_tokens(loaded.model, None)
        res.update(pruned_artifact="pruned_bundle", pruned_tokens=k)
        res["pruned_export_s"] = round(time.perf_counter() - t2, 2)
    if rt == "native":
        res["decode_weight_bytes"] = native_decode_bytes(out / "bundle")
    res["export_peak_rss_mb"] = peak_rss_mb()
    return res


def native_decode_bytes(bundle: Path) -> int:
    """Bytes of the weights one decode step reads from a native model file: per text linear layer its
    decode set (`decode.` prefix) when it has one, else its main tensors; plus the lm_head."""
    from gguf import GGUFReader

    from edgemm.export.native import DECODE_PREFIX, model_path

    r = GGUFReader(str(model_path(bundle)))
    sizes = {t.name: int(t.n_bytes) for t in r.tensors}
    total = 0
    mods = {n.rsplit(".", 1)[0] for n in sizes if n.startswith("text.layers.") and (".self_attn." in n or ".mlp." in n)}
    # the head a decode step reads: the decode set's (tied models too: it quantizes its own copy), else
    # the main lm_head, else (tied, no decode head) the embedding table
    head = any(n.startswith(("text.lm_head.", DECODE_PREFIX + "text.lm_head.")) for n in sizes)
    mods.add("text.lm_head" if head else "text.embed_tokens")
    for m in mods:
        dec = {n: b for n, b in sizes.items() if n.startswith(DECODE_PREFIX + m + ".")}
        main = {n: b for n, b in sizes.items() if n.startswith(m + ".")}
        if dec:
            total += sum(dec.values()) + sum(b for n, b in main.items() if n.endswith(".bias"))
        else:
            total += sum(b for n, b in main.items() if not n.endswith((".input_scale", ".outlier_channels")))
    return total


def export_pruned_vision(loaded, runtime: str, precision: str, vt: str, out: Path) -> dict:
    """The vision encoder alone with the token compression inside (the decoder is the bundle's)."""
    from edgemm.fileio import atomic_file
    from edgemm.tokens import set_visual_tokens, visual_token_count

    set_visual_tokens(loaded.model, vt)
    k = visual_token_count(loaded.config)
    try:
        if runtime == "onnxruntime":
            import tempfile

            from edgemm.export.onnx import export_vision, quantize_int8

            with tempfile.TemporaryDirectory(prefix="edgemm-bench-") as td:
                fp = Path(td) / "vision_encoder.onnx"
                export_vision(loaded.model, fp)
                dst = out / "pruned_vision.onnx"
                if precision == "fp32":
                    with atomic_file(dst) as f:
                        f.write(fp.read_bytes())
                else:  # the int8 and int4 sets run an int8 vision encoder (export/onnx.py)
                    tmp = Path(td) / "q.onnx"
                    quantize_int8(fp, tmp)
                    with atomic_file(dst) as f:
                        f.write(tmp.read_bytes())
        else:
            from edgemm.export.executorch import lower, prepare

            mods = prepare(loaded.model, precision, max_context=16)
            prog, _ = lower(mods, loaded.config, methods=("vision_encoder",))
            dst = out / "pruned_vision.pte"
            with atomic_file(dst) as f:
                prog.write_to_file(f)
    finally:
        set_visual_tokens(loaded.model, None)
    return {"pruned_artifact": dst.name, "pruned_tokens": k}
