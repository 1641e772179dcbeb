"""Thin ctypes binding over the native engine's C ABI (native/include/edgemm.h). No torch import.

    from edgemm import _native
    model = _native.Model("bundle_dir_or_model.gguf", n_threads=2)
    sess = _native.Session(model)
    sess.set_image_rgb8(np.asarray(pil_image))
    tokens, stats = sess.generate("how many circles are there?", max_new_tokens=8)

Every failing call raises NativeError (an EdgemmError) carrying the status name and the engine's
edgemm_last_error() message. The library is looked up in $EDGEMM_NATIVE_LIB, then next to this package
(where `pip install` puts it), then in the editable / standalone build directories of the repository.
"""

from __future__ import annotations

import ctypes
import json
import os
import queue
import sys
import sysconfig
import threading
import weakref
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .errors import EdgemmError

ABI_VERSION = 1
STATUS = {0: "EDGEMM_OK", 1: "EDGEMM_ERR_INVALID_ARGUMENT", 2: "EDGEMM_ERR_IO", 3: "EDGEMM_ERR_FORMAT",
          4: "EDGEMM_ERR_UNSUPPORTED", 5: "EDGEMM_ERR_OUT_OF_MEMORY", 6: "EDGEMM_ERR_CONTEXT_FULL",
          7: "EDGEMM_ERR_CANCELLED", 8: "EDGEMM_ERR_INTERNAL"}
OK, CONTEXT_FULL, CANCELLED = 0, 6, 7


class NativeError(EdgemmError):
    """A failed native call: `status` is the edgemm_status code, `status_name` its name."""

    def __init__(self, status: int, message: str, what: str = ""):
        self.status = int(status)
        self.status_name = STATUS.get(self.status, f"status {status}")
        text = message or self.status_name
        super().__init__(f"native engine: {what + ': ' if what else ''}{text}")


# --------------------------------------------------------------------------------------- the library


def _lib_names() -> list[str]:
    if sys.platform == "darwin":
        return ["libedgemm.dylib"]
    if sys.platform == "win32":
        return ["edgemm.dll", "libedgemm.dll"]
    return ["libedgemm.so"]


def candidate_paths() -> list[Path]:
    """The libraries found (after $EDGEMM_NATIVE_LIB), newest first: in the package directory (where
    `pip install` puts it; scikit-build-core's editable installs put it under site-packages/edgemm) and
    the repository's build directories (build/*/, native/build*/)."""
    here = Path(__file__).resolve().parent
    installed = [here]
    pkg = sys.modules.get(__package__ or "edgemm")
    for p in getattr(pkg, "__path__", []) or []:
        installed.append(Path(p))
    for key in ("platlib", "purelib"):
        try:
            installed.append(Path(sysconfig.get_paths()[key]) / "edgemm")
        except KeyError:
            pass
    repo = here.parent
    builds = sorted((repo / "build").glob("*/")) if (repo / "build").is_dir() else []
    builds += sorted((repo / "native").glob("build*/"))

    def files(dirs):
        out = []
        for d in dirs:
            for sub in ("", "lib"):
                for name in _lib_names():
                    out.append((d / sub / name) if sub else (d / name))
        return out

    # In a checkout, the installed copy (pip install -e) and the build directories can hold libraries of
    # different ages: the newest one wins (the one built from the newest sources). A wheel install has
    # only the packaged library.
    found = [p for p in dict.fromkeys(files(installed) + files(builds)) if p.is_file() and _loadable_build(p)]
    found.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return found


def _loadable_build(lib: Path) -> bool:
    """False for libraries of sanitizer or cross builds (their CMakeCache says so): they cannot be loaded
    into this interpreter."""
    for d in (lib.parent, lib.parent.parent):
        cache = d / "CMakeCache.txt"
        if cache.is_file():
            try:
                text = cache.read_text(errors="replace")
            except OSError:
                return True
            return "EDGEMM_SANITIZE:BOOL=ON" not in text and "CMAKE_TOOLCHAIN_FILE:" not in text
    return True


