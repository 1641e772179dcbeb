"""The ExecuTorch adapter: runs an edgemm ExecuTorch bundle (`model.pte`, see export/executorch.py) with
ExecuTorch's Python runtime (`executorch.runtime.Runtime`, the same C++ runtime, kernels and XNNPACK
delegate that an Android/iOS app links).

Per question: `vision_encoder` once (visual tokens, compression included), `token_embedding` for the
prompt's text, the embeddings spliced in the prompt template's order, one `text_decoder` call for the
whole prompt (prefill, input_pos 0), then one `token_embedding` + `text_decoder` call per new token.
The KV cache lives inside the program (mutable buffers); a new question restarts at position 0.
Sampling (greedy, temperature, top-k, top-p, seed) is edgemm's own `sample_next`, as in the torch
runtime, so equal logits give equal answers.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

from edgemm.errors import EdgemmError

from .base import GenerateOptions, Session, bundle_processor

METHODS = ("vision_encoder", "token_embedding", "text_decoder")
METADATA = ("get_max_seq_len", "get_max_context_len", "get_vocab_size", "get_bos_id", "get_eos_ids", "use_kv_cache",
            "enable_dynamic_shape")


def _runtime():
    """The ExecuTorch runtime with the kernels edgemm programs use registered."""
    try:
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (llama::update_cache, llama::custom_sdpa)
        import executorch.kernels.quantized  # noqa: F401  (quantized_decomposed::*, e.g. a quantized embedding)
        from executorch.runtime import Runtime
    except ImportError as e:
        raise EdgemmError(f"the executorch runtime needs executorch ({e.name} is missing): pip install 'edgemm[runtimes]'") from None
    return Runtime.get()


def set_threads(threads: int) -> None:
    """Size ExecuTorch's CPU thread pool (the one XNNPACK and the custom kernels use)."""
    from executorch.extension.pybindings import portable_lib

    if portable_lib._threadpool_get_thread_count() != threads:
        portable_lib._unsafe_reset_threadpool(int(threads))


