"""Bundles: what `edgemm export` writes. A directory with manifest.json and the artifacts it lists.

The manifest says everything a runtime needs besides the artifacts themselves: the model config, the
tokenizer, image preprocessing, the prompt template, the visual-token compression setting, the prefill
chunk size, and for each artifact its role, format, precision, sha256 and the lane/processor it runs on.
A bundle is built in a temporary directory and renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from edgemm import __version__
from edgemm.errors import EdgemmError
from edgemm.fileio import atomic_dir

MANIFEST = "manifest.json"
BUNDLE_FORMAT = "edgemm-bundle"
BUNDLE_VERSION = 1
LANES = ("cpu", "npu")  # where an artifact runs: the "NPU lane" or the "CPU lane" (see DESIGN.md)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _sha256(path: Path) -> str:
    """sha256 of a file, or of a directory artifact (e.g. .mlpackage) over its files in sorted order."""
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(path)).encode() + b"\0")
        h.update(sha256_file(p).encode())
    return h.hexdigest()


@dataclass
class Artifact:
    file: str  # path relative to the bundle
    role: str  # e.g. vision_encoder, embed_tokens, decoder, text_model, mmproj, prefill_chunk, program
    format: str  # gguf | onnx | executorch | coreml | edgemm-native
    precision: str  # fp32 | f16 | q8_0 | q4_0 | int8 | int4 | w8a8 | ...
    lane: str = "cpu"  # cpu | npu
    processor: str = "cpu"  # the device class it targets: cpu, npu (QNN HTP), gpu, ane, ...
    runtime: str = ""  # the runtime that runs it: llamacpp, onnxruntime, executorch, coreml, native
    extra: dict = field(default_factory=dict)
    sha256: str = ""
    bytes: int = 0

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("file", "role", "format", "precision", "lane", "processor", "runtime", "sha256", "bytes")}
        if self.extra:
            d["extra"] = self.extra
        return d


class BundleWriter:
    """Collects artifacts in a temp directory; `finish()` writes manifest.json."""

    def __init__(self, root: Path, loaded, target: str):
        self.root = root
        self.loaded = loaded
        self.target = target
        self.artifacts: list[Artifact] = []
        self.notes: list[str] = []
        self.extra: dict = {}

    def path(self, rel: str) -> Path:
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def add(self, art: Artifact) -> Artifact:
        p = self.root / art.file
        if not p.exists():
            raise EdgemmError(f"exporter bug: artifact {art.file} was not written")
        if art.lane not in LANES:
            raise EdgemmError(f"exporter bug: unknown lane {art.lane!r}")
        art.sha256 = _sha256(p)
        art.bytes = _bytes(p)
        self.artifacts.append(art)
        return art

    def note(self, text: str) -> None:
        """Something the user should know about this export (e.g. what was re-quantized)."""
        self.notes.append(text)

    def manifest(self) -> dict:
        cfg = self.loaded.config
        v = cfg.vision
        tok = self.loaded.processor
        return {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_VERSION,
            "created_by": f"edgemm {__version__}",
            "target": self.target,
            "model": {"id": self.loaded.source, "config": cfg.to_dict()},
            "tokenizer": {"file": "tokenizer.json", "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
                          "pad_token_id": cfg.pad_token_id, "image_token_id": cfg.image_token_id,
                          "image_token": tok.image_token},
            "prompt_template": cfg.prompt_template,
            "image_preprocessing": {"size": v.image_size, "resize": v.image_resize, "resample": "bicubic",
                                    "rescale": 1 / 255, "mean": list(v.image_mean), "std": list(v.image_std),
                                    "layout": "NCHW", "dtype": "float32"},
            "visual_tokens": cfg.extras.get("visual_tokens"),
            "num_visual_tokens": visual_token_count(cfg),
            "chunk_size": self.extra.get("chunk_size"),
            "max_context": self.extra.get("max_context", cfg.text.max_position_embeddings),
            "artifacts": [a.to_dict() for a in self.artifacts],
            "notes": self.notes,
            **{k: v for k, v in self.extra.items() if k not in ("chunk_size", "max_context")},
        }

    def finish(self) -> dict:
        if not self.artifacts:
            raise EdgemmError("exporter bug: the bundle has no artifacts")
        self.loaded.processor.tokenizer.save(str(self.root / "tokenizer.json"))
        m = self.manifest()
        (self.root / MANIFEST).write_text(json.dumps(m, indent=2) + "\n")
        return m


def visual_token_count(cfg) -> int:
    """Visual tokens per image after token compression (if the config sets one): edgemm.tokens'
    count, the one the torch reference produces ([CLS] included when fed, pooling's grid rule)."""
    from edgemm.tokens import visual_token_count as count

    return count(cfg)


@contextlib.contextmanager
def bundle_dir(out: str | Path, loaded, target: str):
    """`with bundle_dir(out, loaded, target) as bw:` ... add artifacts ...; manifest written on success.

    If anything raises, no bundle is left at `out` (an existing one stays untouched)."""
    out = Path(out)
    with atomic_dir(out) as tmp:
        bw = BundleWriter(tmp, loaded, target)
        yield bw
        bw.finish()


def read_manifest(bundle: str | Path, verify: bool = True) -> dict:
    """Load and validate a bundle's manifest; with `verify`, check every artifact's sha256."""
    bundle = Path(bundle)
    f = bundle / MANIFEST
    if not f.is_file():
        raise EdgemmError(f"not an edgemm bundle (no {MANIFEST}): {bundle}")
    try:
        m = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise EdgemmError(f"{f} is not valid JSON ({e})") from None
    if m.get("format") != BUNDLE_FORMAT:
        raise EdgemmError(f"{f} is not an edgemm bundle manifest")
    if m.get("format_version", 0) > BUNDLE_VERSION:
        raise EdgemmError(f"{f} has format_version {m['format_version']}; this edgemm reads up to {BUNDLE_VERSION}")
    for a in m.get("artifacts", []):
        p = bundle / a["file"]
        if not p.exists():
            raise EdgemmError(f"bundle {bundle} is incomplete: {a['file']} is missing")
        if verify and _sha256(p) != a["sha256"]:
            raise EdgemmError(f"bundle {bundle}: {a['file']} does not match its sha256 (corrupt or modified)")
    return m
