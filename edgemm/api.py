"""The Python API in one call: `edgemm.load(model_or_bundle)` -> a Session that answers questions.

    import edgemm

    sess = edgemm.load("demo")                      # a built-in model, a checkpoint dir, or a bundle dir
    print(sess.generate("photo.png", "what color is the circle?"))
    for piece in sess.generate("photo.png", "what shape is the red object?", stream=True):
        print(piece, end="", flush=True)            # text pieces as tokens arrive
    print(sess.stats)                               # ttft_ms, prefill_tok_s, decode_tok_s, ... of the last call

`load` wraps `edgemm.runtimes.load` (one adapter per runtime behind runtimes/base.py's Session) and adds
the visual-token option of the CLI. Nothing heavy is imported until it is called.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import EdgemmError


def load(model_or_bundle: Any, runtime: str | None = None, threads: int | None = None,
         visual_tokens: str | dict | None = None, **options):
    """Open a model or an exported bundle for question answering.

    model_or_bundle: "demo", "demo-small", an edgemm checkpoint directory, a Hugging Face LLaVA directory,
        a LoadedModel (from edgemm.models.load_model), or a bundle directory written by `edgemm export`.
    runtime: None (torch for a model, the bundle's own runtime for a bundle) or one of
        edgemm.runtimes.RUNTIMES ("torch", "onnxruntime", "executorch", "llamacpp", "native").
    threads: CPU threads the runtime may use (None: the runtime's default).
    visual_tokens: visual-token compression applied on top of a model, e.g. "fastervlm:0.25" (models in
        torch only; a bundle's setting is fixed at export time). A LoadedModel passed in gets the setting
        in its own config.
    options: passed to the runtime adapter's open_bundle (adapter-specific).

    Returns a Session: `generate(image, prompt, stream=False, max_new_tokens=32, temperature=0.0,
    top_k=0, top_p=1.0, seed=None)` -> the answer (str), or with stream=True an iterator of text pieces;
    `image` is a path, a PIL image, an HxWx3 uint8 array, or None (text only). `stats` holds the timings
    of the last call; `close()` (or a `with` block) frees the runtime's resources.
    """
    from . import runtimes

    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise EdgemmError(f"threads must be a positive integer, got {threads!r}")
    if isinstance(model_or_bundle, os.PathLike):
        model_or_bundle = str(Path(model_or_bundle))
    if visual_tokens is None:
        return runtimes.load(model_or_bundle, runtime=runtime, threads=threads, **options)

    from .tokens import parse, set_visual_tokens

    setting = parse(visual_tokens)  # bad syntax fails before anything loads
    if runtimes.is_bundle(model_or_bundle):
        raise EdgemmError("a bundle's visual-token setting is fixed when it is exported; export again with the setting")
    if runtime not in (None, "torch"):
        raise EdgemmError(f"runtime {runtime!r} runs exported bundles; export the model first (edgemm export)")
    loaded = model_or_bundle
    if not hasattr(loaded, "processor"):
        from .models import load_model

        loaded = load_model(str(model_or_bundle))
    set_visual_tokens(loaded, setting)
    return runtimes.load(loaded, runtime="torch", threads=threads, **options)


__all__ = ["load"]
