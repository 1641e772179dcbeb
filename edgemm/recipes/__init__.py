"""Compression recipes: YAML files that chain stages (distill, tokens, sparsify, quantize).

A recipe:

    name: phone-npu
    description: ...
    eval: {data: shapes:2400:777, limit: null}     # optional; default: the held-out set
    stages:
      - distill: {student: demo-small}              # LLaVA-KD into a smaller student
      - tokens: fastervlm:0.25                      # visual-token compression (METHOD:KEEP or a mapping)
      - sparsify: {method: maskllm, pattern: "2:4"} # edgemm.compress weight methods
      - quantize: {method: w8a8, shadow: true, calibration: {n: 64}}

Each stage is a one-key mapping {type: options} (or a mapping with `type:`; `name:` is optional).
Shipped recipes live in edgemm/recipes/shipped/ and are used by name (`--recipe phone-npu`).
This module is torch-free: recipes validate before any model loads.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EdgemmError

SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"
STAGE_TYPES = ("distill", "tokens", "sparsify", "quantize")
# Extra stage types (tests register fakes here): type -> (validate(options) -> options, run(...)).
EXTRA_STAGES: dict[str, Any] = {}


@dataclass
class Stage:
    type: str
    name: str
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"type": self.type, "name": self.name, **copy.deepcopy(self.options)}


@dataclass
class Recipe:
    name: str
    description: str
    stages: list[Stage]
    eval: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "eval": dict(self.eval),
                "stages": [s.to_dict() for s in self.stages]}


def shipped() -> list[str]:
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.yaml"))


def load_recipe(spec) -> Recipe:
    """A shipped recipe name, a path to a YAML file, a dict, or a Recipe."""
    import yaml

    if isinstance(spec, Recipe):
        return spec
    if isinstance(spec, dict):
        return from_dict(spec, "<dict>")
    s = str(spec)
    p = Path(s)
    if not p.is_file() and (SHIPPED_DIR / f"{s}.yaml").is_file():
        p = SHIPPED_DIR / f"{s}.yaml"
    if not p.is_file():
        raise EdgemmError(f"unknown recipe {s!r}: not a YAML file nor a shipped recipe ({', '.join(shipped())})")
    try:
        d = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise EdgemmError(f"recipe {p} is not valid YAML{where}") from None
    return from_dict(d, str(p))


def from_dict(d, source: str) -> Recipe:
    if not isinstance(d, dict):
        raise EdgemmError(f"recipe {source}: expected a mapping with 'stages'")
    unknown = sorted(set(d) - {"name", "description", "eval", "stages"})
    if unknown:
        raise EdgemmError(f"recipe {source}: unknown field {unknown[0]!r}")
    stages_in = d.get("stages")
    if not isinstance(stages_in, list) or not stages_in:
        raise EdgemmError(f"recipe {source}: 'stages' must be a non-empty list")
    ev = d.get("eval") or {}
    if not isinstance(ev, dict) or set(ev) - {"data", "limit", "batch_size", "prompt"}:
        raise EdgemmError(f"recipe {source}: 'eval' takes data, limit, batch_size, prompt")
    stages = []
    names = set()
    for i, raw in enumerate(stages_in, 1):
        st = _stage(raw, i, source)
        if st.name in names:
            raise EdgemmError(f"recipe {source}: two stages are named {st.name!r}")
        names.add(st.name)
        stages.append(st)
    if sum(s.type == "distill" for s in stages) > 1:
        raise EdgemmError(f"recipe {source}: at most one distill stage")
    return Recipe(str(d.get("name") or Path(source).stem), str(d.get("description") or ""), stages, ev, source)


def _stage(raw, i: int, source: str) -> Stage:
    where = f"recipe {source}: stage {i}"
    if isinstance(raw, dict) and "type" in raw:
        opts = {k: v for k, v in raw.items() if k not in ("type", "name")}
        kind, name = raw["type"], raw.get("name")
    elif isinstance(raw, dict) and len([k for k in raw if k != "name"]) == 1:
        kind = next(k for k in raw if k != "name")
        opts, name = raw[kind], raw.get("name")
    else:
        raise EdgemmError(f"{where}: expected {{TYPE: OPTIONS}} with TYPE one of {', '.join(STAGE_TYPES)}")
    if kind not in STAGE_TYPES and kind not in EXTRA_STAGES:
        raise EdgemmError(f"{where}: unknown stage type {kind!r} (one of {', '.join(STAGE_TYPES)})")
    if kind == "tokens":
        from ..tokens import parse

        s = parse(opts if isinstance(opts, (str, dict)) else str(opts))
        if s is None:
            raise EdgemmError(f"{where}: a tokens stage must compress (got 'none')")
        opts = s.to_dict()
    elif opts is None:
        opts = {}
    elif not isinstance(opts, dict):
        raise EdgemmError(f"{where}: options of a {kind} stage must be a mapping")
    else:
        opts = copy.deepcopy(opts)
    if kind == "distill":
        _validate_distill(opts, where)
    elif kind in ("sparsify", "quantize"):
        _validate_weight(kind, opts, where)
    elif kind in EXTRA_STAGES:
        opts = EXTRA_STAGES[kind][0](opts)
    return Stage(kind, str(name or kind), opts)


def _validate_distill(opts: dict, where: str) -> None:
    if not isinstance(opts.get("student", "demo-small"), str):
        raise EdgemmError(f"{where}: distill student must be a name or a path")
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return
    from ..distill.trainer import DistillConfig

    rest = {k: v for k, v in opts.items() if k not in ("student",)}
    try:
        DistillConfig.from_dict(rest)
    except EdgemmError as e:
        raise EdgemmError(f"{where}: {e}") from None


def _validate_weight(kind: str, opts: dict, where: str) -> None:
    cal = opts.get("calibration", {})
    if not isinstance(cal, dict) or set(cal) - {"n", "seed"}:
        raise EdgemmError(f"{where}: calibration takes n and seed")
    if "method" not in opts:
        raise EdgemmError(f"{where}: a {kind} stage needs a method")
    cfg = weight_config(opts, where)
    k = getattr(cfg, "kind", None)
    if k is not None and k != kind:
        raise EdgemmError(f"{where}: {opts['method']} is a {k} method, not a {kind} one")


def weight_config(opts: dict, where: str = "recipe"):
    """The edgemm.compress config of a sparsify/quantize stage (its options minus `calibration`)."""
    try:
        from ..compress import config_from_dict
    except ImportError:
        try:
            from ..compress.config import config_from_dict
        except ImportError:
            raise EdgemmError(f"{where}: the weight-compression methods (edgemm.compress) are not available in this build") from None
    try:
        return config_from_dict({k: v for k, v in opts.items() if k != "calibration"})
    except EdgemmError as e:
        raise EdgemmError(f"{where}: {e}") from None


__all__ = ["Recipe", "Stage", "load_recipe", "from_dict", "shipped", "STAGE_TYPES", "EXTRA_STAGES", "SHIPPED_DIR", "weight_config"]
