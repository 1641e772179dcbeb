"""edgemm exporters (the top-level export/ folder, installed as edgemm.export).

`export(model, target, out)` writes a bundle (see bundle.py). A target is either one format
(gguf, onnx, executorch, coreml) or a deployment target (laptop, android-cpu, android-npu, ios) that
picks formats and settings. Each format module exposes `write(bw, loaded, **options)`, which adds its
artifacts to the BundleWriter `bw`.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from edgemm.errors import EdgemmError

FORMATS = {
    "gguf": "edgemm.export.gguf",
    "onnx": "edgemm.export.onnx",
    "executorch": "edgemm.export.executorch",
    "coreml": "edgemm.export.coreml",
    "native": "edgemm.export.native",
}
DEPLOY_TARGETS = ("laptop", "android-cpu", "android-npu", "ios")
TARGETS = tuple(FORMATS) + DEPLOY_TARGETS


def export(model, target: str, out: str | Path, **options) -> dict:
    """Export `model` (a name, a path, or a LoadedModel) for `target` into the bundle directory `out`.

    Returns the manifest. The bundle appears at `out` only when complete."""
    from edgemm.models import load_model

    from .bundle import bundle_dir

    if target not in TARGETS:
        raise EdgemmError(f"unknown export target {target!r}; choose one of {', '.join(TARGETS)}")
    loaded = model if hasattr(model, "processor") else load_model(str(model))
    with bundle_dir(out, loaded, target) as bw:
        if target in FORMATS:
            _format_module(target).write(bw, loaded, **options)
        else:
            from .targets import write_target

            write_target(target, bw, loaded, **options)
    from .bundle import read_manifest

    return read_manifest(out, verify=False)


def _format_module(name: str):
    try:
        return importlib.import_module(FORMATS[name])
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("edgemm.export"):
            raise EdgemmError(f"the {name} exporter is not available in this build") from None
        raise EdgemmError(f"the {name} exporter needs {e.name}: pip install 'edgemm[export]'") from None


__all__ = ["export", "FORMATS", "TARGETS", "DEPLOY_TARGETS"]
