"""Prompt formatting, tokenization and image preprocessing: the model's own, shared by every runtime."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tokenizers import Tokenizer

from .errors import EdgemmError
from .models.config import VisionConfig, VLMConfig

IMAGE_TOKEN = "<image>"


def load_image(src) -> Image.Image:
    """A path, PIL image or HxWx3 uint8 array -> RGB PIL image, with one-line errors."""
    if isinstance(src, Image.Image):
        return src.convert("RGB")
    if isinstance(src, np.ndarray):
        if src.ndim != 3 or src.shape[2] not in (3, 4) or src.dtype != np.uint8:
            raise EdgemmError(f"an image array must be HxWx3 uint8, got {src.shape} {src.dtype}")
        return Image.fromarray(src[:, :, :3], "RGB")
    path = Path(os.fspath(src))
    if not path.exists():
        raise EdgemmError(f"image not found: {path}")
    if path.is_dir():
        raise EdgemmError(f"expected an image file, got a directory: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise EdgemmError(f"not a readable image: {path} ({type(e).__name__})") from None


def preprocess_image(src, cfg: VisionConfig) -> np.ndarray:
    """-> float32 [3, S, S]: resize per cfg.image_resize (bicubic), scale to [0, 1], normalize."""
    im = load_image(src)
    s = cfg.image_size
    if im.size != (s, s):
        w, h = im.size
        if cfg.image_resize == "pad" and w != h:
            side = max(w, h)
            fill = tuple(int(round(m * 255)) for m in cfg.image_mean)
            canvas = Image.new("RGB", (side, side), fill)
            canvas.paste(im, ((side - w) // 2, (side - h) // 2))
            im = canvas
        elif cfg.image_resize == "crop" and w != h:
            scale = s / min(w, h)
            im = im.resize((max(s, round(w * scale)), max(s, round(h * scale))), Image.BICUBIC)
            w, h = im.size
            left, top = (w - s) // 2, (h - s) // 2
            im = im.crop((left, top, left + s, top + s))
        if im.size != (s, s):
            im = im.resize((s, s), Image.BICUBIC)
    x = np.asarray(im, dtype=np.float32) / 255.0
    x = (x - np.asarray(cfg.image_mean, np.float32)) / np.asarray(cfg.image_std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


class Processor:
    """Turns (image, question) into model inputs and token ids back into text."""

    def __init__(self, tokenizer: Tokenizer, config: VLMConfig):
        self.tokenizer = tokenizer
        self.config = config
        if tokenizer.get_vocab_size(with_added_tokens=True) > config.text.vocab_size:
            raise EdgemmError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the model only {config.text.vocab_size}")
        # The template writes "<image>"; the tokenizer's own image token (usually also "<image>") replaces it.
        self.image_token = tokenizer.id_to_token(config.image_token_id)
        if self.image_token is None or tokenizer.encode(self.image_token, add_special_tokens=False).ids != [config.image_token_id]:
            raise EdgemmError(f"the tokenizer has no special token with config.image_token_id {config.image_token_id}")

    @classmethod
    def from_file(cls, path, config: VLMConfig) -> "Processor":
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise EdgemmError(f"cannot read tokenizer {path}: {str(e).splitlines()[0][:200]}") from None
        return cls(tok, config)

    def prompt_text(self, question: str) -> str:
        if not isinstance(question, str) or not question.strip():
            raise EdgemmError("the prompt is empty")
        if IMAGE_TOKEN in question or self.image_token in question:
            raise EdgemmError(f"the prompt may not contain {IMAGE_TOKEN}: the image goes where the template puts it")
        return self.config.prompt_template.replace("{question}", question.strip())

    def encode_prompt(self, question: str, with_image: bool = True) -> list[int]:
        text = self.prompt_text(question)
        if not with_image:
            text = text.replace(IMAGE_TOKEN + "\n", "").replace(IMAGE_TOKEN, "")
        text = text.replace(IMAGE_TOKEN, self.image_token)
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return [self.config.bos_token_id] + ids

    def encode_answer(self, answer: str) -> list[int]:
        """Target ids of an answer: ' answer' then EOS (the template ends with 'ASSISTANT:')."""
        return self.tokenizer.encode(" " + answer.strip(), add_special_tokens=False).ids + [self.config.eos_token_id]

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    def batch(self, questions: list[str], with_image: bool = True):
        """Left-padded ids and mask as int64 numpy arrays [B, T]."""
        seqs = [self.encode_prompt(q, with_image) for q in questions]
        t = max(len(s) for s in seqs)
        ids = np.full((len(seqs), t), self.config.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(seqs), t), dtype=np.int64)
        for i, s in enumerate(seqs):
            ids[i, t - len(s):] = s
            mask[i, t - len(s):] = 1
        return ids, mask

    def images(self, images) -> np.ndarray:
        return np.stack([preprocess_image(im, self.config.vision) for im in images])