def find_library() -> Path:
    env = os.environ.get("EDGEMM_NATIVE_LIB")
    if env:
        p = Path(env)
        if not p.is_file():
            raise EdgemmError(f"EDGEMM_NATIVE_LIB points to {p}, which does not exist")
        return p
    for p in candidate_paths():
        if p.is_file():
            return p
    raise EdgemmError("the native engine library (libedgemm) is not built: run `pip install -e . --no-build-isolation` "
                      "(or build native/ with cmake) or set EDGEMM_NATIVE_LIB to its path")


class _Stats(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("image_encode_ms", ctypes.c_double), ("prefill_ms", ctypes.c_double),
                ("decode_ms", ctypes.c_double), ("ttft_ms", ctypes.c_double), ("visual_tokens", ctypes.c_int32),
                ("prefill_tokens", ctypes.c_int32), ("decode_tokens", ctypes.c_int32),
                ("npu_lane_busy", ctypes.c_double), ("cpu_lane_busy", ctypes.c_double)]


class _LoadOptions(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("n_threads", ctypes.c_int32), ("npu_lane", ctypes.c_int32),
                ("chunk_size", ctypes.c_int32), ("max_context", ctypes.c_int32), ("attention", ctypes.c_int32)]


ATTENTION = {"auto": 0, "fp32": 1, "bf16": 2}  # edgemm_load_options.attention (EDGEMM_ATTENTION_*)


class _GenOptions(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("max_new_tokens", ctypes.c_int32), ("temperature", ctypes.c_float),
                ("top_k", ctypes.c_int32), ("top_p", ctypes.c_float), ("seed", ctypes.c_uint64),
                ("apply_template", ctypes.c_int32)]


TOKEN_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_char_p, ctypes.c_int32, ctypes.c_void_p)

_P = ctypes.c_void_p
_SIG = {
    "edgemm_last_error": (ctypes.c_char_p, []),
    "edgemm_version": (ctypes.c_char_p, []),
    "edgemm_abi_version": (ctypes.c_int, []),
    "edgemm_status_name": (ctypes.c_char_p, [ctypes.c_int]),
    "edgemm_load_options_init": (None, [ctypes.POINTER(_LoadOptions)]),
    "edgemm_model_load": (ctypes.c_int, [ctypes.c_char_p, ctypes.POINTER(_LoadOptions), ctypes.POINTER(_P)]),
    "edgemm_model_free": (None, [_P]),
    "edgemm_model_info_json": (ctypes.c_int, [_P, ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t)]),
    "edgemm_tokenize": (ctypes.c_int, [_P, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int32), ctypes.c_size_t,
                                       ctypes.POINTER(ctypes.c_size_t)]),
    "edgemm_encode_prompt": (ctypes.c_int, [_P, ctypes.c_char_p, ctypes.c_int32, ctypes.POINTER(ctypes.c_int32),
                                            ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t)]),
    "edgemm_detokenize": (ctypes.c_int, [_P, ctypes.POINTER(ctypes.c_int32), ctypes.c_size_t, ctypes.c_char_p,
                                         ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t)]),
    "edgemm_session_create": (ctypes.c_int, [_P, ctypes.POINTER(_P)]),
    "edgemm_session_free": (None, [_P]),
    "edgemm_session_set_image_rgb8": (ctypes.c_int, [_P, ctypes.POINTER(ctypes.c_uint8), ctypes.c_int32,
                                                     ctypes.c_int32, ctypes.c_int32]),
    "edgemm_session_set_image_pixels": (ctypes.c_int, [_P, ctypes.POINTER(ctypes.c_float), ctypes.c_int32,
                                                       ctypes.c_int32, ctypes.c_int32]),
    "edgemm_session_clear_image": (ctypes.c_int, [_P]),
    "edgemm_generate_options_init": (None, [ctypes.POINTER(_GenOptions)]),
    "edgemm_generate": (ctypes.c_int, [_P, ctypes.c_char_p, ctypes.POINTER(_GenOptions), TOKEN_CALLBACK, _P,
                                       ctypes.POINTER(_Stats)]),
    "edgemm_session_reset": (ctypes.c_int, [_P]),
    "edgemm_session_eval": (ctypes.c_int, [_P, ctypes.POINTER(ctypes.c_int32), ctypes.c_size_t,
                                           ctypes.POINTER(ctypes.c_float), ctypes.c_size_t]),
    "edgemm_session_n_past": (ctypes.c_int, [_P, ctypes.POINTER(ctypes.c_int32)]),
    "edgemm_session_set_debug": (ctypes.c_int, [_P, ctypes.c_int32]),
    "edgemm_session_get_tensor": (ctypes.c_int, [_P, ctypes.c_char_p, ctypes.POINTER(ctypes.c_float), ctypes.c_size_t,
                                                 ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_int64),
                                                 ctypes.POINTER(ctypes.c_int32)]),
}

