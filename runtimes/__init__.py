"""edgemm runtime adapters (the top-level runtimes/ folder, installed as edgemm.runtimes).

`load(model_or_bundle, runtime=None)` returns a Session with `generate(image, prompt)`, a streaming
form and timing stats. A model name/checkpoint runs in torch; a bundle (a directory with
manifest.json, written by `edgemm export`) runs in the runtime its artifacts name, or the one asked for.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from edgemm.errors import EdgemmError

from .base import GenerateOptions, Session

ADAPTERS = {
    "torch": "edgemm.runtimes.torch_runtime",
    "onnxruntime": "edgemm.runtimes.onnxruntime_runtime",
    "executorch": "edgemm.runtimes.executorch_runtime",
    "llamacpp": "edgemm.runtimes.llamacpp_runtime",
    "native": "edgemm.runtimes.native_runtime",
}
RUNTIMES = tuple(ADAPTERS)


def is_bundle(spec) -> bool:
    return isinstance(spec, (str, Path)) and (Path(spec) / "manifest.json").is_file()


def load(spec, runtime: str | None = None, threads: int | None = None, **options) -> Session:
    """Open a model or a bundle in a runtime (default: torch for models, the bundle's own for bundles)."""
    if runtime is not None and runtime not in ADAPTERS:
        raise EdgemmError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if is_bundle(spec):
        from edgemm.export.bundle import read_manifest

        manifest = read_manifest(spec)
        available = [a.get("runtime") for a in manifest["artifacts"] if a.get("runtime")]
        if runtime is None:
            if not available:
                raise EdgemmError(f"bundle {spec} names no runtime; pass --runtime")
            runtime = available[0]
        elif runtime not in available:
            raise EdgemmError(f"bundle {spec} has no artifact for runtime {runtime!r} (it has: {', '.join(sorted(set(available)))})")
        return _adapter(runtime).open_bundle(Path(spec), manifest, threads=threads, **options)
    runtime = runtime or "torch"
    if runtime != "torch":
        raise EdgemmError(f"runtime {runtime!r} runs exported bundles; export the model first (edgemm export)")
    from edgemm.models import load_model

    from .torch_runtime import TorchSession

    loaded = spec if hasattr(spec, "processor") else load_model(str(spec))
    return TorchSession(loaded, threads=threads)


def _adapter(runtime: str):
    try:
        return importlib.import_module(ADAPTERS[runtime])
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("edgemm.runtimes"):
            raise EdgemmError(f"the {runtime} runtime adapter is not available in this build") from None
        raise EdgemmError(f"the {runtime} runtime needs {e.name}: pip install 'edgemm[runtimes]'") from None


__all__ = ["load", "Session", "GenerateOptions", "RUNTIMES", "is_bundle"]
