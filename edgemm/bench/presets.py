"""Benchmark presets: EdgeVLM configs with real models' shapes, built with random weights.

Speed does not depend on what the weights are, only on their shapes and storage types, so every preset
is an EdgeVLM (edgemm.models) with random weights, exported by edgemm's own exporters. What each preset
approximates is stated in APPROXIMATIONS (and in docs/bench.md).
"""

from __future__ import annotations

import dataclasses

from edgemm.errors import EdgemmError
from edgemm.models.config import TextConfig, VisionConfig, VLMConfig

PRESETS = ("demo", "smolvlm-256m", "llava-qwen1.8b")

# The context every preset gets: room for a 1024-token prompt plus the image-prompt runs and decode
# (the static KV caches of ExecuTorch programs are this long).
BENCH_CONTEXT = 2048

APPROXIMATIONS = {
    "demo": "edgemm.train.demo.demo_config (ViT 64px/8 d=192 x6, Llama d=256 x6, vocab of the demo tokenizer); "
            "context raised from 512 to 2048 so that 512/1024-token prompts fit (RoPE, no learned positions)",
    "smolvlm-256m": "LLM = SmolVLM-256M's (SmolLM2-135M-shaped: d=576, 30 layers, 9/3 heads x 64, ffn 1536, vocab 49152, "
                    "tied embeddings); vision = SigLIP-base-like ViT 512px/16 (d=768, 12 layers, 12 heads, ffn 3072, "
                    "gelu_tanh) with a [CLS] token SigLIP lacks; EdgeVLM has no pixel-shuffle connector, so the LLM "
                    "sees all 1024 patches as visual tokens (SmolVLM shuffles them down to 64) through LLaVA's 2-layer "
                    "MLP projector",
    "llava-qwen1.8b": "LLM = Qwen1.5-1.8B-shaped (d=2048, 24 layers, 16 heads MHA x 128, ffn 5504, vocab 151936; "
                      "Qwen's q/k/v biases left out: EdgeVLM's attention has none); vision = CLIP-ViT-L/14-336-shaped "
                      "(d=1024, 24 layers, 16 heads, ffn 4096, quick_gelu, pre-LayerNorm, no patch bias; feature "
                      "layer -2 so 23 blocks run; 576 visual tokens); LLaVA-1.5's 2-layer GELU MLP projector",
}


def demo_tokenizer():
    from edgemm.tokenizer_build import build_demo_tokenizer

    return build_demo_tokenizer()


def preset_config(name: str, vocab_size: int | None = None, text_layers: int | None = None) -> VLMConfig:
    """The preset's VLMConfig; `text_layers` replaces the LLM's depth (layer-scaled measurements)."""
    if name not in PRESETS:
        raise EdgemmError(f"unknown bench preset {name!r}; choose one of {', '.join(PRESETS)}")
    if name == "demo":
        from edgemm.train.demo import demo_config

        cfg = demo_config(vocab_size or demo_tokenizer().get_vocab_size())
        cfg.text.max_position_embeddings = BENCH_CONTEXT
    elif name == "smolvlm-256m":
        vision = VisionConfig(image_size=512, patch_size=16, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                              layer_norm_eps=1e-6, hidden_act="gelu_tanh")
        text = TextConfig(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                          intermediate_size=1536, rope_theta=100000.0, max_position_embeddings=BENCH_CONTEXT,
                          tie_word_embeddings=True)
        cfg = VLMConfig(vision=vision, text=text, vision_feature_layer=-1)
    else:
        vision = VisionConfig(image_size=336, patch_size=14, hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096,
                              hidden_act="quick_gelu", patch_bias=False, pre_layernorm=True,
                              image_mean=(0.48145466, 0.4578275, 0.40821073), image_std=(0.26862954, 0.26130258, 0.27577711))
        text = TextConfig(vocab_size=151936, hidden_size=2048, num_layers=24, num_heads=16, num_kv_heads=16, head_dim=128,
                          intermediate_size=5504, rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=BENCH_CONTEXT)
        cfg = VLMConfig(vision=vision, text=text, vision_feature_layer=-2)
    if text_layers is not None:
        if text_layers < 1:
            raise EdgemmError("the number of text layers must be >= 1")
        cfg.text.num_layers = int(text_layers)
    return cfg.validate()


def config_key(cfg: VLMConfig) -> dict:
    """The parts of a config that decide an export (the cache key uses it)."""
    return cfg.to_dict()


def build_model(cfg: VLMConfig, seed: int = 0, dtype=None):
    """A LoadedModel (EdgeVLM with random weights + the demo tokenizer) for `cfg`.

    Weights: N(0, 0.02) for matrices and embeddings, 1 for norm scales, 0 for biases (so activations stay
    finite through deep stacks, which matters for int8 activation quantization)."""
    import torch

    from edgemm.models.checkpoint import LoadedModel
    from edgemm.models.modeling import EdgeVLM
    from edgemm.processor import Processor

    tok = demo_tokenizer()
    if tok.get_vocab_size() > cfg.text.vocab_size:
        raise EdgemmError("the preset's vocabulary is smaller than the demo tokenizer's")
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = EdgeVLM(cfg)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or n.endswith("layernorm.weight") or ("layer_norm" in n and n.endswith("weight")) \
                    or n.endswith("pre_layernorm.weight"):
                p.fill_(1.0)
            elif n.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)
        if cfg.text.tie_word_embeddings:
            model.text.lm_head.weight = model.text.embed_tokens.weight
    if dtype is not None:
        model = model.to(dtype)
    return LoadedModel(model.eval(), Processor(tok, cfg), source=f"bench:{cfg.text.num_layers}L")


def describe(cfg: VLMConfig) -> dict:
    v, t = cfg.vision, cfg.text
    return {"vision": f"ViT {v.image_size}px/{v.patch_size} d={v.hidden_size} x{cfg.feature_layer_index} blocks run, "
                      f"{v.num_heads} heads, ffn {v.intermediate_size}, {cfg.num_visual_tokens} visual tokens",
            "text": f"d={t.hidden_size}, {t.num_layers} layers, {t.num_heads}/{t.num_kv_heads} heads x {t.head_dim}, "
                    f"ffn {t.intermediate_size}, vocab {t.vocab_size}" + (", tied" if t.tie_word_embeddings else "")}


def with_layers(cfg: VLMConfig, n: int) -> VLMConfig:
    c = VLMConfig.from_dict(cfg.to_dict())
    c.text = dataclasses.replace(c.text, num_layers=n)
    return c.validate()