_lib = None
_lib_lock = threading.Lock()


def library() -> ctypes.CDLL:
    """The loaded libedgemm with every function's signature declared (cached)."""
    global _lib
    with _lib_lock:
        if _lib is not None:
            return _lib
        path = find_library()
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            raise EdgemmError(f"cannot load the native engine library {path}: {e}") from None
        missing = [n for n in _SIG if not hasattr(lib, n)]
        if missing:
            raise EdgemmError(f"the native engine library {path} lacks {missing[0]} (built from an older native/?)")
        for name, (res, args) in _SIG.items():
            f = getattr(lib, name)
            f.restype, f.argtypes = res, args
        abi = lib.edgemm_abi_version()
        if abi != ABI_VERSION:
            raise EdgemmError(f"the native engine library {path} has ABI version {abi}; this edgemm needs {ABI_VERSION}")
        lib._edgemm_path = path
        _lib = lib
        return lib


def available() -> bool:
    try:
        library()
        return True
    except EdgemmError:
        return False


def version() -> str:
    return library().edgemm_version().decode()


def library_path() -> Path:
    return library()._edgemm_path


def _check(status: int, what: str = "") -> None:
    if status != OK:
        msg = library().edgemm_last_error()
        raise NativeError(status, msg.decode("utf-8", "replace") if msg else "", what)


def _sized_string(fn, *args) -> str:
    """Call a (buf, cap, needed) string function twice if needed; -> str."""
    needed = ctypes.c_size_t(0)
    cap = 4096
    for _ in range(3):
        buf = ctypes.create_string_buffer(cap)
        st = fn(*args, buf, cap, ctypes.byref(needed))
        if st == OK and needed.value <= cap:
            return buf.value.decode("utf-8", "replace")
        if needed.value <= cap:
            _check(st)
        cap = int(needed.value) + 1
    raise NativeError(8, "string size kept changing")


def _sized_ids(fn, *args) -> list[int]:
    needed = ctypes.c_size_t(0)
    cap = 256
    for _ in range(3):
        arr = (ctypes.c_int32 * cap)()
        st = fn(*args, arr, cap, ctypes.byref(needed))
        if st == OK and needed.value <= cap:
            return list(arr[: needed.value])
        if needed.value <= cap:
            _check(st)
        cap = int(needed.value)
    raise NativeError(8, "id count kept changing")


# ------------------------------------------------------------------------------------------- model


