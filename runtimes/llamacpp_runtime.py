"""llama.cpp adapter: runs a bundle's GGUF files (text model + mmproj) with llama-cpp-python.

Everything runs inside llama.cpp: the tokenizer (llama.cpp's own, from the GGUF), the vision encoder and
projector (mtmd, `mtmd_encode_chunk`), prefill and decode (`llama_decode`), and sampling (llama.cpp's
sampler chain). The adapter only does what edgemm defines and llama.cpp does not:

- image preprocessing: edgemm's resize (pad / crop / squash, bicubic) to the model's square size is done
  with edgemm's processor; mtmd then only rescales and normalizes the exact-size bitmap;
- [CLS] order: llama.cpp builds with bug #25814 append [CLS] after the patches while filling positions
  and the projector's row selection as if it came first. The adapter watches the one CONCAT node of
  the encoder graph (an eval callback) and, when [CLS] is last, moves it first before the position
  embeddings are added, so the ViT sees the canonical sequence. Fixed builds (CLS first) are detected
  and left alone; `cls_fix=False` shows what stock llama.cpp computes;
- visual-token compression methods that work on the projected tokens (divprune, random) are applied
  to mtmd's output before the tokens enter the LLM (docs/export-gguf.md).

Timings: image_encode_ms is the wall time of mtmd_encode_chunk (llama.cpp keeps no counter for it);
prefill and decode come from llama.cpp's own perf counters (llama_perf_context).
"""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from edgemm.errors import EdgemmError

from .base import GenerateOptions, Session, bundle_processor

# llama.cpp's CPU backend runs its threads with OpenMP, which by default spins at every op barrier. On a
# CPU shared with other work (a phone, a laptop, this 2-core CI machine) a spinning thread whose partner
# was descheduled burns its time slice: 2 threads measured 10-20x slower than 1 thread here under load,
# and as fast as 1 thread with passive waiting. libgomp reads this when llama.cpp's library is loaded,
# so it is set before llama_cpp is imported (unless the user chose a policy).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

IMAGE_MARKER = "<image>"  # edgemm's template marker, also given to mtmd as its media marker
_LOG: list[str] = []  # recent llama.cpp log lines (errors are reported from here)
_LOG_STATE = {"verbose": False, "installed": False, "cb": None}


def _install_logging(verbose: bool):
    import llama_cpp
    import llama_cpp.mtmd_cpp as mt

    _LOG_STATE["verbose"] = _LOG_STATE["verbose"] or verbose
    if _LOG_STATE["installed"]:
        return

    @llama_cpp.llama_log_callback
    def cb(level, text, user_data):
        s = text.decode("utf-8", "replace") if text else ""
        _LOG.append(s)
        del _LOG[:-200]
        if _LOG_STATE["verbose"]:
            import sys

            sys.stderr.write(s)

    _LOG_STATE["cb"] = cb  # keep the ctypes callback alive
    llama_cpp.llama_log_set(cb, ctypes.c_void_p(0))
    mt.mtmd_log_set(cb, ctypes.c_void_p(0))
    mt.mtmd_helper_log_set(cb, ctypes.c_void_p(0))
    _LOG_STATE["installed"] = True


def _last_error() -> str:
    lines = [x.strip() for x in "".join(_LOG[-40:]).splitlines() if x.strip()]
    errs = [x for x in lines if "error" in x.lower() or "failed" in x.lower()]
    return (errs or lines or ["(no log)"])[-1][:200]


