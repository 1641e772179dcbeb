"""`edgemm bench`: export a preset (random weights, real shapes) for each runtime, then time it.

Every export and every measurement runs in its own subprocess (edgemm.bench.worker): peak RSS is that
job's alone and thread pools start clean. Exports are cached under
$EDGEMM_CACHE/bench/<preset>/<runtime>-<precision>[-L<layers>] (default ~/.cache/edgemm) and reused while
their key matches: the preset's config, the precision, the seed, edgemm's version and the sources of the
exporter, the model and the preset builder (a changed exporter rebuilds the entry).

Layer-scaled measurements: where a runtime's whole-model export is not feasible on this machine (see
SCALED), the model is exported and measured with L1 and L2 text layers, and every time is extrapolated
linearly to the real depth (t(L) = a + b L: the intercept holds the vision tower, embeddings and
lm_head, the slope one decoder layer); such results carry `scaled_from_layers` and a reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from edgemm import __version__
from edgemm.errors import EdgemmError

from .metrics import ttft_work_ratio
from .presets import APPROXIMATIONS, PRESETS, describe, preset_config

RUNTIMES = ("torch", "onnxruntime", "executorch", "llamacpp", "native")
PRECISIONS = {
    "torch": ("fp32", "bf16"),
    "onnxruntime": ("fp32", "int8", "int4"),
    "executorch": ("8da8w", "8da4w", "fp32"),
    "llamacpp": ("q8_0", "q4_0", "f16"),
    "native": ("w8a8-int4", "int8", "fp32", "w8a8-int4-sp24"),
}
DEFAULT_PRECISIONS = {"torch": ("fp32", "bf16"), "onnxruntime": ("fp32", "int8", "int4"), "executorch": ("8da8w", "8da4w"),
                      "llamacpp": ("q8_0", "q4_0"), "native": ("w8a8-int4", "int8")}
# the dtype of the random model an export starts from (gguf quantizes from bf16 values: half the peak memory)
MODEL_DTYPE = {"llamacpp": "bf16"}
FORMAT_OF = {"onnxruntime": "onnx", "executorch": "executorch", "llamacpp": "gguf", "native": "native"}

_ONNX_WHY = ("edgemm's ONNX exporter writes single-file graphs: the fp32 decoder would be ~7.3 GB, past protobuf's 2 GB "
             "limit (int8/int4 are quantized from that file)")
_ET_WHY = ("the ExecuTorch export deep-copies the fp32 model (2 x 8.5 GB) before torchao quantization and XNNPACK "
           "lowering: past this machine's ~16 GB budget shared with other jobs")
SCALED = {("llava-qwen1.8b", "onnxruntime"): ((1, 4), _ONNX_WHY),
          ("llava-qwen1.8b", "executorch"): ((1, 4), _ET_WHY)}


def cache_root(cache_dir: str | Path | None = None) -> Path:
    if cache_dir:
        return Path(cache_dir)
    return Path(os.environ.get("EDGEMM_CACHE") or Path.home() / ".cache" / "edgemm") / "bench"


def _source_hash(runtime: str) -> str:
    """Hash of the code an export depends on: the exporter, the bundle writer, the model, the presets."""
    import edgemm.bench.presets as presets
    import edgemm.models.modeling as modeling

    files = [Path(modeling.__file__), Path(presets.__file__), Path(__file__).with_name("exporting.py")]
    import edgemm.export as ex

    exdir = Path(ex.__file__).parent
    files += [exdir / "bundle.py", exdir / f"{FORMAT_OF[runtime]}.py"]
    tokdir = Path(modeling.__file__).parent.parent / "tokens"
    files += sorted(tokdir.glob("*.py"))
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes() if f.exists() else b"(missing)")
    return h.hexdigest()


def native_status() -> str | None:
    """None when the native runtime can be benchmarked, else why not."""
    from edgemm.export import FORMATS
    from edgemm.runtimes import ADAPTERS

    if "native" not in FORMATS:
        return "edgemm.export has no native exporter yet (export/native.py is not registered in edgemm.export.FORMATS)"
    import importlib.util

    if importlib.util.find_spec(ADAPTERS["native"]) is None:
        return "the native runtime adapter (edgemm.runtimes.native_runtime) does not exist yet"
    try:
        from edgemm import _native

        _native.library()
    except ImportError as e:
        return f"the native binding cannot be imported ({e})"
    except EdgemmError as e:
        return str(e)
    return None


class Bench:
    def __init__(self, preset: str, threads: int = 2, prompt_tokens=(512, 1024), decode_tokens: int = 32,
                 decode_context: int = 64, repeats: int = 3, token_compression: str | None = "fastervlm:0.25",
                 cache_dir=None, seed: int = 0, ttft: bool = True, text_layers: int | None = None, log=None,
                 timeout: float | None = None):
        if preset not in PRESETS:
            raise EdgemmError(f"unknown bench preset {preset!r}; choose one of {', '.join(PRESETS)}")
        if threads < 1:
            raise EdgemmError("--threads must be >= 1")
        if repeats < 1:
            raise EdgemmError("--repeats must be >= 1")
        if decode_tokens < 1 or decode_context < 1:
            raise EdgemmError("--decode-tokens and --decode-context must be >= 1")
        self.prompt_tokens = [int(n) for n in prompt_tokens]
        self.cfg = preset_config(preset)
        ctx = self.cfg.text.max_position_embeddings
        for n in self.prompt_tokens:
            if n < 1 or n + 8 > ctx:
                raise EdgemmError(f"prompt tokens must be in 1..{ctx - 8} (the preset's context is {ctx}), got {n}")
        if decode_context + decode_tokens > ctx:
            raise EdgemmError(f"--decode-context + --decode-tokens must fit the context of {ctx}")
        if token_compression:
            from edgemm.tokens import parse

            parse(token_compression).validate_for(self.cfg)
        self.preset, self.threads, self.repeats, self.seed = preset, threads, repeats, seed
        self.decode_tokens, self.decode_context = decode_tokens, decode_context
        self.token_compression = token_compression or None
        self.cache = cache_root(cache_dir) / preset
        self.ttft = ttft
        self.text_layers = text_layers
        self.log = log or (lambda msg: None)
        self.timeout = timeout

    # ------------------------------------------------------------------------------- subprocesses
    def _job(self, job: dict) -> dict:
        # Every runtime keeps its own thread-wait policy (OMP_WAIT_POLICY was forced to PASSIVE until
        # 2026-11-23: llama.cpp Q4_0 decode on the 1.8B preset measured 8.3 tok/s with it, 9.6 without).
        from .worker import MARKER

        env = dict(os.environ)
        n = str(self.threads)
        env.update(OMP_NUM_THREADS=n, MKL_NUM_THREADS=n,
                   TOKENIZERS_PARALLELISM="false")
        cmd = [sys.executable, "-m", "edgemm.bench.worker", json.dumps(job)]
        try:
            p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {self.timeout:.0f} s"}
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith(MARKER)]
        if not lines:
            tail = [ln for ln in p.stderr.strip().splitlines() if ln.strip()][-1:] or [f"exit status {p.returncode}"]
            return {"error": f"the benchmark worker died ({p.returncode}): {tail[0][:300]}"}
        return json.loads(lines[-1][len(MARKER):])

    # ------------------------------------------------------------------------------------ exports
    def _early_block(self, cfg) -> int | None:
        """The ViT block after which the token compression selects (fastervlm early=true), else None."""
        if not self.token_compression:
            return None
        from edgemm.tokens import early_block, parse

        return early_block(cfg, parse(self.token_compression))

    def _entry(self, runtime: str, precision: str, layers: int | None) -> tuple[Path, dict]:
        cfg = preset_config(self.preset, text_layers=layers)
        key = {"config": cfg.to_dict(), "runtime": runtime, "precision": precision, "seed": self.seed,
               "token_compression": self.token_compression if runtime in ("onnxruntime", "executorch", "native") else None,
               "edgemm": __version__, "sources": _source_hash(runtime), "model_dtype": MODEL_DTYPE.get(runtime, "fp32")}
        key = json.loads(json.dumps(key))  # as stored (tuples become lists)
        name = f"{runtime}-{precision}" + (f"-L{layers}" if layers is not None else "")
        return self.cache / name, key

    def ensure_export(self, runtime: str, precision: str, layers: int | None) -> dict:
        """The cache entry for (runtime, precision, layers): reused when its key matches, else rebuilt."""
        d, key = self._entry(runtime, precision, layers)
        meta_f = d / "bench-export.json"
        if meta_f.is_file():
            try:
                meta = json.loads(meta_f.read_text())
            except json.JSONDecodeError:
                meta = {}
            if meta.get("key") == key and (d / "bundle" / "manifest.json").is_file():
                meta["cached"] = True
                meta["dir"] = str(d)
                return meta
        self.log(f"exporting {self.preset} for {runtime} {precision}" + (f" ({layers} text layers)" if layers else "") + " ...")
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        job = {"mode": "export", "preset": self.preset, "runtime": runtime, "precision": precision, "text_layers": layers,
               "model_dtype": MODEL_DTYPE.get(runtime, "fp32"),
               "seed": self.seed, "threads": self.threads, "out": str(d),
               "token_compression": self.token_compression if self.ttft else None}
        res = self._job(job)
        if "error" in res:
            shutil.rmtree(d, ignore_errors=True)
            return res
        from edgemm.fileio import write_json

        meta = {"key": key, **res}
        write_json(meta_f, meta)
        meta["cached"] = False
        meta["dir"] = str(d)
        return meta

    # ---------------------------------------------------------------------------------- measuring
    def _run(self, runtime: str, precision: str, layers: int | None, export: dict | None) -> dict:
        job = {"mode": "run", "preset": self.preset, "runtime": runtime, "precision": precision, "text_layers": layers,
               "seed": self.seed, "threads": self.threads, "prompt_tokens": self.prompt_tokens,
               "decode_tokens": self.decode_tokens, "decode_context": self.decode_context, "repeats": self.repeats,
               "token_compression": self.token_compression, "ttft": self.ttft}
        if export is not None:
            job["bundle"] = str(Path(export["dir"]) / "bundle")
            if export.get("pruned_artifact"):
                job["pruned_artifact"] = str(Path(export["dir"]) / export["pruned_artifact"])
                job["pruned_tokens"] = export["pruned_tokens"]
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        res = self._job(job)
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        res["loadavg_1m"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
        return res

    def one(self, runtime: str, precision: str) -> dict:
        """Measure one runtime/precision; a dict with the metrics or status unavailable/error + reason."""
        from .metrics import fractions

        base = {"runtime": runtime, "precision": precision}
        if runtime not in RUNTIMES:
            raise EdgemmError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
        if precision not in PRECISIONS[runtime]:
            raise EdgemmError(f"runtime {runtime} has no precision {precision!r}; choose one of {', '.join(PRECISIONS[runtime])}")
        if runtime == "native":
            why = native_status()
            if why:
                return {**base, "status": "unavailable", "reason": why}
        scaled = SCALED.get((self.preset, runtime))
        if self.text_layers is not None:
            layer_sets, why = [self.text_layers], f"reduced model: {self.text_layers} text layers (--text-layers), not scaled"
        elif scaled:
            layer_sets, why = list(scaled[0]), scaled[1]
        else:
            layer_sets, why = [None], None
        runs, exports, wbytes = [], [], []
        for layers in layer_sets:
            exp = None
            if runtime != "torch":
                exp = self.ensure_export(runtime, precision, layers)
                if "error" in exp:
                    return {**base, "status": "error", "reason": f"export failed: {exp['error']}", "text_layers": layers}
                exports.append({k: exp.get(k) for k in ("export_s", "build_s", "pruned_export_s", "export_peak_rss_mb", "cached",
                                                        "export_options") if k in exp})
            self.log(f"measuring {runtime} {precision}" + (f" ({layers} text layers)" if layers else "") + " ...")
            r = self._run(runtime, precision, layers, exp)
            if "error" in r:
                return {**base, "status": "error", "reason": r["error"], "text_layers": layers}
            # the bytes a decode step reads: the engine's own count of its packed weights where the runner
            # reports one (2:4 layers at their packed size), else the export's file tensors
            b = r.get("decode_weight_bytes") or (exp or {}).get("decode_weight_bytes")
            if b:
                wbytes.append(b)
            runs.append(r)
        out = {**base, "status": "ok"}
        if exports:
            out["export"] = exports if len(exports) > 1 else exports[0]
        if len(runs) == 1:
            out.update(runs[0])
            if self.text_layers is not None:
                out["text_layers"] = self.text_layers
                out["note"] = why
        else:
            try:
                out.update(extrapolate(runs, layer_sets, self.cfg.text.num_layers))
            except EdgemmError as e:  # one runtime's noisy scaling must not end the whole sweep
                return {**base, "status": "error", "reason": str(e), "scaled_from_layers": layer_sets,
                        "runs_by_layers": {str(n): r for n, r in zip(layer_sets, runs)}}
            out["scaled_from_layers"] = layer_sets
            out["note"] = f"layer-scaled from {layer_sets[0]} and {layer_sets[1]} text layers: {why}"
            out["runs_by_layers"] = {str(n): r for n, r in zip(layer_sets, runs)}
        cfg = preset_config(self.preset, text_layers=self.text_layers)
        wb = None
        if len(wbytes) == len(layer_sets):
            wb = wbytes[0] if len(wbytes) == 1 else _lin(wbytes[0], wbytes[1], layer_sets[0], layer_sets[1], self.cfg.text.num_layers)
        out.update(fractions(out, cfg, self.threads, runtime, precision, weight_bytes=wb))
        tt = out.get("ttft") or {}
        if all((tt.get(k) or {}).get("prompt_tokens") for k in ("full", "pruned")):  # runners that report them
            full, pruned = tt["full"], tt["pruned"]
            out["ttft_work_ratio"] = round(ttft_work_ratio(cfg, full["prompt_tokens"] - full["visual_tokens"],
                                                           full["visual_tokens"], pruned["visual_tokens"],
                                                           self._early_block(cfg)), 3)
        return out


def _lin(y1: float, y2: float, l1: int, l2: int, target: int, strict: bool = True) -> float:
    """Linear in the layer count. A deeper model cannot be cheaper: a non-positive slope means the two
    runs are noise (e.g. a starved process), and is refused rather than extrapolated."""
    if strict and y2 <= y1:
        raise EdgemmError(f"cannot scale to {target} layers: the {l2}-layer run ({y2:.4g}) is not slower than the "
                          f"{l1}-layer run ({y1:.4g}); the timings are noise (machine busy?) - rerun on a quieter machine")
    return y1 + (y2 - y1) * (target - l1) / (l2 - l1)


def extrapolate(runs: list[dict], layers: list[int], target: int) -> dict:
    """Times at `target` layers from runs at two depths (linear in the layer count)."""
    (a, b), (l1, l2) = runs, layers
    out: dict = {"prefill_tok_s": {}, "repeats": a["repeats"]}
    for n in a["prefill_tok_s"]:
        t = _lin(a["prefill_s"][n]["median_s"], b["prefill_s"][n]["median_s"], l1, l2, target)
        out["prefill_tok_s"][n] = round(int(n) / t, 2)
    td = _lin(1 / a["decode_tok_s"], 1 / b["decode_tok_s"], l1, l2, target)
    out["decode_tok_s"] = round(1 / td, 2)
    out["decode_context_avg"] = a["decode_context_avg"]
    if "ttft_ms" in a:
        out["ttft_ms"] = {}
        for k in a["ttft_ms"]:
            try:
                out["ttft_ms"][k] = round(_lin(a["ttft_ms"][k], b["ttft_ms"][k], l1, l2, target), 2)
            except EdgemmError as e:  # one noisy TTFT (the pruned one's text part is small) drops that figure only
                out.setdefault("unscaled", {})[f"ttft_ms.{k}"] = str(e)
        # the vision side does not depend on the text depth: the mean of the two runs
        out["image_encode_ms"] = round((a["image_encode_ms"] + b["image_encode_ms"]) / 2, 2)
        out["ttft"] = {k: {"visual_tokens": a["ttft"][k]["visual_tokens"]} for k in a["ttft"]}
    out["peak_rss_mb"] = round(_lin(a["peak_rss_mb"], b["peak_rss_mb"], l1, l2, target, strict=False), 1)
    if a.get("cpu_utilization") is not None and b.get("cpu_utilization") is not None:
        out["cpu_utilization"] = [a["cpu_utilization"], b["cpu_utilization"]]
    out["peak_rss_estimated"] = True
    out["load_s"] = None
    out["loadavg_1m"] = a["loadavg_1m"] + b["loadavg_1m"]
    return out


def run_bench(preset: str, runtimes: list[str], precisions: list[str] | None = None, log=None, on_result=None, **kw) -> dict:
    """Measure every (runtime, precision) pair; precisions None = each runtime's defaults, else the ones
    each runtime has among `precisions` (a precision no asked runtime has is an error)."""
    for r in runtimes:
        if r not in RUNTIMES:
            raise EdgemmError(f"unknown runtime {r!r}; choose one of {', '.join(RUNTIMES)}")
    pinned = {}  # "runtime:precision" entries pin a runtime's precisions
    for p in precisions or []:
        if ":" in p:
            r, q = p.split(":", 1)
            if r not in runtimes:
                raise EdgemmError(f"--precision {p!r} names runtime {r!r}, which --runtime does not include")
            if q not in PRECISIONS[r]:
                raise EdgemmError(f"runtime {r} has no precision {q!r}; choose one of {', '.join(PRECISIONS[r])}")
            pinned.setdefault(r, []).append(q)
    plain = [p for p in precisions or [] if ":" not in p]
    if plain:
        known = {p for r in runtimes for p in PRECISIONS[r]}
        bad = [p for p in plain if p not in known]
        if bad:
            raise EdgemmError(f"precision {bad[0]!r} is not one of {', '.join(sorted(known))} (for {', '.join(runtimes)})")
    b = Bench(preset, log=log, **kw)
    pairs = []
    for r in runtimes:
        if r in pinned:
            ps = pinned[r]
        elif precisions:
            ps = [p for p in PRECISIONS[r] if p in plain]
        else:
            ps = list(DEFAULT_PRECISIONS[r])
        pairs += [(r, p) for p in ps]
    if not pairs:
        raise EdgemmError("no runtime has any of the precisions asked for")
    t0 = time.time()
    results: list[dict] = []
    for r, p in pairs:
        results.append(b.one(r, p))
        ttft_speedups(results)
        if on_result is not None:  # e.g. write the partial report: a long sweep keeps what it measured
            on_result(_report(b, preset, t0, results))
    return _report(b, preset, t0, results)


def _report(b: "Bench", preset: str, t0: float, results: list[dict]) -> dict:
    return {
        "preset": preset,
        "shapes": describe(b.cfg),
        "approximation": APPROXIMATIONS[preset],
        "threads": b.threads,
        "settings": {"prompt_tokens": b.prompt_tokens, "decode_tokens": b.decode_tokens, "decode_context": b.decode_context,
                     "repeats": b.repeats, "token_compression": b.token_compression, "seed": b.seed,
                     "text_layers": b.text_layers, "statistic": "median of repeats after a warm-up"},
        "machine": machine_info(),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
        "wall_s": round(time.time() - t0, 1),
        "results": list(results),
    }


def ttft_speedups(results: list[dict]) -> None:
    for r in results:
        t = r.get("ttft_ms") or {}
        if t.get("full") and t.get("pruned"):
            r["ttft_pruned_speedup"] = round(t["full"] / t["pruned"], 2)


def machine_info() -> dict:
    from .metrics import READ_BANDWIDTH_GBS, cpu_flags, cpu_vendor, int8_gmacs_per_core, vnni_gmacs_per_core

    info = {"cpus": os.cpu_count(), "loadavg": [round(x, 2) for x in os.getloadavg()]}
    try:
        with open("/proc/cpuinfo") as f:
            info.update(cpu=next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None))
    except OSError:
        pass
    fl = cpu_flags()
    if fl:
        info["isa"] = [x for x in ("avx2", "avx512f", "avx512_vnni", "amx_int8", "amx_bf16") if x in fl]
    info["int8_peak_gmacs_per_core"] = int8_gmacs_per_core(fl)
    info["vnni_peak_gmacs_per_core"] = vnni_gmacs_per_core()
    info["cpu_vendor"] = cpu_vendor()
    info["read_bandwidth_gbs"] = READ_BANDWIDTH_GBS
    return info
