"""The native engine's C++ side in CI: build native/ with cmake (cached build directories), run its ctest
suite (kernel tests, engine tests through the C ABI, malformed-file cases, a bounded fuzz run of the
model-file parser), and the engine tests + fuzz run again under AddressSanitizer/UBSan (-O1, portable
kernels). The build directories live in $EDGEMM_NATIVE_CI_DIR (default ~/.cache/edgemm/native-ci/<hash of the checkout's path>), so
after the first run only changed files rebuild."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NATIVE = ROOT / "native"
# one cache per checkout (CMake refuses a build directory configured for another source tree)
_KEY = hashlib.sha256(str(NATIVE).encode()).hexdigest()[:12]
CACHE = Path(os.environ.get("EDGEMM_NATIVE_CI_DIR",
                            Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgemm" / "native-ci")) / _KEY


def _env():
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def _run(cmd, timeout):
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        tail = (p.stdout + p.stderr)[-4000:]
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{tail}")
    return p.stdout


def _configure(build: Path, *args: str) -> None:
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    _run(["cmake", "-S", str(NATIVE), "-B", str(build), *gen, f"-DPython3_EXECUTABLE={sys.executable}", *args], 300)


def _build(build: Path, *targets: str) -> None:
    cmd = ["cmake", "--build", str(build), "-j", "2"]
    for t in targets:
        cmd += ["--target", t]
    _run(["nice", "-n", "5", *cmd], 1800)


@pytest.fixture(scope="module")
def tools():
    missing = [t for t in ("cmake", "c++") if shutil.which(t) is None]
    assert not missing, f"the native C++ tests need {', '.join(missing)} on PATH"
    return True


def test_release_build_and_ctest(tools):
    build = CACHE / "release"
    _configure(build, "-DCMAKE_BUILD_TYPE=Release", "-DEDGEMM_BUILD_BENCH=OFF")
    _build(build)
    out = _run(["ctest", "--test-dir", str(build), "--output-on-failure", "-j", "1"], 600)
    assert "100% tests passed" in out, out[-2000:]
    names = set(re.findall(r"Test\s+#\d+: (\S+)", out))
    for want in ("engine.e2e", "engine.tokens", "engine.malformed", "engine.fuzz", "kernels.w8a8", "kernels.sparse",
                 "kernels.attn_bf16", "kernels.attn_fp16kv"):
        assert want in names, f"ctest did not run {want}: {sorted(names)}"
    # The shared library exports the C ABI only.
    lib = next(build.glob("libedgemm.*"))
    syms = _run(["nm", "-D", "--defined-only", str(lib)], 60).split()
    exported = [s for s in syms if s.startswith("edgemm")]
    assert "edgemm_generate" in exported and "edgemm_model_load" in exported
    assert not any("kernels" in s or s.startswith("_Z") for s in syms), "C++ symbols leak from libedgemm"


def test_cli_errors_are_one_line(tools, tmp_path):
    cli = CACHE / "release" / "edgemm-cli"
    assert cli.exists(), "run test_release_build_and_ctest first (same module)"
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    p = subprocess.run([str(cli), str(bad), "--prompt", "hi"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and p.stderr.startswith("error: ") and p.stderr.count("\n") == 1, p.stderr


def test_sanitizer_build_engine_tests(tools):
    build = CACHE / "asan"
    # Portable kernels only: the engine's code is what this build is for (the SIMD kernels have their own
    # sanitizer run, native/README.md), and the AVX-512 files dominate an instrumented build's time.
    _configure(build, "-DEDGEMM_SANITIZE=ON", "-DCMAKE_BUILD_TYPE=Debug", "-DCMAKE_CXX_FLAGS_DEBUG=-O1 -g",
               "-DCMAKE_C_FLAGS_DEBUG=-O1 -g", "-DEDGEMM_BUILD_BENCH=OFF", "-DEDGEMM_ENABLE_X86_SIMD=OFF")
    _build(build, "test_engine", "fuzz_gguf")
    out = _run(["ctest", "--test-dir", str(build), "-R", "^engine\\.", "--output-on-failure"], 900)
    assert "100% tests passed" in out and "out of 4" in out, out[-2000:]