class _Handle:
    """An engine object freed by close(), also on garbage collection and at the end of a with block."""

    def close(self) -> None:
        raise NotImplementedError

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Model(_Handle):
    """A loaded native model (a model file or a bundle directory). Immutable; shareable by sessions."""

    def __init__(self, path, n_threads: int = 0, npu_lane: bool = False, chunk_size: int = 0, max_context: int = 0,
                 attention: str = "auto"):
        """attention: "auto" (bf16 in the parts with quantized linears, on CPUs with AVX512-BF16), "fp32" or
        "bf16" (the ViT's and the prefill's attention; see edgemm_load_options in edgemm.h)."""
        lib = library()
        p = Path(path)
        if not p.exists():
            raise EdgemmError(f"native model not found: {p}")
        if attention not in ATTENTION:
            raise EdgemmError(f"native attention {attention!r} must be one of {', '.join(ATTENTION)}")
        opts = _LoadOptions()
        lib.edgemm_load_options_init(ctypes.byref(opts))
        opts.n_threads, opts.npu_lane = int(n_threads or 0), int(bool(npu_lane))
        opts.chunk_size, opts.max_context = int(chunk_size or 0), int(max_context or 0)
        opts.attention = ATTENTION[attention]
        h = _P()
        _check(lib.edgemm_model_load(os.fsencode(str(p)), ctypes.byref(opts), ctypes.byref(h)), f"loading {p}")
        self._h = h
        self.path = p
        self._info = None
        self._sessions: weakref.WeakSet = weakref.WeakSet()

    @property
    def handle(self):
        if not self._h:
            raise EdgemmError("the native model is closed")
        return self._h

    def info(self) -> dict:
        if self._info is None:
            text = _sized_string(library().edgemm_model_info_json, self.handle)
            try:
                self._info = json.loads(text)
            except json.JSONDecodeError as e:
                raise NativeError(8, f"model info is not valid JSON ({e})") from None
        return self._info

    def tokenize(self, text: str) -> list[int]:
        return _sized_ids(library().edgemm_tokenize, self.handle, text.encode("utf-8"))

    def encode_prompt(self, question: str, with_image: bool = True) -> list[int]:
        return _sized_ids(library().edgemm_encode_prompt, self.handle, question.encode("utf-8"), int(bool(with_image)))

    def detokenize(self, ids) -> str:
        ids = list(ids)
        arr = (ctypes.c_int32 * max(1, len(ids)))(*ids)
        return _sized_string(library().edgemm_detokenize, self.handle, arr, len(ids))

    def close(self) -> None:
        """Free the model (its open sessions are closed first)."""
        if getattr(self, "_h", None):
            for s in list(getattr(self, "_sessions", ())):
                s.close()
            library().edgemm_model_free(self._h)
            self._h = None


# ----------------------------------------------------------------------------------------- session


def stats_dict(s: _Stats) -> dict:
    return {k: getattr(s, k) for k, _ in _Stats._fields_ if k != "struct_size"}


