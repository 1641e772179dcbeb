"""Evaluation datasets: a directory with images/*.png and data.jsonl, or `shapes:N:SEED` on the fly."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image

from ..errors import EdgemmError
from ..fileio import atomic_dir
from . import shapes


@dataclass
class Record:
    image: str  # path relative to the dataset directory (or a synthetic name)
    question: str
    answer: str
    type: str
    pil: Image.Image | None = None  # the image itself for on-the-fly datasets

    def to_json(self) -> dict:
        return {"image": self.image, "question": self.question, "answer": self.answer, "type": self.type}


@dataclass
class Dataset:
    name: str
    root: Path | None
    records: list[Record]

    def image(self, r: Record):
        return r.pil if r.pil is not None else self.root / r.image

    def __len__(self) -> int:
        return len(self.records)


def write_shapes(out: str | Path, n: int, seed: int, progress: Callable[[int], None] | None = None) -> Path:
    """Write a shapes dataset directory atomically."""
    if n < 1:
        raise EdgemmError("--n must be >= 1")
    out = Path(out)
    with atomic_dir(out) as tmp:
        (tmp / "images").mkdir()
        with open(tmp / "data.jsonl", "w") as f:
            for i, im, q, a, t in shapes.generate(n, seed):
                rel = f"images/{i + 1:06d}.png"
                im.save(tmp / rel, format="PNG")
                f.write(json.dumps({"image": rel, "question": q, "answer": a, "type": t}) + "\n")
                if progress:
                    progress(1)
        (tmp / "README.md").write_text(
            f"shapes task spec v{shapes.SPEC_VERSION}, n={n}, seed={seed}; written by `edgemm data shapes`.\n")
    return out


def shapes_on_the_fly(n: int, seed: int) -> Dataset:
    recs = [Record(f"shapes/{i + 1:06d}", q, a, t, im) for i, im, q, a, t in shapes.generate(n, seed)]
    return Dataset(f"shapes:{n}:{seed}", None, recs)


def load_dataset(spec: str, limit: int | None = None) -> Dataset:
    """`shapes:N:SEED` or a dataset directory."""
    if spec.startswith("shapes:"):
        parts = spec.split(":")
        try:
            if len(parts) != 3:
                raise ValueError
            n, seed = int(parts[1]), int(parts[2])
        except ValueError:
            raise EdgemmError(f"bad dataset spec {spec!r}: expected shapes:N:SEED") from None
        if n < 1:
            raise EdgemmError(f"bad dataset spec {spec!r}: N must be >= 1")
        if limit:
            n = min(n, limit)
        return shapes_on_the_fly(n, seed)
    root = Path(spec)
    if not root.exists():
        raise EdgemmError(f"dataset not found: {root}")
    jl = root / "data.jsonl"
    if not jl.is_file():
        raise EdgemmError(f"not a dataset directory (no data.jsonl): {root}")
    recs = []
    with open(jl) as f:
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                r = Record(str(d["image"]), str(d["question"]), str(d["answer"]), str(d.get("type", "all")))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise EdgemmError(f"{jl}:{ln}: bad record ({type(e).__name__}: {e})") from None
            if not (root / r.image).is_file():
                raise EdgemmError(f"{jl}:{ln}: image not found: {r.image}")
            recs.append(r)
            if limit and len(recs) >= limit:
                break
    if not recs:
        raise EdgemmError(f"dataset {root} has no records")
    return Dataset(str(root), root, recs)
