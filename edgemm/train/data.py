"""Training batches for the shapes task: multi-turn conversations about one image, loss on answers.

Each step's batch is drawn from `numpy.random.default_rng([seed, step, rank])`, so a run is
reproducible, resumable without saving RNG state, and data-parallel ranks see different data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..data import shapes
from ..processor import IMAGE_TOKEN, Processor, preprocess_image

IGNORE = -100


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] right-padded, one image token per row
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T] answer tokens (and their EOS), IGNORE elsewhere
    pixel_values: torch.Tensor  # [B, 3, S, S]
    vision_targets: torch.Tensor | None = None  # [B, n_targets] for vision pre-training


def conversation_ids(processor: Processor, qas: list[tuple[str, str, str]]) -> tuple[list[int], list[int]]:
    """Token ids and labels of a multi-turn conversation in the model's template.

    Turn 1 is exactly the single-turn prompt (`Processor.encode_prompt`) followed by the answer; later
    turns repeat the template without the image.
    """
    cfg = processor.config
    ids: list[int] = []
    labels: list[int] = []
    for i, (q, a, _t) in enumerate(qas):
        if i == 0:
            prompt = processor.encode_prompt(q)
        else:
            text = cfg.prompt_template.replace(IMAGE_TOKEN + "\n", "").replace(IMAGE_TOKEN, "").replace("{question}", q)
            prompt = processor.tokenizer.encode(text, add_special_tokens=False).ids
        ans = processor.encode_answer(a)
        ids += prompt + ans
        labels += [IGNORE] * len(prompt) + ans
    return ids, labels


# What the vision encoder is pre-trained to predict from its [CLS] token (as a classifier ViT is):
# presence of each (color, shape) pair, its left/right side, the object count and the count per shape.
PAIRS = [(c, s) for c in shapes.COLORS for s in shapes.SHAPES]
N_VISION_TARGETS = len(PAIRS) * 2 + 4 + len(shapes.SHAPES) * 5


def vision_targets(scene) -> np.ndarray:
    """Multi-hot [presence(12) | pair on the right(12) | count one-hot(4) | per-shape count one-hot(3x5)]."""
    t = np.zeros(N_VISION_TARGETS, np.float32)
    for o in scene:
        j = PAIRS.index((o.color, o.shape))
        t[j] = 1
        if o.center_x >= shapes.CANVAS / 2:
            t[len(PAIRS) + j] = 1
    t[2 * len(PAIRS) + len(scene) - 1] = 1
    base = 2 * len(PAIRS) + 4
    for k, s in enumerate(shapes.SHAPES):
        t[base + 5 * k + sum(o.shape == s for o in scene)] = 1
    return t


def make_batch(processor: Processor, batch_size: int, seed: int, step: int, rank: int = 0,
               max_questions: int = 8) -> Batch:
    rng = np.random.default_rng([seed, step, rank])
    vcfg = processor.config.vision
    rows, pix, vt = [], [], []
    for _ in range(batch_size):
        im, qas, scene = shapes.training_example(rng, max_questions)
        rows.append(conversation_ids(processor, qas))
        pix.append(preprocess_image(im, vcfg))
        vt.append(vision_targets(scene))
    t = max(len(r[0]) for r in rows)
    ids = np.full((batch_size, t), processor.config.pad_token_id, np.int64)
    lab = np.full((batch_size, t), IGNORE, np.int64)
    mask = np.zeros((batch_size, t), np.int64)
    for i, (r, l) in enumerate(rows):
        ids[i, : len(r)] = r
        lab[i, : len(l)] = l
        mask[i, : len(r)] = 1
    return Batch(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(lab),
                 torch.from_numpy(np.stack(pix)), torch.from_numpy(np.stack(vt)))


def merged_labels(labels: torch.Tensor, input_ids: torch.Tensor, image_token_id: int, k: int) -> torch.Tensor:
    """Labels aligned with the merged sequence (the image token expands to k visual positions)."""
    rows = []
    for i in range(labels.shape[0]):
        p = int((input_ids[i] == image_token_id).int().argmax())
        rows.append(torch.cat([labels[i, :p], labels.new_full((k,), IGNORE), labels[i, p + 1:]]))
    return torch.stack(rows)


def visual_positions(input_ids: torch.Tensor, image_token_id: int, k: int) -> torch.Tensor:
    """[B, k] indices of the visual tokens in the merged sequence."""
    p = (input_ids == image_token_id).int().argmax(1)
    return p[:, None] + torch.arange(k)[None, :]
