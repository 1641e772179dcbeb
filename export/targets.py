"""Deployment targets: each picks the formats and settings a class of device runs, and writes them into
one bundle (export/__init__.py calls `write_target` inside the bundle's atomic directory).

| target      | artifacts (runtime, lane / processor)                                                         |
| ----------- | --------------------------------------------------------------------------------------------- |
| laptop      | ONNX int8 (onnxruntime, CPU); GGUF Q8_0 + mmproj (llama.cpp, CPU); native model file (C++ engine) |
| android-cpu | ExecuTorch 8da4w .pte, XNNPACK (executorch, CPU); native model file (C++ engine, CPU)          |
| android-npu | static ONNX graph set (W8A8 QDQ prefill chunks on the NPU lane, shadow/attention/decode on CPU; onnxruntime, QNN EP on a device); native model file (W8A8 prefill = NPU lane, int4 decode = CPU lane) |
| ios         | Core ML packages, stateful KV cache, iOS 18 (Core ML, compute units ALL); native model file     |

The native model file (export/native.py, format "edgemm-native") is what the demo apps' C++ engine
loads; it is added to every target unless `native=False`.

Every artifact in the manifest carries its role, sha256, runtime, lane and processor (bundle.Artifact);
the manifest's `deployment` section adds, per runtime, which files it needs and where each part runs,
so an app can pick its entry without knowing edgemm's formats. Per-format settings can be overridden
with a dict per format: `onnx={...}`, `gguf={...}`, `executorch={...}`, `coreml={...}`, `npu={...}`,
`native={...}` (keyword arguments of that format's `write`); `max_context` and `chunk_size` apply to
every format that has them.
"""

from __future__ import annotations

from edgemm.errors import EdgemmError

# target -> (description, [(format, module attribute / writer, default options)])
PLANS: dict[str, dict] = {
    "laptop": {
        "description": "laptop CPU: ONNX int8 for onnxruntime (default), GGUF Q8_0 + mmproj for llama.cpp users, "
                       "and the native engine's model file",
        "parts": [("onnx", {"precision": "int8"}), ("gguf", {"precision": "q8_0"})],
    },
    "android-cpu": {
        "description": "Android CPU: one ExecuTorch program (XNNPACK; 8da4w: int4 group-wise decoder weights, "
                       "int8 vision, dynamic int8 activations) and the native engine's model file",
        "parts": [("executorch", {"precision": "8da4w"})],
    },
    "android-npu": {
        "description": "Android NPU: static ONNX graphs (W8A8 QDQ prefill chunks for the NPU execution provider, "
                       "float shadow-outlier and attention graphs and an int4 decoder on the CPU lane) and the native "
                       "engine's model file (W8A8 prefill on the NPU lane, int4 decode on the CPU lane)",
        "parts": [("npu", {})],
    },
    "ios": {
        "description": "iOS 18 / macOS 15: Core ML packages (stateful KV cache; int4 decoder weights, int8 vision, "
                       "float16 compute) and the native engine's model file",
        "parts": [("coreml", {"precision": "int4"})],
    },
}
NATIVE_DEFAULTS = {"android-npu": {"precision": "w8a8-int4"}, "laptop": {"precision": "w8a8-int4"},
                   "android-cpu": {"precision": "w8a8-int4"}, "ios": {"precision": "w8a8-int4"}}
FORMAT_KEYS = ("onnx", "gguf", "executorch", "coreml", "npu", "native")
# formats whose writer takes max_context / chunk_size as keyword arguments
_TAKES_MAX_CONTEXT = {"executorch", "coreml", "npu", "native"}
_TAKES_CHUNK = {"npu", "native"}

# Where each runtime's parts run, per target: what the manifest's `deployment.runs` says beside the files.
PLACEMENT = {
    "onnxruntime": "CPU execution provider (any CPU); `--runtime onnxruntime`",
    "llamacpp": "llama.cpp CPU backend (mtmd for the image); `--runtime llamacpp`",
    "executorch": "ExecuTorch runtime with the XNNPACK delegate on the CPU (Android: the LLaVA runner's "
                  "method names); `--runtime executorch`",
    "native": "edgemm's C++ engine (native/): W8A8 prefill chunks on the NPU lane (int8 CPU executor on a "
              "laptop/phone without an NPU backend), attention/norms/shadow outliers and int4 decode on the CPU lane; "
              "`--runtime native`",
    "coreml": "Core ML (MLModel with compute units ALL: Core ML places ops on the ANE, GPU or CPU); needs macOS/iOS",
}
NPU_PLACEMENT = ("prefill chunk graphs (W8A8 QDQ) and the QDQ vision encoder on the NPU lane (onnxruntime QNN EP / "
                 "HTP on a device; CPU EP here), embedding, attention, shadow-outlier, lm_head and the int4 decoder on the "
                 "CPU lane; `--runtime onnxruntime`")