class _Ggml:
    """The few ggml functions the [CLS] fix needs (libggml-base from the llama-cpp-python install)."""

    def __init__(self):
        import llama_cpp

        lib_dir = Path(llama_cpp.__file__).parent / "lib"
        cands = sorted(lib_dir.glob("libggml-base.*")) + sorted(lib_dir.glob("ggml-base.*"))
        if not cands:
            raise EdgemmError(f"llama-cpp-python's libggml-base was not found in {lib_dir}")
        lib = ctypes.CDLL(str(cands[0]))
        lib.ggml_op_desc.restype = ctypes.c_char_p
        lib.ggml_op_desc.argtypes = [ctypes.c_void_p]
        lib.ggml_nelements.restype = ctypes.c_int64
        lib.ggml_nelements.argtypes = [ctypes.c_void_p]
        lib.ggml_nbytes.restype = ctypes.c_size_t
        lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
        for f in ("ggml_backend_tensor_get", "ggml_backend_tensor_set"):
            getattr(lib, f).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
            getattr(lib, f).restype = None
        self.lib = lib


class ClsFix:
    """Eval callback for mtmd's encoder graph: puts [CLS] first when the build appends it last (#25814).

    The llava graph concatenates the patch embeddings and the class embedding (one CONCAT node of
    (patches + 1) x width floats) and then adds position rows 0..P and keeps rows 1..P for the
    projector. The callback reads that node's output: if the last row is the class embedding, it
    rotates the rows so [CLS] is row 0 (the canonical CLS-first sequence, bit-exact); if row 0 is the
    class embedding (a fixed build) it does nothing; anything else is an error."""

    def __init__(self, class_embd: np.ndarray, n_patches: int, enabled: bool = True):
        import llama_cpp

        self.cls = np.ascontiguousarray(class_embd, dtype=np.float32)
        self.d = self.cls.shape[0]
        self.n = n_patches + 1
        self.enabled = enabled
        self.g = _Ggml().lib
        self.layout: str | None = None  # "cls-last" (buggy build) | "cls-first" (fixed build)
        self.fixes = 0
        self.error: str | None = None

        @llama_cpp.ggml_backend_sched_eval_callback
        def cb(t, ask, user_data):
            return self._cb(t, ask)

        self.callback = cb

    def _cb(self, t, ask) -> bool:
        try:
            g = self.g
            if ask:
                return g.ggml_op_desc(t) == b"CONCAT" and g.ggml_nelements(t) == self.n * self.d
            if g.ggml_op_desc(t) != b"CONCAT" or g.ggml_nbytes(t) != self.n * self.d * 4:
                return True
            a = np.empty((self.n, self.d), np.float32)
            g.ggml_backend_tensor_get(t, a.ctypes.data, 0, a.nbytes)
            first, last = np.array_equal(a[0], self.cls), np.array_equal(a[-1], self.cls)
            if last and not first:
                self.layout = "cls-last"
                if self.enabled:
                    a = np.ascontiguousarray(np.roll(a, 1, axis=0))
                    g.ggml_backend_tensor_set(t, a.ctypes.data, 0, a.nbytes)
                    self.fixes += 1
            elif first:
                self.layout = "cls-first"
            else:
                self.error = "mtmd's encoder graph has an unexpected [CLS] layout (neither first nor last)"
            return True
        except Exception as e:  # never raise through C
            self.error = f"[CLS] fix failed: {type(e).__name__}: {e}"
            return True


