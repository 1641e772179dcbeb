"""EdgeVLM: the reference multimodal model (ViT + MLP projector + Llama-style decoder) in plain PyTorch.

Every exporter and runtime is checked against this file, so it favours clarity over speed. Linear
layers are `nn.Linear` everywhere (the patch embedding included), so that weight compression, which
acts on `nn.Linear`, covers the whole model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import EdgemmError
from .config import TextConfig, VisionConfig, VLMConfig


def attention(q, k, v, mask=None):
    """softmax(q k^T / sqrt(d)) v with an optional boolean mask (True = attend).

    Written out rather than F.scaled_dot_product_attention: at this project's sizes it is as fast
    for inference and several times faster to train on CPU (SDPA's CPU backward is slow)."""
    scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


def activation(name: str):
    if name == "gelu":
        return lambda x: F.gelu(x)
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name == "silu":
        return F.silu
    raise EdgemmError(f"unknown activation {name!r}")


# ----------------------------------------------------------------------------------------- vision


class ViTAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, want_cls_attn: bool = False):
        b, n, d = x.shape
        shape = (b, n, self.num_heads, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        out = attention(q, k, v)
        cls_attn = None
        if want_cls_attn:
            # The [CLS] query's attention over all tokens, softmax over the full row: [B, H, N].
            scores = (q[:, :, :1] @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
            cls_attn = scores.float().softmax(-1)[:, :, 0]
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d)), cls_attn


class ViTMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = activation(cfg.hidden_act)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ViTBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = ViTAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = ViTMLP(cfg)

    def forward(self, x, want_cls_attn: bool = False):
        h, cls_attn = self.self_attn(self.layer_norm1(x), want_cls_attn)
        x = x + h
        x = x + self.mlp(self.layer_norm2(x))
        return x, cls_attn


class VisionTransformer(nn.Module):
    """Patch embedding (a Linear over flattened C×p×p patches), [CLS] token, learned positions,
    optional pre-LayerNorm, pre-norm blocks."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.patch_embed = nn.Linear(cfg.num_channels * cfg.patch_size**2, d, bias=cfg.patch_bias)
        self.class_embedding = nn.Parameter(torch.zeros(d))
        self.position_embedding = nn.Parameter(torch.zeros(cfg.num_patches + 1, d))
        self.pre_layernorm = nn.LayerNorm(d, eps=cfg.layer_norm_eps) if cfg.pre_layernorm else None
        self.layers = nn.ModuleList(ViTBlock(cfg) for _ in range(cfg.num_layers))

    def patchify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, P, C*p*p], patches in raster order, each flattened as (c, y, x)."""
        b, c, h, w = pixel_values.shape
        p, s = self.cfg.patch_size, self.cfg.image_size
        if (c, h, w) != (self.cfg.num_channels, s, s):
            raise EdgemmError(f"pixel_values must be [B, {self.cfg.num_channels}, {s}, {s}], got {list(pixel_values.shape)}")
        g = s // p
        x = pixel_values.reshape(b, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, g * g, c * p * p)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(self.patchify(pixel_values))
        cls = self.class_embedding.expand(x.shape[0], 1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + self.position_embedding.to(x.dtype)
        return self.pre_layernorm(x) if self.pre_layernorm is not None else x

    def forward(self, pixel_values: torch.Tensor, num_layers: int | None = None, attn_layers=()):
        """Run the first `num_layers` blocks (all by default).

        Returns the hidden state [B, 1+P, D] ([CLS] first) and a dict {layer: [B, H, P]} with the
        [CLS]->patch attention of each requested block (0-based block index; negative counts from the
        last block of the whole ViT).
        """
        n = self.cfg.num_layers if num_layers is None else num_layers
        want = {(i + self.cfg.num_layers) if i < 0 else i for i in attn_layers}
        for i in want:
            if not 0 <= i < n:
                raise EdgemmError(f"[CLS] attention requested for ViT block {i}, but only blocks 0..{n - 1} run")
        x = self.embed(pixel_values)
        attns = {}
        for i in range(n):
            x, a = self.layers[i](x, want_cls_attn=i in want)
            if a is not None:
                attns[i] = a[:, :, 1:]
        return x, attns


class Projector(nn.Module):
    """LLaVA-1.5's 2-layer MLP projector."""

    def __init__(self, vision_hidden: int, text_hidden: int, act: str, bias: bool):
        super().__init__()
        self.linear_1 = nn.Linear(vision_hidden, text_hidden, bias=bias)
        self.linear_2 = nn.Linear(text_hidden, text_hidden, bias=bias)
        self.act = activation(act)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


# ------------------------------------------------------------------------------------------- text


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype=torch.float32):
    """cos/sin [B, T, head_dim] for Hugging Face Llama's rotate-half RoPE."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device) / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x, cos, sin):
    """x [B, H, T, D]; cos/sin [B, T, D]."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


