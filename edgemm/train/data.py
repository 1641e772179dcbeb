"""Training batches for the shapes task: many questions about one image in one row, loss on answers.

A row is packed: the image prompt's shared prefix (BOS, "USER: ", the image) once, then every question
turn ("{question} ASSISTANT: answer EOS"). A block mask lets each turn attend to the prefix and to
itself only, and each turn's positions continue right after the prefix. So every turn is computed
exactly as the single-turn prompt a user sends (eval and inference), and no turn can read another
turn's answer: in a plain multi-turn conversation an earlier "is the red circle on the left ...?"
gives away a later "what shape is the red object?", and the model learns to copy instead of to look.

Each step's batch is drawn from `numpy.random.default_rng([seed, step, rank])`, so a run is
reproducible, resumable without saving RNG state, and data-parallel ranks see different data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..data import shapes
from ..processor import Processor, preprocess_image

IGNORE = -100


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] right-padded: the shared prefix (one image token), then the turns
    labels: torch.Tensor  # [B, T] answer tokens (and their EOS), IGNORE elsewhere
    pixel_values: torch.Tensor  # [B, 3, S, S]
    segments: torch.Tensor  # [B, T] 0 = shared prefix, j >= 1 = turn j, -1 = padding
    vision_targets: torch.Tensor | None = None  # [B, n_targets] for vision pre-training
    patch_targets: torch.Tensor | None = None  # [B, P, N_PATCH_TARGETS] for vision pre-training


def packed_ids(processor: Processor, qas: list[tuple[str, str, str]]) -> tuple[list[int], list[int], list[int]]:
    """(ids, labels, segments) of one packed row: the single-turn prompt's tokens up to and including
    the image token once, then per question the rest of its single-turn prompt and its answer."""
    image = processor.config.image_token_id
    ids: list[int] = []
    labels: list[int] = []
    segs: list[int] = []
    for j, (q, a, _t) in enumerate(qas, start=1):
        prompt = processor.encode_prompt(q)
        cut = prompt.index(image) + 1
        if not ids:
            ids, labels, segs = prompt[:cut], [IGNORE] * cut, [0] * cut
        elif prompt[:cut] != ids[:cut]:  # the template puts the image before the question, so never
            raise ValueError("the prompt template's text before the image depends on the question")
        ans = processor.encode_answer(a)
        turn = prompt[cut:] + ans
        ids += turn
        labels += [IGNORE] * (len(turn) - len(ans)) + ans
        segs += [j] * len(turn)
    return ids, labels, segs


def packed_attention(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [B, 1, T, T] bool, position ids [B, T]) of packed rows given per-token segments of the
    merged sequence: causal, a turn sees the prefix and itself, positions restart after the prefix."""
    b, t = segments.shape
    idx = torch.arange(t, device=segments.device)
    sq, sk = segments[:, :, None], segments[:, None, :]
    mask = (idx[None, None, :] <= idx[None, :, None]) & ((sk == 0) | (sk == sq)) & (sk >= 0)
    mask = mask | torch.eye(t, dtype=torch.bool, device=segments.device)[None]  # padding sees itself
    first = torch.ones_like(segments, dtype=torch.bool)
    first[:, 1:] = segments[:, 1:] != segments[:, :-1]
    start = torch.cummax(torch.where(first, idx[None], 0), dim=1).values
    prefix = (segments == 0).sum(1, keepdim=True)
    pos = torch.where(segments == 0, idx[None], prefix + idx[None] - start)
    return mask[:, None], pos


def packed_forward(model, batch: Batch, image_embeds: torch.Tensor, return_hidden: bool = False):
    """The decoder over a packed batch (image_embeds [B, K, D] already projected): logits [B, T', V]
    (and final hidden states) of the merged sequence, where the image token became K visual tokens."""
    embeds = model.merge_image(batch.input_ids, image_embeds)
    k = image_embeds.shape[1]
    segs = spread_image(batch.segments, batch.input_ids, model.config.image_token_id, k, 0)
    mask, pos = packed_attention(segs)
    return model.text(embeds, pos, mask, return_hidden=return_hidden)


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


# Dense targets: what each patch of the grid shows. The [CLS] targets say *whether* a (color, shape)
# pair is left or right; these say *where* each object is, so the patch features handed to the LLM
# carry, on the object's own patches, its identity and side. A question about one object then reads
# from those patches; without them the LLM has to bind a pair to a location across 2-4 objects.
N_PATCH_TARGETS = len(PAIRS) * 2


def patch_targets(scene, grid: int, patch: int) -> np.ndarray:
    """[grid*grid (raster order), pair x {left, right}]: 1 where the object's box overlaps the patch."""
    t = np.zeros((grid, grid, N_PATCH_TARGETS), np.float32)
    for o in scene:
        j = 2 * PAIRS.index((o.color, o.shape)) + int(o.center_x >= shapes.CANVAS / 2)
        c0, c1 = o.x // patch, (o.x + o.size - 1) // patch
        r0, r1 = o.y // patch, (o.y + o.size - 1) // patch
        t[r0:r1 + 1, c0:c1 + 1, j] = 1
    return t.reshape(grid * grid, N_PATCH_TARGETS)


def make_batch(processor: Processor, batch_size: int, seed: int, step: int, rank: int = 0,
               max_questions: int = 12) -> Batch:
    rng = np.random.default_rng([seed, step, rank])
    vcfg = processor.config.vision
    rows, pix, vt, pt = [], [], [], []
    grid = vcfg.image_size // vcfg.patch_size
    for _ in range(batch_size):
        im, qas, scene = shapes.training_example(rng, max_questions)
        rows.append(packed_ids(processor, qas))
        pix.append(preprocess_image(im, vcfg))
        vt.append(vision_targets(scene))
        pt.append(patch_targets(scene, grid, shapes.CANVAS // grid))
    t = max(len(r[0]) for r in rows)
    ids = np.full((batch_size, t), processor.config.pad_token_id, np.int64)
    lab = np.full((batch_size, t), IGNORE, np.int64)
    seg = np.full((batch_size, t), -1, np.int64)
    for i, (r, l, g) in enumerate(rows):
        ids[i, : len(r)] = r
        lab[i, : len(l)] = l
        seg[i, : len(g)] = g
    return Batch(torch.from_numpy(ids), torch.from_numpy(lab), torch.from_numpy(np.stack(pix)), torch.from_numpy(seg),
                 torch.from_numpy(np.stack(vt)), torch.from_numpy(np.stack(pt)))


def spread_image(x: torch.Tensor, input_ids: torch.Tensor, image_token_id: int, k: int, fill: int) -> torch.Tensor:
    """Per-token values [B, T] aligned with the merged sequence: the image token's entry becomes k
    entries of `fill`."""
    rows = []
    for i in range(x.shape[0]):
        p = int((input_ids[i] == image_token_id).int().argmax())
        rows.append(torch.cat([x[i, :p], x.new_full((k,), fill), x[i, p + 1:]]))
    return torch.stack(rows)


def merged_labels(labels: torch.Tensor, input_ids: torch.Tensor, image_token_id: int, k: int) -> torch.Tensor:
    """Labels aligned with the merged sequence (the image token expands to k visual positions)."""
    return spread_image(labels, input_ids, image_token_id, k, IGNORE)


def visual_positions(input_ids: torch.Tensor, image_token_id: int, k: int) -> torch.Tensor:
    """[B, k] indices of the visual tokens in the merged sequence."""
    p = (input_ids == image_token_id).int().argmax(1)
    return p[:, None] + torch.arange(k)[None, :]
