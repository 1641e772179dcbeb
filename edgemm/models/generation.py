"""Greedy and sampled generation with a KV cache, batched, with timings and streaming."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from ..errors import EdgemmError
from .modeling import EdgeVLM, KVCache, expand_mask, positions_from_mask


@dataclass
class SamplingConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None

    def validate(self) -> "SamplingConfig":
        if self.max_new_tokens < 1:
            raise EdgemmError("max_new_tokens must be >= 1")
        if self.temperature < 0:
            raise EdgemmError("temperature must be >= 0")
        if self.top_k < 0:
            raise EdgemmError("top_k must be >= 0")
        if not 0 < self.top_p <= 1:
            raise EdgemmError("top_p must be in (0, 1]")
        return self


@dataclass
class GenerationStats:
    image_encode_ms: float = 0.0
    prefill_ms: float = 0.0
    prefill_tokens: int = 0
    decode_ms: float = 0.0
    decode_tokens: int = 0
    ttft_ms: float = 0.0  # image encode + prefill + first token

    @property
    def prefill_tok_s(self) -> float:
        return self.prefill_tokens / (self.prefill_ms / 1e3) if self.prefill_ms else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / (self.decode_ms / 1e3) if self.decode_ms else 0.0

    def to_dict(self) -> dict:
        return {
            "image_encode_ms": round(self.image_encode_ms, 3),
            "prefill_ms": round(self.prefill_ms, 3),
            "prefill_tokens": self.prefill_tokens,
            "prefill_tok_s": round(self.prefill_tok_s, 1),
            "decode_ms": round(self.decode_ms, 3),
            "decode_tokens": self.decode_tokens,
            "decode_tok_s": round(self.decode_tok_s, 1),
            "ttft_ms": round(self.ttft_ms, 3),
        }


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # per row, EOS excluded
    stats: GenerationStats = field(default_factory=GenerationStats)


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> next token ids [B]."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k:
        kth = logits.topk(min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already reach top_p (the first token always stays)
        drop = (probs.cumsum(-1) - probs) >= cfg.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def iter_generate(model: EdgeVLM, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                  attention_mask: torch.Tensor | None = None, sampling: SamplingConfig | None = None,
                  stats: GenerationStats | None = None, eos_token_id: int | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row [B] step by step; rows that hit EOS yield EOS afterwards."""
    cfg = (sampling or SamplingConfig()).validate()
    stats = stats if stats is not None else GenerationStats()
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    gen = None
    if cfg.seed is not None:
        gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    image_embeds = model.encode_image(pixel_values).embeds if pixel_values is not None else None
    t1 = time.perf_counter()
    embeds = model.merge_image(input_ids, image_embeds)
    mask = expand_mask(input_ids, attention_mask, model.config.image_token_id, embeds.shape[1])
    max_pos = model.config.text.max_position_embeddings
    if embeds.shape[1] + cfg.max_new_tokens > max_pos:
        raise EdgemmError(f"prompt of {embeds.shape[1]} tokens + {cfg.max_new_tokens} new tokens exceeds the context of {max_pos}")
    pos = positions_from_mask(mask)
    cache = KVCache(model.config.text.num_layers)
    logits = model.text(embeds, pos, mask, cache, logits_to_keep=1)[:, -1]
    nxt = sample_next(logits, cfg, gen)
    t2 = time.perf_counter()
    stats.image_encode_ms = (t1 - t0) * 1e3
    stats.prefill_ms = (t2 - t1) * 1e3
    stats.prefill_tokens = int(embeds.shape[1])
    stats.ttft_ms = (t2 - t0) * 1e3
    done = nxt == eos
    yield nxt
    last_pos = pos[:, -1:]
    steps = 1
    while steps < cfg.max_new_tokens and not bool(done.all()):
        t3 = time.perf_counter()
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        last_pos = last_pos + 1
        logits = model.text(model.text.embed_tokens(nxt[:, None]), last_pos, mask, cache)[:, -1]
        nxt = torch.where(done, torch.full_like(nxt, eos), sample_next(logits, cfg, gen))
        stats.decode_ms += (time.perf_counter() - t3) * 1e3
        stats.decode_tokens += 1
        done = done | (nxt == eos)
        steps += 1
        yield nxt


def generate(model: EdgeVLM, input_ids, pixel_values=None, attention_mask=None, sampling: SamplingConfig | None = None,
             on_token: Callable[[int, int], None] | None = None, eos_token_id: int | None = None) -> GenerationResult:
    """Generate for a batch; `on_token(row, token_id)` streams tokens as they come (EOS not included)."""
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    stats = GenerationStats()
    b = input_ids.shape[0]
    out: list[list[int]] = [[] for _ in range(b)]
    finished = [False] * b
    with torch.inference_mode():
        for step in iter_generate(model, input_ids, pixel_values, attention_mask, sampling, stats, eos):
            for i, tok in enumerate(step.tolist()):
                if finished[i]:
                    continue
                if tok == eos:
                    finished[i] = True
                    continue
                out[i].append(tok)
                if on_token is not None:
                    on_token(i, tok)
    return GenerationResult(out, stats)