class Session(_Handle):
    """One conversation state (KV cache, image) on a Model; one thread at a time."""

    def __init__(self, model: Model):
        self.model = model
        h = _P()
        _check(library().edgemm_session_create(model.handle, ctypes.byref(h)), "creating a session")
        self._h = h
        self.last_stats: dict = {}
        model._sessions.add(self)

    @property
    def handle(self):
        if not self._h:
            raise EdgemmError("the native session is closed")
        return self._h

    # -------------------------------------------------------------- image
    def set_image_rgb8(self, rgb: np.ndarray) -> None:
        """HxWx3 (or HxWx4, alpha ignored) uint8; the engine resizes and normalizes."""
        a = np.asarray(rgb)
        if a.ndim != 3 or a.shape[2] not in (3, 4) or a.dtype != np.uint8:
            raise EdgemmError(f"an image array must be HxWx3 uint8, got {a.shape} {a.dtype}")
        a = np.ascontiguousarray(a[:, :, :3])
        h, w = a.shape[:2]
        _check(library().edgemm_session_set_image_rgb8(self.handle, a.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)),
                                                       w, h, w * 3), "setting the image")

    def set_image_pixels(self, chw: np.ndarray) -> None:
        """Preprocessed float32 [3, S, S] (edgemm.processor.preprocess_image)."""
        a = np.ascontiguousarray(np.asarray(chw, dtype=np.float32))
        if a.ndim == 4 and a.shape[0] == 1:
            a = a[0]
        if a.ndim != 3:
            raise EdgemmError(f"pixels must be [3, S, S] float32, got shape {a.shape}")
        c, h, w = a.shape
        _check(library().edgemm_session_set_image_pixels(self.handle, a.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                                         c, h, w), "setting the image")

    def clear_image(self) -> None:
        _check(library().edgemm_session_clear_image(self.handle), "clearing the image")

    # -------------------------------------------------------------- generation
    def generate(self, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, apply_template: bool = True,
                 on_token: Callable[[str, int], object] | None = None) -> tuple[list[int], dict]:
        """Generate; `on_token(piece, token_id)` is called per token (a truthy return stops).

        -> (token ids, stats). Context overflow raises NativeError (status EDGEMM_ERR_CONTEXT_FULL);
        the tokens generated before it are in `error.tokens`."""
        lib = library()
        opts = _GenOptions()
        lib.edgemm_generate_options_init(ctypes.byref(opts))
        opts.max_new_tokens, opts.temperature, opts.top_k, opts.top_p = int(max_new_tokens), float(temperature), int(top_k), float(top_p)
        opts.seed = int(seed or 0) & 0xFFFFFFFFFFFFFFFF
        opts.apply_template = int(bool(apply_template))
        tokens: list[int] = []
        failure: list[BaseException] = []

        def cb(piece, tok, user):
            tokens.append(int(tok))
            if on_token is None:
                return 0
            try:
                return 1 if on_token((piece or b"").decode("utf-8", "replace"), int(tok)) else 0
            except BaseException as e:  # never let a Python exception unwind through C
                failure.append(e)
                return 1

        c_cb = TOKEN_CALLBACK(cb)
        st = _Stats()
        st.struct_size = ctypes.sizeof(_Stats)
        status = lib.edgemm_generate(self.handle, prompt.encode("utf-8"), ctypes.byref(opts), c_cb, None, ctypes.byref(st))
        if failure:
            raise failure[0]
        if status == CANCELLED and on_token is not None:
            return tokens, stats_dict(st)
        if status != OK:
            msg = lib.edgemm_last_error()
            err = NativeError(status, msg.decode("utf-8", "replace") if msg else "", "generate")
            err.tokens, err.stats = tokens, stats_dict(st)
            raise err
        return tokens, stats_dict(st)

    def stream(self, prompt: str, **kw) -> Iterator[tuple[str, int]]:
        """Yield (piece, token_id) as the engine produces them (generation runs on a worker thread);
        afterwards `self.last_stats` holds the stats."""
        q: queue.Queue = queue.Queue()
        stop = threading.Event()
        done = object()

        def on_token(piece, tok):
            q.put((piece, tok))
            return stop.is_set()

        def work():
            try:
                _, self.last_stats = self.generate(prompt, on_token=on_token, **kw)
                q.put(done)
            except BaseException as e:
                q.put(e)

        t = threading.Thread(target=work, daemon=True)
        t.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            t.join()

    # -------------------------------------------------------------- stepping / debug
    def reset(self) -> None:
        _check(library().edgemm_session_reset(self.handle), "reset")

    def eval(self, ids, logits: bool = True) -> np.ndarray | None:
        """Append ids to the context and run them; -> the last position's logits [V] (or None)."""
        ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int32).reshape(-1))
        if ids.size == 0:
            raise EdgemmError("eval needs at least one token id")
        out = np.empty(int(self.model.info()["vocab_size"]), np.float32) if logits else None
        _check(library().edgemm_session_eval(self.handle, ids.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), ids.size,
                                             out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)) if out is not None else None,
                                             0 if out is None else out.size), "eval")
        return out

    def n_past(self) -> int:
        n = ctypes.c_int32(0)
        _check(library().edgemm_session_n_past(self.handle, ctypes.byref(n)), "n_past")
        return int(n.value)

    def set_debug(self, flags: int = 1) -> None:
        _check(library().edgemm_session_set_debug(self.handle, int(flags)), "set_debug")

    def get_tensor(self, name: str) -> np.ndarray:
        lib = library()
        needed, ndim = ctypes.c_size_t(0), ctypes.c_int32(0)
        shape = (ctypes.c_int64 * 4)()
        _check(lib.edgemm_session_get_tensor(self.handle, name.encode(), None, 0, ctypes.byref(needed), shape,
                                             ctypes.byref(ndim)), f"tensor {name}")
        out = np.empty(int(needed.value), np.float32)
        _check(lib.edgemm_session_get_tensor(self.handle, name.encode(), out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                             out.size, ctypes.byref(needed), shape, ctypes.byref(ndim)), f"tensor {name}")
        dims = [int(shape[i]) for i in range(int(ndim.value))]
        return out.reshape(dims) if dims and int(np.prod(dims)) == out.size else out

    def close(self) -> None:
        if getattr(self, "_h", None):
            library().edgemm_session_free(self._h)
            self._h = None


__all__ = ["Model", "Session", "NativeError", "library", "available", "version", "find_library", "STATUS"]
