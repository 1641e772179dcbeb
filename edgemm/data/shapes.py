"""The "shapes" demo task, spec v1 (see docs/shapes.md): seeded, deterministic scenes and questions.

Everything here is derived from `numpy.random.default_rng(seed)` (PCG64), whose stream is the same on
every platform, and drawn with Pillow's ImageDraw, so anyone can regenerate the same data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SPEC_VERSION = 1
CANVAS = 64
BACKGROUND = (255, 255, 255)
SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
}
NUMBERS = ("zero", "one", "two", "three", "four")
TYPES = ("color", "shape", "count_shape", "count_all", "exists", "position")
MIN_SIZE, MAX_SIZE, MIN_GAP = 12, 20, 2
POSITION_MARGIN = 6


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    x: int  # left column of the bounding box
    y: int  # top row
    size: int  # side of the square box in pixels: it covers columns x .. x+size-1

    @property
    def center_x(self) -> float:
        return self.x + self.size / 2


def _apart(a: Obj, b: Obj) -> bool:
    """Boxes do not overlap and leave at least MIN_GAP empty pixels between them on some axis."""
    gap_x = max(b.x - (a.x + a.size), a.x - (b.x + b.size))
    gap_y = max(b.y - (a.y + a.size), a.y - (b.y + b.size))
    return gap_x >= MIN_GAP or gap_y >= MIN_GAP


def sample_scene(rng: np.random.Generator) -> list[Obj]:
    """1-4 objects; each draw: size, x, y, shape, color (in that order); a box that does not fit
    apart from the ones placed is redrawn (all five values), up to 100 times, then the scene restarts."""
    while True:
        n = int(rng.integers(1, 5))
        objs: list[Obj] = []
        tries = 0
        while len(objs) < n and tries < 100:
            size = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
            x = int(rng.integers(0, CANVAS - size + 1))
            y = int(rng.integers(0, CANVAS - size + 1))
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            color = list(COLORS)[int(rng.integers(len(COLORS)))]
            o = Obj(shape, color, x, y, size)
            tries += 1
            if all(_apart(o, p) for p in objs):
                objs.append(o)
                tries = 0
        if len(objs) == n:
            return objs


def render(scene: list[Obj]) -> Image.Image:
    im = Image.new("RGB", (CANVAS, CANVAS), BACKGROUND)
    d = ImageDraw.Draw(im)
    for o in scene:
        x0, y0, x1, y1 = o.x, o.y, o.x + o.size - 1, o.y + o.size - 1
        fill = COLORS[o.color]
        if o.shape == "circle":
            d.ellipse([x0, y0, x1, y1], fill=fill)
        elif o.shape == "square":
            d.rectangle([x0, y0, x1, y1], fill=fill)
        else:
            d.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    return im


def candidates(scene: list[Obj]) -> dict[str, list[tuple[str, str]]]:
    """Every valid (question, answer) of each type for a scene, in a fixed order."""
    out: dict[str, list[tuple[str, str]]] = {t: [] for t in TYPES}
    for s in SHAPES:
        objs = [o for o in scene if o.shape == s]
        if len(objs) == 1:
            out["color"].append((f"what color is the {s}?", objs[0].color))
    for c in COLORS:
        objs = [o for o in scene if o.color == c]
        if len(objs) == 1:
            out["shape"].append((f"what shape is the {c} object?", objs[0].shape))
    for s in SHAPES:
        out["count_shape"].append((f"how many {s}s are there?", NUMBERS[sum(o.shape == s for o in scene)]))
    out["count_all"].append(("how many objects are there?", NUMBERS[len(scene)]))
    for c in COLORS:
        for s in SHAPES:
            present = any(o.color == c and o.shape == s for o in scene)
            out["exists"].append((f"is there a {c} {s}?", "yes" if present else "no"))
    for c in COLORS:
        for s in SHAPES:
            objs = [o for o in scene if o.color == c and o.shape == s]
            if len(objs) == 1 and abs(objs[0].center_x - CANVAS / 2) >= POSITION_MARGIN:
                side = "left" if objs[0].center_x < CANVAS / 2 else "right"
                out["position"].append((f"is the {c} {s} on the left or the right?", side))
    return out


def pick_question(rng: np.random.Generator, qtype: str, cands: dict) -> tuple[str, str] | None:
    """One question of `qtype` for a scene, or None when the type does not apply.

    `exists` first draws the answer (yes/no, even odds) so both answers are equally common, then a
    pair uniformly among those with that answer; the other types draw uniformly among candidates."""
    pool = cands[qtype]
    if qtype == "exists":
        want = "yes" if int(rng.integers(2)) == 0 else "no"
        pool = [qa for qa in pool if qa[1] == want]
    if not pool:
        return None
    return pool[int(rng.integers(len(pool)))]


def generate(n: int, seed: int):
    """Yield n (index, image, question, answer, type) with types balanced: question i has type
    TYPES[i % 6]; scenes are drawn until that type applies."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        qtype = TYPES[i % len(TYPES)]
        while True:
            scene = sample_scene(rng)
            qa = pick_question(rng, qtype, candidates(scene))
            if qa is not None:
                break
        yield i, render(scene), qa[0], qa[1], qtype


def training_example(rng: np.random.Generator, max_questions: int = 12):
    """A scene and the questions the demo models train on about it, shuffled; at most max_questions,
    the `color`, `shape` and `position` ones kept first.

    Every `color`, `shape`, `position` and `count_shape` question the scene allows, the `count_all`
    question, and up to two `exists` questions answered yes with as many answered no. Asking about each
    object in turn is what teaches a small decoder to bind a (color, shape) pair to its own patches:
    with one question per type, position questions on 4-object scenes stayed near chance. (Training
    packs them so that no question sees another's answer: edgemm.train.data.)"""
    scene = sample_scene(rng)
    cands = candidates(scene)
    qas = [(q, a, t) for t in ("color", "shape", "position", "count_shape", "count_all") for q, a in cands[t]]
    yes = [qa for qa in cands["exists"] if qa[1] == "yes"]
    no = [qa for qa in cands["exists"] if qa[1] == "no"]
    n = min(2, len(yes), len(no))
    for pool in (yes, no):
        qas += [(*pool[j], "exists") for j in rng.choice(len(pool), n, replace=False)]
    order = rng.permutation(len(qas))
    # past max_questions, drop non-binding questions first (the order within a row does not matter:
    # each question is trained as its own prompt)
    kept = sorted((qas[j] for j in order), key=lambda qa: qa[2] not in ("color", "shape", "position"))
    return render(scene), kept[:max_questions], scene


def vocabulary_corpus() -> list[str]:
    """Every question and answer the task can produce (for building a tokenizer)."""
    lines = []
    for s in SHAPES:
        lines.append(f"what color is the {s}?")
        lines.append(f"how many {s}s are there?")
    for c in COLORS:
        lines.append(f"what shape is the {c} object?")
        for s in SHAPES:
            lines.append(f"is there a {c} {s}?")
            lines.append(f"is the {c} {s} on the left or the right?")
    lines.append("how many objects are there?")
    answers = list(COLORS) + list(SHAPES) + list(NUMBERS) + ["yes", "no", "left", "right"]
    return lines + answers
