"""Dataclass configs of the reference model (EdgeVLM) and their JSON form."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import EdgemmError

FORMAT_NAME = "edgemm"
FORMAT_VERSION = 1


@dataclass
class VisionConfig:
    """A ViT with a [CLS] token, learned positions and pre-norm blocks (CLIP's vision tower is one)."""

    image_size: int = 64
    patch_size: int = 8
    num_channels: int = 3
    hidden_size: int = 192
    num_layers: int = 6
    num_heads: int = 6
    intermediate_size: int = 768
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu"  # gelu (erf) | gelu_tanh | quick_gelu (CLIP)
    patch_bias: bool = True  # CLIP's patch conv has no bias
    pre_layernorm: bool = False  # CLIP applies a LayerNorm to the embeddings before the blocks
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    # How an image of another size becomes image_size x image_size: "pad" (to a square with the mean
    # colour, then resize: LLaVA-1.5's choice, nothing is cut off), "crop" (shortest edge, then centre
    # crop: CLIP's processor), or "squash" (plain resize).
    image_resize: str = "pad"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def validate(self) -> None:
        _check(self.image_size % self.patch_size == 0, "vision.image_size must be a multiple of vision.patch_size")
        _check(self.hidden_size % self.num_heads == 0, "vision.hidden_size must be a multiple of vision.num_heads")
        _check(self.hidden_act in ACTIVATIONS, f"vision.hidden_act {self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")
        _check(self.num_layers >= 1, "vision.num_layers must be >= 1")
        _check(self.image_resize in ("pad", "crop", "squash"), f"vision.image_resize {self.image_resize!r} must be pad, crop or squash")


@dataclass
class TextConfig:
    """A Llama-style decoder: RMSNorm, RoPE (rotate-half), grouped-query attention, SwiGLU."""

    vocab_size: int = 512
    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 704
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = False

    def validate(self) -> None:
        _check(self.num_heads % self.num_kv_heads == 0, "text.num_heads must be a multiple of text.num_kv_heads")
        _check(self.head_dim % 2 == 0, "text.head_dim must be even (RoPE)")
        _check(self.vocab_size >= 4, "text.vocab_size is too small")


@dataclass
class ProjectorConfig:
    """The 2-layer MLP that maps vision features into the LLM's embedding space (LLaVA-1.5)."""

    hidden_act: str = "gelu"
    bias: bool = True

    def validate(self) -> None:
        _check(self.hidden_act in ACTIVATIONS, f"projector.hidden_act {self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")


@dataclass
class VLMConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    # Index into the ViT's hidden states (0 = embeddings, i = output of block i; negative counts from
    # the end), as transformers' `vision_feature_layer`: LLaVA uses -2, the penultimate block.
    vision_feature_layer: int = -2
    # "default" drops the [CLS] token from the features fed to the projector, "full" keeps it.
    vision_feature_select: str = "default"
    image_token_id: int = 3
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    # The chat template; "<image>" marks where the visual tokens go, "{question}" the user's text.
    prompt_template: str = "USER: <image>\n{question} ASSISTANT:"
    # Optional extras filled in by later stages (token compression, quantization); kept verbatim.
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def feature_layer_index(self) -> int:
        """The non-negative hidden-state index: how many ViT blocks run to produce the features."""
        n = self.vision.num_layers
        idx = self.vision_feature_layer
        return n + 1 + idx if idx < 0 else idx

    @property
    def num_visual_tokens(self) -> int:
        return self.vision.num_patches + (1 if self.vision_feature_select == "full" else 0)

    def validate(self) -> "VLMConfig":
        self.vision.validate()
        self.text.validate()
        self.projector.validate()
        _check(0 <= self.feature_layer_index <= self.vision.num_layers,
               f"vision_feature_layer {self.vision_feature_layer} is out of range for {self.vision.num_layers} ViT layers")
        _check(self.vision_feature_select in ("default", "full"),
               f"vision_feature_select {self.vision_feature_select!r} must be 'default' or 'full'")
        for name in ("image_token_id", "bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self, name)
            _check(0 <= v < self.text.vocab_size, f"{name} {v} is outside the vocabulary (size {self.text.vocab_size})")
        _check(self.prompt_template.count("<image>") == 1, "prompt_template must contain '<image>' exactly once")
        _check("{question}" in self.prompt_template, "prompt_template must contain '{question}'")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "architecture": "EdgeVLM", **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VLMConfig":
        if not isinstance(d, dict):
            raise EdgemmError("config.json must hold a JSON object")
        if d.get("format") != FORMAT_NAME:
            raise EdgemmError("config.json is not an edgemm config (field 'format' is not 'edgemm')")
        if d.get("format_version", 0) > FORMAT_VERSION:
            raise EdgemmError(f"config.json has format_version {d['format_version']}; this edgemm reads up to {FORMAT_VERSION}")
        d = {k: v for k, v in d.items() if k not in ("format", "format_version", "architecture")}
        try:
            vision = _build(VisionConfig, d.pop("vision", {}), "vision")
            text = _build(TextConfig, d.pop("text", {}), "text")
            projector = _build(ProjectorConfig, d.pop("projector", {}), "projector")
            cfg = _build(cls, d, "", vision=vision, text=text, projector=projector)
        except TypeError as e:
            raise EdgemmError(f"config.json: {e}") from None
        return cfg.validate()


ACTIVATIONS = {"gelu", "gelu_tanh", "quick_gelu", "silu"}


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise EdgemmError(f"invalid config: {msg}")


def _build(kind, values: dict, prefix: str, **fixed):
    if not isinstance(values, dict):
        raise EdgemmError(f"config.json: {prefix or 'config'} must be an object")
    names = {f.name: f for f in dataclasses.fields(kind)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise EdgemmError(f"config.json: unknown field {where}{unknown[0]}")
    kw = dict(values)
    for k, f in names.items():
        if k in kw and isinstance(kw[k], list) and "tuple" in str(f.type):
            kw[k] = tuple(kw[k])
    kw.update(fixed)
    return kind(**kw)
