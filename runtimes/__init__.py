"""edgemm runtime adapters (the top-level runtimes/ folder, installed as edgemm.runtimes).

`load(model_or_bundle, runtime="torch")` returns a Session with `generate(image, prompt)`.
"""

from __future__ import annotations

from edgemm.errors import EdgemmError

from .base import GenerateOptions, Session

RUNTIMES = ("torch",)


def load(spec, runtime: str = "torch", threads: int | None = None) -> Session:
    """Open a model ('demo', a checkpoint or HF LLaVA directory) in a runtime."""
    if runtime not in RUNTIMES:
        raise EdgemmError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    from edgemm.models import load_model

    from .torch_runtime import TorchSession

    loaded = spec if hasattr(spec, "processor") else load_model(str(spec))
    return TorchSession(loaded, threads=threads)


__all__ = ["load", "Session", "GenerateOptions", "RUNTIMES"]
