"""Exact-match evaluation of a runtime session on a dataset (answers lowercased and stripped)."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

from .data.dataset import Dataset
from .fileio import atomic_file
from .progress import progress


def normalize(text: str) -> str:
    return text.strip().lower()


def evaluate(session, dataset: Dataset, model_name: str, batch_size: int = 64, quiet: bool = False,
             predictions: str | Path | None = None, max_new_tokens: int = 8) -> dict:
    """Greedy answers for every record; returns the JSON-able report.

    `predictions` writes one JSON line per record: the record plus "prediction"."""
    recs = dataset.records
    preds: list[str] = []
    t0 = time.perf_counter()
    with progress(len(recs), f"eval {model_name}", quiet=quiet) as bar:
        for i in range(0, len(recs), batch_size):
            chunk = recs[i:i + batch_size]
            preds += session.generate_batch([dataset.image(r) for r in chunk], [r.question for r in chunk],
                                            max_new_tokens=max_new_tokens)
            bar.advance(len(chunk))
    wall = time.perf_counter() - t0
    hits: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    correct = 0
    for r, p in zip(recs, preds):
        ok = normalize(p) == normalize(r.answer)
        correct += ok
        hits[r.type][0] += ok
        hits[r.type][1] += 1
    if predictions:
        with atomic_file(predictions, "w") as f:
            for r, p in zip(recs, preds):
                f.write(json.dumps({**r.to_json(), "prediction": p}) + "\n")
    return {
        "model": model_name,
        "runtime": getattr(session, "runtime", "?"),
        "data": dataset.name,
        "n": len(recs),
        "accuracy": correct / len(recs),
        "per_type": {t: h[0] / h[1] for t, h in sorted(hits.items())},
        "wall_s": round(wall, 2),
        "questions_per_s": round(len(recs) / wall, 1) if wall else None,
    }