class LlamaCppSession(Session):
    runtime = "llamacpp"

    def __init__(self, bundle: Path, manifest: dict, threads: int | None = None, n_ctx: int | None = None,
                 cls_fix: bool | str = "auto", precision: str | None = None, extra_bufts: bool | str = "auto",
                 verbose: bool = False):
        super().__init__()
        try:
            import llama_cpp
            import llama_cpp.mtmd_cpp as mt
        except ImportError:
            raise EdgemmError("the llamacpp runtime needs llama-cpp-python: pip install 'edgemm[llamacpp]'") from None
        self.llama, self.mt = llama_cpp, mt
        self.bundle, self.manifest = Path(bundle), manifest
        self.processor = bundle_processor(bundle, manifest)
        self.config = cfg = self.processor.config
        texts = [a for a in manifest["artifacts"] if a.get("runtime") == "llamacpp" and a["role"] == "text_model"]
        mmprojs = [a for a in manifest["artifacts"] if a.get("runtime") == "llamacpp" and a["role"] == "mmproj"]
        if precision is not None:
            texts = [a for a in texts if a["precision"] == precision]
        if not texts:
            raise EdgemmError(f"bundle {bundle} has no llamacpp text model" + (f" at precision {precision}" if precision else ""))
        self.text_artifact, self.mmproj_artifact = texts[0], (mmprojs[0] if mmprojs else None)
        self.threads = threads or 2
        self.n_ctx = int(n_ctx or cfg.text.max_position_embeddings)
        _install_logging(verbose)
        llama_cpp.llama_backend_init()

        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = 0
        # llama.cpp's extra CPU buffer types repack Q4_0/Q8_0 weights for AMX / interleaved kernels. On CPUs
        # with AMX the AMX matmul segfaults (llama.cpp #20824; seen here on the first Q8_0/Q4_0 decode)
        # and was reported to give wrong Q4_0 results (#16315): "auto" turns them off on AMX CPUs.
        if extra_bufts == "auto":
            extra_bufts = not cpu_has_amx()
        self.extra_bufts = bool(extra_bufts)
        mp.use_extra_bufts = self.extra_bufts
        path = str(self.bundle / self.text_artifact["file"])
        self.model = llama_cpp.llama_model_load_from_file(path.encode(), mp)
        if not self.model:
            raise EdgemmError(f"llama.cpp could not load {path}: {_last_error()}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_embd = llama_cpp.llama_model_n_embd(self.model)
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = self.n_ctx
        cp.n_batch = self.n_ctx
        cp.n_ubatch = self.n_ctx
        cp.n_seq_max = 1
        cp.n_threads = self.threads
        cp.n_threads_batch = self.threads
        cp.no_perf = False
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise EdgemmError(f"llama.cpp could not create a context for {path}: {_last_error()}")

        self.mctx = None
        self.cls_fix = None
        self.token_setting = self._token_setting()
        if self.mmproj_artifact is not None:
            mm_path = self.bundle / self.mmproj_artifact["file"]
            if cls_fix not in ("auto", True, False):
                raise EdgemmError("cls_fix must be 'auto', True or False")
            self.cls_fix = ClsFix(_read_class_embd(mm_path), cfg.vision.num_patches, enabled=cls_fix is not False)
            p = mt.mtmd_context_params_default()
            p.use_gpu = False
            p.print_timings = False
            p.n_threads = self.threads
            p.warmup = False
            self._marker = IMAGE_MARKER.encode()
            p.media_marker = self._marker
            p.cb_eval = self.cls_fix.callback
            self.mctx = mt.mtmd_init_from_file(str(mm_path).encode(), self.model, p)
            if not self.mctx:
                raise EdgemmError(f"llama.cpp's mtmd could not load {mm_path}: {_last_error()}")
        self.last_tokens: list[int] = []
        self.prompt_tokens: list[int] = []
        # one-time graph setup (llama.cpp reserves and builds its graphs on the first decodes), so that
        # the first question's timings are not the setup's
        self._decode_tokens([cfg.bos_token_id, cfg.bos_token_id], 0, True)
        self._decode_tokens([cfg.bos_token_id], 2, True)
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)

    # ----------------------------------------------------------------------------- setup helpers
    def _token_setting(self):
        vt = self.config.extras.get("visual_tokens")
        if not vt:
            return None
        from edgemm.tokens import parse

        s = parse(vt).validate_for(self.config)
        from edgemm.export.gguf import GGUF_TOKEN_METHODS

        if s.method not in GGUF_TOKEN_METHODS:
            raise EdgemmError(f"the llamacpp runtime cannot apply visual-token method {s.method!r} "
                              f"(supported: {', '.join(GGUF_TOKEN_METHODS)})")
        return s

    def close(self) -> None:
        llama_cpp, mt = self.llama, self.mt
        if getattr(self, "mctx", None):
            mt.mtmd_free(self.mctx)
            self.mctx = None
        if getattr(self, "ctx", None):
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            llama_cpp.llama_model_free(self.model)
            self.model = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ---------------------------------------------------------------------------- tokenization
    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """llama.cpp's tokenizer (from the GGUF) on `text`; special tokens in the text are parsed."""
        llama_cpp = self.llama
        b = text.encode("utf-8")
        n_max = len(b) + 8
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self.vocab, b, len(b), buf, n_max, add_special, True)
        if n < 0:
            raise EdgemmError(f"llama.cpp could not tokenize the prompt ({n})")
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self.llama.llama_token_to_piece(self.vocab, token, buf, 64, 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self.llama.llama_token_to_piece(self.vocab, token, buf, -n, 0, False)
        return buf.raw[:n]

    def image_bitmap_u8(self, image) -> np.ndarray:
        """edgemm's preprocessing up to the exact-size uint8 image that mtmd rescales and normalizes."""
        from edgemm.processor import preprocess_image

        v = self.config.vision
        x = preprocess_image(image, v)  # [3, S, S] normalized float32
        u = (x.transpose(1, 2, 0) * np.asarray(v.image_std, np.float32) + np.asarray(v.image_mean, np.float32)) * 255.0
        return np.ascontiguousarray(np.clip(np.rint(u), 0, 255).astype(np.uint8))

    def _chunks(self, image, prompt: str):
        """mtmd_tokenize of the templated prompt with the image: a list of ('text', ids) / ('image', chunk)."""
        mt = self.mt
        text = self.processor.prompt_text(prompt)
        if IMAGE_MARKER not in text:
            raise EdgemmError("the prompt template has no <image> marker")
        u8 = self.image_bitmap_u8(image)
        h, w, _ = u8.shape
        data = (ctypes.c_ubyte * u8.size).from_buffer_copy(u8.tobytes())
        bmp = mt.mtmd_bitmap_init(w, h, data)
        chunks = mt.mtmd_input_chunks_init()
        tb = text.encode("utf-8")
        inp = mt.mtmd_input_text()
        inp.text, inp.text_len, inp.add_special, inp.parse_special = tb, len(tb), True, True
        bitmaps = (mt.mtmd_bitmap_p_ctypes * 1)(bmp)
        try:
            r = mt.mtmd_tokenize(self.mctx, chunks, ctypes.byref(inp), bitmaps, 1)
            if r != 0:
                raise EdgemmError(f"mtmd_tokenize failed ({r}): {_last_error()}")
            out = []
            for i in range(mt.mtmd_input_chunks_size(chunks)):
                ch = mt.mtmd_input_chunks_get(chunks, i)
                kind = mt.mtmd_input_chunk_get_type(ch)
                if kind == mt.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    n = ctypes.c_size_t(0)
                    ptr = mt.mtmd_input_chunk_get_tokens_text(ch, ctypes.byref(n))
                    out.append(("text", [int(ptr[j]) for j in range(n.value)]))
                elif kind == mt.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    out.append(("image", mt.mtmd_input_chunk_copy(ch)))
                else:
                    raise EdgemmError("mtmd produced a non-image media chunk")
            return out
        finally:
            mt.mtmd_input_chunks_free(chunks)
            mt.mtmd_bitmap_free(bmp)

    def prompt_ids(self, image, prompt: str) -> list[int]:
        """llama.cpp's token ids of the prompt, the image as one config.image_token_id (for comparing with
        edgemm's own tokenizer)."""
        if image is None:
            return self.tokenize(self.processor.prompt_text(prompt).replace(IMAGE_MARKER + "\n", "").replace(IMAGE_MARKER, ""))
        ids = []
        for kind, val in self._chunks(image, prompt):
            if kind == "text":
                ids += val
            else:
                ids.append(self.config.image_token_id)
                self.mt.mtmd_input_chunk_free(val)
        return ids

    # ------------------------------------------------------------------------------------ image
    def encode_image_chunk(self, chunk) -> np.ndarray:
        """mtmd's projected visual tokens [n, D] for an image chunk (the [CLS] fix applies)."""
        mt = self.mt
        if self.cls_fix is not None:
            self.cls_fix.error = None
        r = mt.mtmd_encode_chunk(self.mctx, chunk)
        if r != 0:
            raise EdgemmError(f"mtmd could not encode the image ({r}): {_last_error()}")
        if self.cls_fix is not None and self.cls_fix.error:
            raise EdgemmError(self.cls_fix.error)
        if self.cls_fix is not None and self.cls_fix.enabled and self.cls_fix.layout is None:
            raise EdgemmError("this llama.cpp build's mtmd encoder graph has no [CLS] concat the adapter can check "
                              "(llama.cpp bug #25814): cannot verify the visual tokens; pass cls_fix=False to run anyway")
        n = mt.mtmd_input_chunk_get_n_tokens(chunk)
        ptr = mt.mtmd_get_output_embd(self.mctx)
        return np.ctypeslib.as_array(ptr, shape=(n * self.n_embd,)).reshape(n, self.n_embd).copy()

    def encode_image(self, image) -> np.ndarray:
        """Projected visual tokens [K, D] exactly as fed to the LLM (after token compression, if any)."""
        chunks = self._chunks(image, "x")
        emb = None
        for kind, val in chunks:
            if kind == "image":
                try:
                    emb = self.encode_image_chunk(val)
                finally:
                    self.mt.mtmd_input_chunk_free(val)
        return self._compress(emb)

    def _compress(self, emb: np.ndarray) -> np.ndarray:
        s = self.token_setting
        if s is None:
            return emb
        k = s.visual_tokens(self.config)
        if k >= emb.shape[0]:
            return emb
        if s.method == "divprune":
            idx = divprune_select(emb, k)
        elif s.method == "random":
            from edgemm.tokens.randsel import subset

            idx = np.asarray(subset(emb.shape[0], k, int(s.option("seed"))), dtype=np.int64)
        else:  # refused at load
            raise EdgemmError(f"visual-token method {s.method} is not supported by the llamacpp runtime")
        return np.ascontiguousarray(emb[idx])

    # ----------------------------------------------------------------------------------- decode
    def _decode_tokens(self, ids: list[int], pos0: int, want_logits: bool) -> None:
        llama_cpp = self.llama
        n = len(ids)
        batch = llama_cpp.llama_batch_init(n, 0, 1)
        try:
            for i, t in enumerate(ids):
                batch.token[i] = t
                batch.pos[i] = pos0 + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = want_logits and i == n - 1
            batch.n_tokens = n
            r = llama_cpp.llama_decode(self.ctx, batch)
            llama_cpp.llama_synchronize(self.ctx)  # perf counters are updated here
        finally:
            llama_cpp.llama_batch_free(batch)
        if r != 0:
            raise EdgemmError(f"llama_decode failed ({r}): {_last_error()}")

    def _decode_embeds(self, emb: np.ndarray, pos0: int, want_logits: bool) -> None:
        llama_cpp = self.llama
        n, d = emb.shape
        batch = llama_cpp.llama_batch_init(n, d, 1)
        try:
            src = np.ascontiguousarray(emb, dtype=np.float32)
            ctypes.memmove(batch.embd, src.ctypes.data, src.nbytes)
            for i in range(n):
                batch.pos[i] = pos0 + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = want_logits and i == n - 1
            batch.n_tokens = n
            r = llama_cpp.llama_decode(self.ctx, batch)
            llama_cpp.llama_synchronize(self.ctx)
        finally:
            llama_cpp.llama_batch_free(batch)
        if r != 0:
            raise EdgemmError(f"llama_decode (image embeddings) failed ({r}): {_last_error()}")

    def _prefill(self, image, prompt: str) -> tuple[int, float]:
        """Clear the KV cache and run the prompt; returns (n_past, image_encode_ms)."""
        llama_cpp = self.llama
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        enc_ms = 0.0
        if image is None:
            ids = self.prompt_ids(None, prompt)
            parts = [("text", ids)]
        else:
            if self.mctx is None:
                raise EdgemmError(f"bundle {self.bundle} has no mmproj: it answers text-only prompts")
            parts = self._chunks(image, prompt)
        try:
            # encode the image first (its time is image_encode_ms, as in the torch reference)
            feeds = []
            self.prompt_tokens = []
            for kind, val in parts:
                if kind == "text":
                    feeds.append(("text", val))
                    self.prompt_tokens += val
                else:
                    t0 = time.perf_counter()
                    emb = self._compress(self.encode_image_chunk(val))
                    enc_ms += (time.perf_counter() - t0) * 1e3
                    feeds.append(("embd", emb))
                    self.prompt_tokens += [self.config.image_token_id] * emb.shape[0]
        finally:
            for kind, val in parts:
                if kind == "image":
                    self.mt.mtmd_input_chunk_free(val)
        total = sum(len(v) if k == "text" else v.shape[0] for k, v in feeds)
        if total == 0:
            raise EdgemmError("the prompt is empty")
        if total > self.n_ctx:
            raise EdgemmError(f"prompt of {total} tokens exceeds the context of {self.n_ctx}")
        llama_cpp.llama_perf_context_reset(self.ctx)
        pos = 0
        for j, (kind, val) in enumerate(feeds):
            last = j == len(feeds) - 1
            if kind == "text":
                if val:
                    self._decode_tokens(val, pos, last)
                    pos += len(val)
            else:
                self._decode_embeds(val, pos, last)
                pos += val.shape[0]
        return pos, enc_ms

    def prompt_logits(self, image, prompt: str) -> np.ndarray:
        """Logits [V] after the prompt (the next-token distribution), for comparing with torch."""
        self._prefill(image, prompt)
        ptr = self.llama.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def _sampler(self, options: GenerateOptions):
        llama_cpp = self.llama
        sp = llama_cpp.llama_sampler_chain_default_params()
        sp.no_perf = True
        chain = llama_cpp.llama_sampler_chain_init(sp)
        if options.temperature == 0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
            return chain
        # torch's order: temperature, then top-k, then top-p on the tempered distribution
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(float(options.temperature)))
        if options.top_k:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_k(int(options.top_k)))
        if options.top_p < 1.0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(float(options.top_p), 1))
        seed = options.seed if options.seed is not None else int(np.random.SeedSequence().entropy % (2**32 - 1))
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(int(seed) & 0xFFFFFFFF))
        return chain

    def stream(self, image, prompt: str, options: GenerateOptions) -> Iterator[str]:
        llama_cpp = self.llama
        cfg = self.config
        t0 = time.perf_counter()
        n_past, enc_ms = self._prefill(image, prompt)
        if n_past + options.max_new_tokens > self.n_ctx:
            raise EdgemmError(f"prompt of {n_past} tokens + {options.max_new_tokens} new tokens exceeds the context of {self.n_ctx}")
        perf0 = llama_cpp.llama_perf_context(self.ctx)
        prefill_ms = perf0.t_p_eval_ms + perf0.t_eval_ms
        smpl = self._sampler(options)
        self.last_tokens = []
        raw = b""
        text_so_far = ""
        ttft = None
        steps = 0
        try:
            while steps < options.max_new_tokens:
                tok = int(llama_cpp.llama_sampler_sample(smpl, self.ctx, -1))
                if ttft is None:
                    ttft = (time.perf_counter() - t0) * 1e3
                steps += 1
                if tok == cfg.eos_token_id or llama_cpp.llama_vocab_is_eog(self.vocab, tok):
                    break
                self.last_tokens.append(tok)
                raw += self.piece(tok)
                text = raw.decode("utf-8", "replace").strip()
                if len(text) > len(text_so_far) and not text.endswith("\ufffd"):
                    yield text[len(text_so_far):] if text_so_far else text
                    text_so_far = text
                if steps >= options.max_new_tokens:
                    break
                self._decode_tokens([tok], n_past, True)
                n_past += 1
        finally:
            llama_cpp.llama_sampler_free(smpl)
        # what is left: an answer ending in an incomplete UTF-8 sequence decodes with U+FFFD, as edgemm's
        # tokenizer decodes it
        text = raw.decode("utf-8", "replace").strip()
        if len(text) > len(text_so_far):
            yield text[len(text_so_far):] if text_so_far else text
        perf = llama_cpp.llama_perf_context(self.ctx)
        decode_ms = perf.t_p_eval_ms + perf.t_eval_ms - prefill_ms
        decode_tokens = max(0, steps - 1)
        self.stats = {
            "image_encode_ms": round(enc_ms, 3),
            "prefill_ms": round(prefill_ms, 3),
            "prefill_tokens": int(n_past - decode_tokens),
            "prefill_tok_s": round((n_past - decode_tokens) / (prefill_ms / 1e3), 1) if prefill_ms else 0.0,
            "decode_ms": round(decode_ms, 3),
            "decode_tokens": int(decode_tokens),
            "decode_tok_s": round(decode_tokens / (decode_ms / 1e3), 1) if decode_ms > 0 else 0.0,
            "ttft_ms": round(ttft or 0.0, 3),
        }

    def generate_batch(self, images, prompts: list[str], **options) -> list[str]:
        """One question after another (llama.cpp's context runs one sequence here); stats are summed."""
        out = []
        total: dict = {}
        for i, p in enumerate(prompts):
            out.append(self.generate(None if images is None else images[i], p, **options))
            for k in ("image_encode_ms", "prefill_ms", "prefill_tokens", "decode_ms", "decode_tokens", "ttft_ms"):
                total[k] = total.get(k, 0) + self.stats.get(k, 0)
        if total:
            total["prefill_tok_s"] = round(total["prefill_tokens"] / (total["prefill_ms"] / 1e3), 1) if total["prefill_ms"] else 0.0
            total["decode_tok_s"] = round(total["decode_tokens"] / (total["decode_ms"] / 1e3), 1) if total["decode_ms"] else 0.0
            self.stats = {k: round(v, 3) if isinstance(v, float) else v for k, v in total.items()}
        return out


