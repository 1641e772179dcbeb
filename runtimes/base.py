"""The one small interface every runtime adapter implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterator

from edgemm.errors import EdgemmError


@dataclass
class GenerateOptions:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def validate(self) -> "GenerateOptions":
        if self.max_new_tokens < 1:
            raise EdgemmError("max_new_tokens must be >= 1")
        if self.temperature < 0:
            raise EdgemmError("temperature must be >= 0")
        if self.top_k < 0:
            raise EdgemmError("top_k must be >= 0")
        if not 0 < self.top_p <= 1:
            raise EdgemmError("top_p must be in (0, 1]")
        return self


class Session(ABC):
    """A loaded model in one runtime.

    `generate(image, prompt)` answers one question (image may be None for text-only);
    `generate(..., stream=True)` yields text pieces as tokens arrive; `generate_batch` answers many
    (runtimes that can batch override it). `stats` holds the timings of the last call:
    image_encode_ms, prefill_ms, prefill_tokens, prefill_tok_s, decode_ms, decode_tokens,
    decode_tok_s, ttft_ms.
    """

    runtime: str = "?"
    stats: dict

    def __init__(self):
        self.stats = {}

    @abstractmethod
    def stream(self, image, prompt: str, options: GenerateOptions) -> Iterator[str]:
        """Yield the answer's text pieces; fill self.stats when done."""

    def generate(self, image, prompt: str, stream: bool = False, **options):
        opts = GenerateOptions(**options).validate()
        it = self.stream(image, prompt, opts)
        return it if stream else "".join(it).strip()

    def generate_batch(self, images, prompts: list[str], **options) -> list[str]:
        return [self.generate(im, p, **options) for im, p in zip(images, prompts)]

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def bundle_processor(bundle, manifest: dict):
    """The Processor (tokenizer, template, image preprocessing) a bundle describes; no torch needed."""
    from pathlib import Path

    from edgemm.models.config import VLMConfig
    from edgemm.processor import Processor

    cfg = VLMConfig.from_dict(manifest["model"]["config"])
    return Processor.from_file(Path(bundle) / manifest["tokenizer"]["file"], cfg)
