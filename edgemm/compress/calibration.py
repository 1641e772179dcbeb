"""Calibration forward loops for EdgeVLM: callables `forward_loop(model)` that run the model on a fixed
set of calibration inputs (as NVIDIA ModelOpt's `forward_loop`).

Each record becomes the model's own prompt (image + question, the template every runtime uses)
followed by its answer, teacher-forced, so the calibration activations cover the prompt, the visual
tokens and the answer tokens. The batches are built once; every call feeds the same batches in the
same order (MaskLLM relies on it), with autograd left to the caller (GPTQ and friends run the loop under
torch.no_grad(), MaskLLM with gradients).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..data import CALIBRATION_SEED
from ..errors import EdgemmError


class CalibrationLoop:
    """A forward_loop over precomputed batches; `len()` is the number of samples.

    `loss_masks[i]` (bool [B, T_out], one per batch, aligned with the model's output positions) marks
    the positions whose next token is an answer token: what a training-based method (MaskLLM) may
    restrict its objective to."""

    def __init__(self, batches, name: str, loss_masks=None):
        self.batches = batches  # list of (input_ids, attention_mask, pixel_values) torch tensors
        self.name = name
        self.loss_masks = loss_masks

    def __len__(self) -> int:
        return sum(int(b[0].shape[0]) for b in self.batches)

    def __call__(self, model) -> None:
        for ids, mask, px in self.batches:
            model(ids, px, mask)

    def __repr__(self) -> str:
        return f"CalibrationLoop({self.name!r}, {len(self)} samples, {len(self.batches)} batches)"


def records_forward_loop(processor, records, images, batch_size: int = 16, name: str = "calibration") -> CalibrationLoop:
    """Batches of (prompt + answer) for `records` (objects with .question and .answer) and their images."""
    import torch

    if batch_size < 1:
        raise EdgemmError("calibration batch size must be >= 1")
    if not records:
        raise EdgemmError("calibration needs at least one record")
    batches, loss_masks = [], []
    pad = processor.config.pad_token_id
    k = processor.config.num_visual_tokens
    for i in range(0, len(records), batch_size):
        recs, ims = records[i:i + batch_size], images[i:i + batch_size]
        prompts = [processor.encode_prompt(r.question) for r in recs]
        answers = [processor.encode_answer(r.answer) for r in recs]
        seqs = [p + a for p, a in zip(prompts, answers)]
        t = max(len(s) for s in seqs)
        ids = np.full((len(seqs), t), pad, np.int64)
        mask = np.zeros((len(seqs), t), np.int64)
        lm = np.zeros((len(seqs), t - 1 + k), bool)
        for j, s in enumerate(seqs):  # right padding, as in training
            ids[j, :len(s)] = s
            mask[j, :len(s)] = 1
            a0 = len(prompts[j]) - 1 + k  # first answer token in the merged sequence (image token -> k tokens)
            lm[j, a0 - 1:a0 - 1 + len(answers[j])] = True  # the logits that predict the answer and its EOS
        px = processor.images(ims)
        batches.append((torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(px)))
        loss_masks.append(torch.from_numpy(lm))
    return CalibrationLoop(batches, name, loss_masks)


def dataset_forward_loop(processor, dataset_spec, n: int | None = None, batch_size: int = 16) -> CalibrationLoop:
    """A forward_loop over a dataset in the eval format: a directory with data.jsonl + images, a
    `shapes:N:SEED` spec, or a loaded edgemm.data.Dataset. `n` keeps the first n records."""
    from ..data import load_dataset
    from ..data.dataset import Dataset

    if n is not None and n < 1:
        raise EdgemmError("the number of calibration samples must be >= 1")
    ds = dataset_spec if isinstance(dataset_spec, Dataset) else load_dataset(str(dataset_spec), n)
    recs = ds.records[:n] if n else ds.records
    return records_forward_loop(processor, recs, [ds.image(r) for r in recs], batch_size, ds.name)


def shapes_forward_loop(processor, n: int = 128, seed: int = CALIBRATION_SEED, batch_size: int = 16) -> CalibrationLoop:
    """The default calibration set: n shapes-task questions drawn with the calibration seed (555),
    disjoint from the held-out (777) and agreement (778) splits."""
    if n < 1:
        raise EdgemmError("the number of calibration samples must be >= 1")
    return dataset_forward_loop(processor, f"shapes:{n}:{seed}", None, batch_size)


ForwardLoop = Callable[[object], None]