# ----------------------------------------------------------------------------------- helpers


def cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_int8" in line.split() or "amx_tile" in line.split()
    except OSError:
        pass
    return False


def _read_class_embd(mmproj: Path) -> np.ndarray:
    try:
        from gguf import GGUFReader
    except ImportError:
        raise EdgemmError("the llamacpp runtime needs the gguf package: pip install 'edgemm[llamacpp]'") from None
    r = GGUFReader(str(mmproj))
    for t in r.tensors:
        if t.name == "v.class_embd":
            return np.asarray(t.data, dtype=np.float32).reshape(-1).copy()
    raise EdgemmError(f"{mmproj} has no v.class_embd: not an edgemm mmproj")


def divprune_select(emb: np.ndarray, k: int) -> np.ndarray:
    """DivPrune (edgemm.tokens.divprune) in numpy: greedy max-min cosine diversity, ties to the lower
    index, kept tokens in ascending order."""
    x = emb.astype(np.float32)
    u = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), np.float32(1e-12))
    dist = (np.float32(1.0) - u @ u.T).astype(np.float32)
    n = dist.shape[0]
    nearest = np.where(np.eye(n, dtype=bool), np.float32(np.inf), dist).min(axis=0)
    first = int(np.argmax(nearest))
    chosen = np.zeros(n, dtype=bool)
    sel = [first]
    chosen[first] = True
    mind = dist[first].copy()
    for _ in range(1, k):
        score = np.where(chosen, -np.inf, mind)
        j = int(np.argmax(score))
        sel.append(j)
        chosen[j] = True
        mind = np.minimum(mind, dist[j])
    return np.sort(np.asarray(sel, dtype=np.int64))


def open_bundle(path, manifest: dict, threads: int | None = None, **options) -> LlamaCppSession:
    return LlamaCppSession(Path(path), manifest, threads=threads, **options)


__all__ = ["open_bundle", "LlamaCppSession", "ClsFix", "divprune_select"]
