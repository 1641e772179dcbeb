"""Shared by the demo-app host tests (test_android_bridge.py, test_ios_bridge.py): the native library, a real
bundle of the demo model for the native engine, a host C/C++ toolchain, and reference answers.

Nothing here skips: a missing engine library, compiler or JDK is a test failure with a message that says
what to install or build.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HEADER_DIR = REPO / "native" / "include"
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"}

# Questions about one test picture (shapes dataset), see shapes_case().
N_QUESTIONS = 3


def libedgemm() -> Path:
    """The engine's shared library (libedgemm), where edgemm._native finds it ($EDGEMM_NATIVE_LIB first)."""
    from edgemm._native import find_library

    return Path(find_library()).resolve()


def run(cmd, timeout=600, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=kw.pop("env", ENV), **kw)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r


def compiler(lang: str = "c") -> str:
    names = ("cc", "gcc", "clang") if lang == "c" else ("c++", "g++", "clang++")
    for n in names:
        if shutil.which(n):
            return n
    raise AssertionError(f"no {lang} compiler on PATH (tried {', '.join(names)}): install build-essential")


def _tmpdir(prefix: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    return d


@functools.lru_cache(maxsize=None)
def native_bundle(precision: str = "fp32") -> Path:
    """`edgemm export demo --target native --precision P` into a temp dir (once per test process)."""
    from edgemm.export import export

    out = _tmpdir(f"edgemm-native-{precision}-") / "bundle"
    export("demo", "native", out, precision=precision)
    assert (out / "manifest.json").is_file()
    return out


@functools.lru_cache(maxsize=None)
def shapes_case() -> tuple[Path, list[str], list[str]]:
    """One 64x64 shapes picture and N_QUESTIONS questions asked about it, with the dataset's answers. Only the
    first question is the dataset's own question about this picture (truth[0] is its answer); the others are
    the next records' questions (other kinds: shape, count), asked about the same picture."""
    from edgemm.data import write_shapes

    root = write_shapes(_tmpdir("edgemm-shapes-") / "ds", N_QUESTIONS, 31)
    recs = [json.loads(x) for x in (root / "data.jsonl").read_text().splitlines()]
    return root / recs[0]["image"], [r["question"] for r in recs], [r["answer"] for r in recs]


@functools.lru_cache(maxsize=None)
def native_reference(bundle: str, image: str, questions: tuple[str, ...], max_new_tokens: int) -> list[dict]:
    """What the engine answers through the Python binding (edgemm._native, ctypes over the same C ABI):
    token ids, text and stats per question, greedy. The app bridges must reproduce the ids exactly."""
    import numpy as np
    from PIL import Image

    from edgemm import _native

    model = _native.Model(bundle, n_threads=2, npu_lane=True)  # as the apps load it by default
    sess = _native.Session(model)
    sess.set_image_rgb8(np.asarray(Image.open(image).convert("RGB")))
    out = []
    for q in questions:
        tokens, stats = sess.generate(q, max_new_tokens=max_new_tokens)
        out.append({"ids": [int(t) for t in tokens], "stats": stats})
    return out


@functools.lru_cache(maxsize=None)
def torch_answers(image: str, questions: tuple[str, ...], max_new_tokens: int) -> list[str]:
    """The torch reference model's greedy answers (the demo model the fp32 bundle was exported from)."""
    import edgemm

    sess = edgemm.load("demo", threads=2)
    return [sess.generate(image, q, max_new_tokens=max_new_tokens) for q in questions]