class ExecuTorchSession(Session):
    runtime = "executorch"

    def __init__(self, bundle: Path, manifest: dict, threads: int | None = None, artifact: str | None = None):
        super().__init__()
        import torch

        self.torch = torch
        arts = [a for a in manifest["artifacts"] if a.get("runtime") == "executorch" and a.get("format") == "executorch"]
        if artifact is not None:
            arts = [a for a in arts if a["file"] == artifact]
        if not arts:
            raise EdgemmError(f"bundle {bundle} has no ExecuTorch program" + (f" named {artifact}" if artifact else ""))
        self.artifact = arts[0]
        self.processor = bundle_processor(bundle, manifest)
        self.config = self.processor.config
        rt = _runtime()
        if threads:
            set_threads(threads)
        path = Path(bundle) / self.artifact["file"]
        try:
            self.program = rt.load_program(path)
        except RuntimeError as e:
            raise EdgemmError(f"ExecuTorch cannot load {path}: {str(e).splitlines()[0][:200]}") from None
        missing = [m for m in METHODS if m not in self.program.method_names]
        if missing:
            raise EdgemmError(f"{path} is not an edgemm VLM program: method {missing[0]} is missing")
        try:
            self.methods = {m: self.program.load_method(m) for m in METHODS}
        except RuntimeError as e:
            raise EdgemmError(f"ExecuTorch cannot load the methods of {path} ({str(e).splitlines()[0][:200]}); "
                              "a missing kernel means this executorch build lacks an operator the program uses") from None
        self.metadata = {}
        for name in METADATA:
            if name in self.program.method_names:
                out = self.program.load_method(name).execute([])
                self.metadata[name] = out if name == "get_eos_ids" else out[0]
        self.max_context = int(self.metadata.get("get_max_context_len", self.config.text.max_position_embeddings))
        self.max_seq_len = int(self.metadata.get("get_max_seq_len", self.max_context))
        self.eos_ids = {int(e) for e in self.metadata.get("get_eos_ids", [self.config.eos_token_id])}
        self.vocab_size = int(self.metadata.get("get_vocab_size", self.config.text.vocab_size))
        self.num_visual_tokens = int(manifest.get("num_visual_tokens") or self.config.num_visual_tokens)

    # --------------------------------------------------------------------------------- the methods
    def encode_image(self, image):
        """-> visual tokens [1, K, D] (float32 torch tensor)."""
        px = self.torch.from_numpy(self.processor.images([image]))
        return self.methods["vision_encoder"].execute([px])[0]

    def embed(self, ids: list[int]):
        return self.methods["token_embedding"].execute([self.torch.tensor([ids], dtype=self.torch.long)])[0]

    def decode(self, embeds, pos: int):
        """text_decoder: embeds [1, T, D] at positions pos.. -> logits of the last position [1, V]."""
        return self.methods["text_decoder"].execute([embeds.contiguous(), self.torch.tensor([pos], dtype=self.torch.long)])[0]

    def splice(self, ids: list[int], img):
        """Prompt ids + visual tokens -> inputs_embeds [1, T', D] (visual tokens replace the image token)."""
        if img is None:
            return self.embed(ids)
        p = ids.index(self.config.image_token_id)
        text = self.embed(ids[:p] + ids[p + 1:])
        return self.torch.cat([text[:, :p], img.to(text.dtype), text[:, p:]], dim=1)

    # ---------------------------------------------------------------------------------- generation
    def tokens(self, image, prompt: str, options: GenerateOptions) -> Iterator[int]:
        """Yield the answer's token ids (EOS excluded); fill self.stats when done."""
        from edgemm.models.generation import GenerationStats, SamplingConfig, sample_next

        torch = self.torch
        cfg = SamplingConfig(**vars(options)).validate()
        gen = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
        stats = GenerationStats()
        ids = self.processor.encode_prompt(prompt, with_image=image is not None)
        n = len(ids) - 1 + self.num_visual_tokens if image is not None else len(ids)
        if n + cfg.max_new_tokens > self.max_context:
            raise EdgemmError(f"prompt of {n} tokens + {cfg.max_new_tokens} new tokens exceeds the context of {self.max_context}")
        if n > self.max_seq_len:
            raise EdgemmError(f"prompt of {n} tokens exceeds the program's max_seq_len {self.max_seq_len}")
        t0 = time.perf_counter()
        img = self.encode_image(image) if image is not None else None
        t1 = time.perf_counter()
        embeds = self.splice(ids, img)
        if int(embeds.shape[1]) != n:
            raise EdgemmError(f"the program's vision_encoder gave {img.shape[1]} visual tokens, the bundle says {self.num_visual_tokens}")
        logits = self.decode(embeds, 0)
        nxt = int(sample_next(logits, cfg, gen)[0])
        t2 = time.perf_counter()
        stats.image_encode_ms = (t1 - t0) * 1e3
        stats.prefill_ms = (t2 - t1) * 1e3
        stats.prefill_tokens = n
        stats.ttft_ms = (t2 - t0) * 1e3
        pos, steps = n, 1
        try:
            while nxt not in self.eos_ids:
                yield nxt
                if steps >= cfg.max_new_tokens:
                    break
                t3 = time.perf_counter()
                logits = self.decode(self.embed([nxt]), pos)
                nxt = int(sample_next(logits, cfg, gen)[0])
                stats.decode_ms += (time.perf_counter() - t3) * 1e3
                stats.decode_tokens += 1
                pos += 1
                steps += 1
        finally:
            self.stats = stats.to_dict()

    def stream(self, image, prompt: str, options: GenerateOptions) -> Iterator[str]:
        toks: list[int] = []
        text_so_far = ""
        for tok in self.tokens(image, prompt, options):
            toks.append(tok)
            text = self.processor.decode(toks)
            if len(text) > len(text_so_far) and not text.endswith("\ufffd"):
                yield text[len(text_so_far):] if text_so_far else text
                text_so_far = text

    def generate_batch(self, images, prompts: list[str], **options) -> list[str]:
        """One question at a time (the program is batch 1), each answer decoded from all its tokens
        (as the torch runtime's batch path does); stats summed over the batch."""
        opts = GenerateOptions(**options).validate()
        out, total = [], {}
        for i, p in enumerate(prompts):
            toks = list(self.tokens(None if images is None else images[i], p, opts))
            out.append(self.processor.decode(toks))
            for k, v in self.stats.items():
                total[k] = total.get(k, 0) + v
        if total:
            for k, t, ms in (("prefill_tok_s", "prefill_tokens", "prefill_ms"), ("decode_tok_s", "decode_tokens", "decode_ms")):
                total[k] = round(total[t] / (total[ms] / 1e3), 1) if total[ms] else 0.0
        self.stats = total
        return out


def open_bundle(path, manifest: dict, threads: int | None = None, **options) -> ExecuTorchSession:
    """Open an edgemm bundle's ExecuTorch program. Options: artifact (the .pte's file name in the bundle)."""
    unknown = set(options) - {"artifact"}
    if unknown:
        raise EdgemmError(f"unknown executorch runtime option(s): {', '.join(sorted(unknown))}")
    return ExecuTorchSession(Path(path), manifest, threads=threads, **options)


__all__ = ["open_bundle", "ExecuTorchSession"]
