#!/usr/bin/env bash
# The test command: set up .venv with everything the tests need (idempotent), then run pytest.
# Extra arguments go to pytest, e.g. `bash tests/run.sh -k hf_import`.
set -euo pipefail
cd "$(dirname "$0")/.."
# System tools the tests use: a JDK and kotlinc (the Android JNI bridge's host harness), CMake and a C++
# compiler (the native engine). Installed from Debian when missing and we may (root, apt-get present).
need=()
command -v javac >/dev/null || need+=(default-jdk-headless)
command -v kotlinc >/dev/null || need+=(kotlin)
command -v cmake >/dev/null || need+=(cmake)
command -v g++ >/dev/null || need+=(g++)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "tests/run.sh: missing ${need[*]} (install them; the tests that need them fail without them)" >&2
  fi
fi
PY=${PYTHON:-python3}
VENV=${EDGEMM_VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip
# torch first, exactly the CPU build on this machine's disk (an unpinned torch pulls a multi-GB CUDA build)
"${PIP[@]}" install -q torch==2.13.0
# llama-cpp-python builds llama.cpp from source (4-9 minutes on 2 cores); pip reuses the built wheel afterwards
"${PIP[@]}" install -q -e '.[all,llamacpp]'
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec "$VENV/bin/python" -m pytest "$@"
