"""native adapter: runs a bundle's edgemm-native model file in edgemm's C++ engine (no torch import).

The engine does everything after the inputs: ViT, projector, visual-token compression, chunked W8A8
prefill on the two lanes, int4/int8 decode. The adapter feeds it
- the image preprocessed by edgemm.processor (the same float pixels every runtime gets; with
  `preprocess="engine"` the raw RGB bytes go in and the engine resizes / normalizes them itself),
- the question: the engine lays out the prompt template and tokenizes with its own BPE
  (edgemm_encode_prompt gives the same ids as edgemm.processor; tests/test_native_runtime.py checks it),
and turns the generated ids into text with the bundle's tokenizer, exactly as the other adapters do.

stats: the keys of base.Session plus visual_tokens and the lane utilisation of the chunked prefill
(npu_lane_busy, cpu_lane_busy: fractions of the prefill wall time each lane was busy).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from edgemm.errors import EdgemmError

from .base import GenerateOptions, Session, bundle_processor

OPTIONS = ("npu_lane", "chunk_size", "max_context", "preprocess", "attention")


def _artifact(manifest: dict) -> dict:
    arts = [a for a in manifest["artifacts"] if a.get("runtime") == "native"]
    if not arts:
        raise EdgemmError("the bundle has no native model file (export with --target native)")
    return arts[0]


class NativeSession(Session):
    runtime = "native"

    def __init__(self, bundle: Path, manifest: dict, threads: int | None = None, npu_lane: bool = False,
                 chunk_size: int | None = None, max_context: int | None = None, preprocess: str = "python",
                 attention: str = "auto"):
        super().__init__()
        from edgemm import _native

        if preprocess not in ("python", "engine"):
            raise EdgemmError(f"native preprocess {preprocess!r} must be 'python' or 'engine'")
        self.bundle, self.manifest = Path(bundle), manifest
        self.processor = bundle_processor(bundle, manifest)
        self.config = self.processor.config
        art = _artifact(manifest)
        self.precision = art.get("precision")
        self.preprocess = preprocess
        self.model = _native.Model(self.bundle / art["file"], n_threads=threads or 0, npu_lane=npu_lane,
                                   chunk_size=chunk_size or 0, max_context=max_context or 0, attention=attention)
        self.session = _native.Session(self.model)

    def info(self) -> dict:
        return self.model.info()

    def _set_image(self, image) -> None:
        if image is None:
            self.session.clear_image()
            return
        from edgemm.processor import load_image, preprocess_image

        if self.preprocess == "engine":
            self.session.set_image_rgb8(np.asarray(load_image(image), dtype=np.uint8))
        else:
            self.session.set_image_pixels(preprocess_image(image, self.config.vision))

    def stream(self, image, prompt: str, options: GenerateOptions) -> Iterator[str]:
        self.processor.prompt_text(prompt)  # the same one-line errors as every runtime (empty, "<image>" inside)
        self._set_image(image)
        toks: list[int] = []
        text_so_far = ""
        eos = self.config.eos_token_id
        it = self.session.stream(prompt.strip(), max_new_tokens=options.max_new_tokens, temperature=options.temperature,
                                 top_k=options.top_k, top_p=options.top_p, seed=options.seed)
        for _piece, tok in it:
            if tok == eos:
                break
            toks.append(tok)
            text = self.processor.decode(toks)
            if len(text) > len(text_so_far) and not text.endswith("\ufffd"):
                yield text[len(text_so_far):] if text_so_far else text
                text_so_far = text
        self.stats = finish_stats(self.session.last_stats)

    def generate_batch(self, images, prompts: list[str], **options) -> list[str]:
        opts = GenerateOptions(**options).validate()
        out: list[str] = []
        total: dict = {}
        for i, p in enumerate(prompts):
            self.processor.prompt_text(p)
            self._set_image(None if images is None else images[i])
            toks, st = self.session.generate(p.strip(), max_new_tokens=opts.max_new_tokens, temperature=opts.temperature,
                                             top_k=opts.top_k, top_p=opts.top_p, seed=opts.seed)
            eos = self.config.eos_token_id
            toks = toks[:toks.index(eos)] if eos in toks else toks
            out.append(self.processor.decode(toks))
            for k, v in st.items():
                if k in ("npu_lane_busy", "cpu_lane_busy"):  # time-weighted over the prefills
                    total[k] = total.get(k, 0.0) + v * st["prefill_ms"]
                else:
                    total[k] = total.get(k, 0) + v
        if total.get("prefill_ms"):
            for k in ("npu_lane_busy", "cpu_lane_busy"):
                total[k] = total.get(k, 0.0) / total["prefill_ms"]
        self.stats = finish_stats(total)
        return out

    def close(self) -> None:
        self.session.close()
        self.model.close()


def finish_stats(s: dict) -> dict:
    pm, dm = float(s.get("prefill_ms", 0.0)), float(s.get("decode_ms", 0.0))
    pt, dt = int(s.get("prefill_tokens", 0)), int(s.get("decode_tokens", 0))
    return {
        "image_encode_ms": round(float(s.get("image_encode_ms", 0.0)), 3),
        "prefill_ms": round(pm, 3),
        "prefill_tokens": pt,
        "prefill_tok_s": round(pt / (pm / 1e3), 1) if pm else 0.0,
        "decode_ms": round(dm, 3),
        "decode_tokens": dt,
        "decode_tok_s": round(dt / (dm / 1e3), 1) if dm else 0.0,
        "ttft_ms": round(float(s.get("ttft_ms", 0.0)), 3),
        "visual_tokens": int(s.get("visual_tokens", 0)),
        "npu_lane_busy": round(float(s.get("npu_lane_busy", 0.0)), 4),
        "cpu_lane_busy": round(float(s.get("cpu_lane_busy", 0.0)), 4),
    }


def open_bundle(path, manifest: dict, threads: int | None = None, **options) -> Session:
    """Open a bundle's native model file. Options: npu_lane (default False: one lane, every kernel on all
    threads, in order; True: the two-lane prefill, W8A8 GEMMs on the NPU-lane backend beside the CPU
    lane; with the CPU int8 backend both lanes share the same cores, which measured slower, docs/native.md),
    chunk_size / max_context (default: the file's), preprocess ("python" or "engine"), attention ("auto":
    bf16 attention in the ViT / decoder when its linears are quantized and the CPU has AVX512-BF16 (AMX-BF16 tiles or vdpbf16ps), "fp32",
    "bf16")."""
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise EdgemmError(f"unknown native option {sorted(unknown)[0]!r} (options: {', '.join(OPTIONS)})")
    return NativeSession(Path(path), manifest, threads=threads, **options)