def _writer(fmt: str):
    if fmt == "npu":
        from .npu import write_android_npu

        return write_android_npu
    from . import _format_module

    return _format_module(fmt).write


def write_target(target: str, bw, loaded, precision: str | None = None, max_context: int | None = None,
                 chunk_size: int | None = None, native: bool | dict = True, **options) -> list:
    """Write the artifacts of deployment target `target` into the BundleWriter `bw`; returns them.

    precision: not taken (each target fixes its formats' precisions; override one with e.g.
    `onnx={"precision": "int4"}`). max_context / chunk_size: KV-cache length and prefill chunk for every
    format that has them (defaults: the model's context; the android-npu default chunk). native: False to
    leave out the native engine's model file, or a dict of its options."""
    if target not in PLANS:
        raise EdgemmError(f"unknown deployment target {target!r}; choose one of {', '.join(PLANS)}")
    if precision is not None:
        fmts = ", ".join(f"{f}={{'precision': ...}}" for f, _ in PLANS[target]["parts"])
        raise EdgemmError(f"target {target} picks its own precisions (--precision applies to single formats: "
                          f"gguf, onnx, executorch, coreml, native); override per format in Python with {fmts}")
    unknown = set(options) - set(FORMAT_KEYS)
    if unknown:
        raise EdgemmError(f"unknown option(s) for target {target}: {', '.join(sorted(unknown))}; "
                          f"options: max_context, chunk_size, native, {', '.join(k for k in FORMAT_KEYS if k != 'native')}")
    for k in FORMAT_KEYS:
        if k in options and not isinstance(options[k], dict):
            raise EdgemmError(f"target option {k} must be a dict of {k} export options")
    if max_context is not None:
        bw.extra["max_context"] = int(max_context)
    if chunk_size is not None:
        bw.extra["chunk_size"] = int(chunk_size)

    plan = list(PLANS[target]["parts"])
    if native is not False:
        if not _native_available():
            bw.note("the native engine's model file was not written: this build has no edgemm.export.native")
        else:
            plan.append(("native", {**NATIVE_DEFAULTS[target], **(native if isinstance(native, dict) else {})}))
    arts = []
    for fmt, defaults in plan:
        opts = {**defaults, **options.get(fmt, {})}
        if fmt in _TAKES_MAX_CONTEXT and max_context is not None:
            opts.setdefault("max_context", int(max_context))
        if fmt in _TAKES_CHUNK and chunk_size is not None:
            opts.setdefault("chunk_size", int(chunk_size))
        if fmt == "native":  # the engine shares the bundle's chunk and context (android-npu sets them first)
            if "chunk_size" not in opts and bw.extra.get("chunk_size"):
                opts["chunk_size"] = bw.extra["chunk_size"]
            if "max_context" not in opts and bw.extra.get("max_context"):
                opts["max_context"] = bw.extra["max_context"]
        before = len(bw.artifacts)
        _writer(fmt)(bw, loaded, **opts)
        arts.extend(bw.artifacts[before:])
    bw.extra["deployment"] = deployment_section(target, bw.artifacts)
    return arts


def _native_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("edgemm.export.native") is not None


def deployment_section(target: str, artifacts) -> dict:
    """The manifest's `deployment`: per runtime, its files (role, precision, lane, processor) and where
    it runs; the first runtime is the default `edgemm run BUNDLE` uses."""
    runs: dict[str, dict] = {}
    for a in artifacts:
        if not a.runtime:
            continue
        r = runs.setdefault(a.runtime, {"runtime": a.runtime, "artifacts": [], "lanes": {}})
        r["artifacts"].append({"file": a.file, "role": a.role, "precision": a.precision, "lane": a.lane,
                               "processor": a.processor})
        r["lanes"].setdefault(a.lane, []).append(a.file)
    for r in runs.values():
        npu_set = r["runtime"] == "onnxruntime" and any(x["role"] == "prefill_layer" for x in r["artifacts"])
        r["placement"] = NPU_PLACEMENT if npu_set else PLACEMENT.get(r["runtime"], "")
        r["verified_here"] = ("converted on Linux; spec, states, ops and weights checked, numerics through edgemm's MIL "
                              "interpreter; Core ML itself not run (needs macOS/iOS)") if r["runtime"] == "coreml" else \
            "runs here in its runtime (tests, docs/export.md agreement table)"
    return {"target": target, "description": PLANS[target]["description"], "default_runtime": next(iter(runs), None),
            "runs": list(runs.values())}


__all__ = ["write_target", "PLANS", "deployment_section"]