class KVCache:
    """Per-layer keys/values [B, H_kv, T, D], grown by concatenation (the reference; exporters use
    static caches of their own)."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.keys[layer] is None:
            self.keys[layer], self.values[layer] = k, v
        else:
            self.keys[layer] = torch.cat([self.keys[layer], k], dim=2)
            self.values[layer] = torch.cat([self.values[layer], v], dim=2)
        return self.keys[layer], self.values[layer]

    def __len__(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]


class Attention(nn.Module):
    # dtype the keys and values are rounded to before attention, as a KV cache stored in it would
    # (None: kept as computed). The native engine's fp16 KV cache is emulated by setting torch.float16.
    kv_round = None

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(d, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(d, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, d, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_round is not None:
            k, v = k.to(self.kv_round).to(q.dtype), v.to(self.kv_round).to(q.dtype)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        rep = self.num_heads // self.num_kv_heads
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = attention(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, layer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextDecoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, inputs_embeds, position_ids, attention_mask=None, cache: KVCache | None = None,
                logits_to_keep: int = 0, return_hidden: bool = False):
        """inputs_embeds [B, T, D]; position_ids [B, T]; attention_mask [B, past+T] (1 = attend), or a
        complete boolean mask [B, 1, T, past+T] (True = attend; e.g. packed training rows), or None.

        Returns logits [B, T or logits_to_keep, V] (and the final hidden states if asked).
        """
        b, t, _ = inputs_embeds.shape
        past = len(cache) if cache is not None else 0
        mask = causal_mask(b, t, past, attention_mask, inputs_embeds.device)
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, inputs_embeds.dtype)
        x = inputs_embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache, i)
        h = self.norm(x)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        return (logits, h) if return_hidden else logits


def causal_mask(b: int, t: int, past: int, attention_mask, device) -> torch.Tensor:
    """Boolean mask [B, 1, T, past+T]: query i (absolute past+i) sees key j <= past+i that is not padding."""
    if attention_mask is not None and attention_mask.dim() == 4:
        if attention_mask.dtype != torch.bool or tuple(attention_mask.shape) != (b, 1, t, past + t):
            raise EdgemmError(f"a full attention mask must be bool [{b}, 1, {t}, {past + t}], "
                              f"got {attention_mask.dtype} {list(attention_mask.shape)}")
        return attention_mask
    q = torch.arange(past, past + t, device=device)[:, None]
    k = torch.arange(past + t, device=device)[None, :]
    m = (k <= q)[None, None].expand(b, 1, t, past + t)
    if attention_mask is not None:
        if attention_mask.shape != (b, past + t):
            raise EdgemmError(f"attention_mask must be [{b}, {past + t}], got {list(attention_mask.shape)}")
        m = m & attention_mask.bool()[:, None, None, :]
        # A fully masked row (a padding query) would give NaN; let it see itself.
        m = m | (k == q)[None, None]
    return m


# -------------------------------------------------------------------------------------------- VLM


@dataclass
class ImageFeatures:
    """What the vision side hands to the LLM."""

    embeds: torch.Tensor  # [B, K, D_text] projected visual tokens
    cls_attn: dict  # {vit block: [B, H, P]} [CLS]->patch attention of the requested blocks
    # [B, K] index of each visual token in the uncompressed sequence (its representative patch for
    # merged/pooled tokens); None when every visual token is kept.
    token_index: torch.Tensor | None = None


class EdgeVLM(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.vision = VisionTransformer(cfg.vision)
        self.projector = Projector(cfg.vision.hidden_size, cfg.text.hidden_size, cfg.projector.hidden_act, cfg.projector.bias)
        self.text = TextDecoder(cfg.text)

    # --- vision side
    def vision_features(self, pixel_values: torch.Tensor, attn_layers=()):
        """ViT hidden state at the feature layer, [CLS] dropped unless feature select is 'full'.

        Only the blocks up to the feature layer run (as in llama.cpp's LLaVA graph).
        Returns (features [B, P or 1+P, D_vision], {block: [B, H, P]}).
        """
        h, attns = self.vision(pixel_values, num_layers=self.config.feature_layer_index, attn_layers=attn_layers)
        if self.config.vision_feature_select == "default":
            h = h[:, 1:]
        return h, attns

    def encode_image(self, pixel_values: torch.Tensor, attn_layers=()) -> ImageFeatures:
        """Projected visual tokens. With a visual-token setting in config.extras["visual_tokens"]
        (e.g. {"method": "fastervlm", "keep": 0.25}), the tokens are compressed as edgemm.tokens
        specifies (docs/tokens.md), so K < num_visual_tokens."""
        if self.config.extras.get("visual_tokens"):
            from ..tokens.apply import compress_image

            return compress_image(self, pixel_values, self.config.extras["visual_tokens"], attn_layers)
        feats, attns = self.vision_features(pixel_values, attn_layers)
        return ImageFeatures(self.projector(feats), attns)

    # --- text side
    def merge_image(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None) -> torch.Tensor:
        """Embed `input_ids` [B, T] and splice each row's visual tokens in place of its one image token.

        Returns inputs_embeds [B, T - 1 + K, D] (or [B, T, D] without an image).
        """
        emb = self.text.embed_tokens(input_ids)
        is_img = input_ids == self.config.image_token_id
        if image_embeds is None:
            if is_img.any():
                raise EdgemmError("the prompt has an <image> token but no image was given")
            return emb
        counts = is_img.sum(1)
        if not bool((counts == 1).all()):
            raise EdgemmError("each prompt must contain exactly one <image> token when an image is given")
        pos = is_img.int().argmax(1)
        rows = [torch.cat([emb[b, : pos[b]], image_embeds[b].to(emb.dtype), emb[b, pos[b] + 1:]]) for b in range(emb.shape[0])]
        return torch.stack(rows)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, attention_mask=None):
        """Full-sequence logits [B, T', V] (no cache): the training / scoring path.

        attention_mask [B, T] refers to `input_ids`; the image token's entry is expanded to all
        visual tokens. Positions count only attended tokens (left padding is skipped).
        """
        image_embeds = self.encode_image(pixel_values).embeds if pixel_values is not None else None
        embeds = self.merge_image(input_ids, image_embeds)
        mask = expand_mask(input_ids, attention_mask, self.config.image_token_id, embeds.shape[1])
        pos = positions_from_mask(mask)
        return self.text(embeds, pos, mask)

    @torch.no_grad()
    def generate(self, input_ids, pixel_values=None, attention_mask=None, **kw):
        from .generation import generate

        return generate(self, input_ids, pixel_values, attention_mask, **kw)


def expand_mask(input_ids, attention_mask, image_token_id: int, total_len: int):
    """Expand a token-level mask to the merged sequence (the image token becomes K visual tokens)."""
    b, t = input_ids.shape
    if attention_mask is None:
        return torch.ones(b, total_len, dtype=torch.long, device=input_ids.device)
    k = total_len - t + 1
    if k == 1 or not (input_ids == image_token_id).any():
        return attention_mask.long()
    rows = []
    for i in range(b):
        p = int((input_ids[i] == image_token_id).int().argmax())
        m = attention_mask[i].long()
        rows.append(torch.cat([m[:p], m[p:p + 1].expand(k), m[p + 1:]]))
    return torch.stack(rows)


def positions_from_mask(mask: torch.Tensor, past: int = 0) -> torch.Tensor:
    """Position ids counting only attended tokens: left padding keeps real tokens at 0, 1, 2, ..."""
    pos = mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)[:, past:]
