"""The torch reference runtime: EdgeVLM in eager PyTorch (batched, the yardstick for every other runtime)."""

from __future__ import annotations

from typing import Iterator

import torch

from edgemm.models.checkpoint import LoadedModel
from edgemm.models.generation import SamplingConfig, generate, iter_generate, GenerationStats

from .base import GenerateOptions, Session


class TorchSession(Session):
    runtime = "torch"

    def __init__(self, loaded: LoadedModel, threads: int | None = None):
        super().__init__()
        if threads:
            torch.set_num_threads(threads)
        self.loaded = loaded
        self.model = loaded.model.eval()
        self.processor = loaded.processor

    def _inputs(self, images, prompts):
        with_image = images is not None and all(im is not None for im in images)
        ids, mask = self.processor.batch(prompts, with_image=with_image)
        px = torch.from_numpy(self.processor.images(images)) if with_image else None
        return torch.from_numpy(ids), torch.from_numpy(mask), px

    def stream(self, image, prompt: str, options: GenerateOptions) -> Iterator[str]:
        ids, mask, px = self._inputs(None if image is None else [image], [prompt])
        stats = GenerationStats()
        sampling = SamplingConfig(**vars(options))
        eos = self.model.config.eos_token_id
        toks: list[int] = []
        text_so_far = ""
        with torch.inference_mode():
            for step in iter_generate(self.model, ids, px, mask, sampling, stats):
                tok = int(step[0])
                if tok == eos:
                    break
                toks.append(tok)
                text = self.processor.decode(toks)
                if len(text) > len(text_so_far) and not text.endswith("\ufffd"):
                    yield text[len(text_so_far):] if text_so_far else text
                    text_so_far = text
        self.stats = stats.to_dict()

    def generate_batch(self, images, prompts, batch_size: int = 64, **options) -> list[str]:
        opts = GenerateOptions(**options).validate()
        out: list[str] = []
        total = GenerationStats()
        for i in range(0, len(prompts), batch_size):
            ims = None if images is None else images[i:i + batch_size]
            ids, mask, px = self._inputs(ims, prompts[i:i + batch_size])
            res = generate(self.model, ids, px, mask, SamplingConfig(**vars(opts)))
            out += [self.processor.decode(t) for t in res.tokens]
            for k in ("image_encode_ms", "prefill_ms", "decode_ms", "ttft_ms"):
                setattr(total, k, getattr(total, k) + getattr(res.stats, k))
            total.prefill_tokens += res.stats.prefill_tokens * ids.shape[0]
            total.decode_tokens += res.stats.decode_tokens * ids.shape[0]
        self.stats = total.to_dict()
        return out
