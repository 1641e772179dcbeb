"""Run the configured visual-token method inside `EdgeVLM.encode_image` (torch)."""

from __future__ import annotations

import importlib

import torch

from . import EXTRAS_KEY, TokenSetting, early_block, parse
from .base import Ctx, Out

MODULES = {"fastervlm": "fastervlm", "vtccls": "vtccls", "divprune": "divprune", "tome": "tome", "pool": "pool",
           "random": "randsel", "clsdiv": "clsdiv", "clsmerge": "clsmerge"}


def method_module(name: str):
    return importlib.import_module(f"{__package__}.{MODULES[name]}")


def compress_image(model, pixel_values: torch.Tensor, setting, attn_layers=()):
    """The compressed counterpart of `EdgeVLM.encode_image` -> ImageFeatures with `token_index`.

    1. the ViT runs up to the feature layer (and reports the [CLS] attention the method needs);
    2. the [CLS] token is set aside when the config feeds it to the LLM (it is always kept, first);
    3. the method turns the P patch features into k visual tokens (projected), in raster order of
       their representative patch; k >= P keeps every patch unchanged.
    """
    from ..models.modeling import ImageFeatures

    cfg = model.config
    s: TokenSetting = parse(setting).validate_for(cfg)
    mod = method_module(s.method)
    need = set(mod.blocks(cfg, s))
    want = {(i + cfg.vision.num_layers) if i < 0 else i for i in attn_layers}
    full = cfg.vision_feature_select == "full"
    k = s.visual_tokens(cfg) - (1 if full else 0)
    early = early_block(cfg, s) if k < cfg.vision.num_patches else None
    if early is not None:
        return _early(model, pixel_values, s, mod, early, k, want, full)
    h, attns = model.vision(pixel_values, num_layers=cfg.feature_layer_index, attn_layers=tuple(sorted(need | want)))
    patches = h[:, 1:]
    b, p, _ = patches.shape
    if k >= p:
        out = Out(torch.arange(p).expand(b, p).clone(), feats=patches)
    else:
        out = mod.run(Ctx(cfg, s, patches, attns, k, model.projector))
    embeds = out.embeds if out.embeds is not None else model.projector(out.feats)
    index = out.index
    if full:
        embeds = torch.cat([model.projector(h[:, :1]), embeds], dim=1)
        index = torch.cat([torch.zeros(b, 1, dtype=torch.long), index + 1], dim=1)
    return ImageFeatures(embeds, {i: attns[i] for i in sorted(want)}, token_index=index)


def _early(model, pixel_values, s, mod, block: int, k: int, want: set, full: bool):
    """Selection inside the ViT (fastervlm early=true): blocks 0..block on every token, the patches chosen
    by block `block`'s [CLS] attention, the later blocks on [CLS] + the kept patches only."""
    from ..errors import EdgemmError
    from ..models.modeling import ImageFeatures
    from .base import cls_importance, gather_tokens, keep_top

    cfg = model.config
    if any(i > block for i in want):
        raise EdgemmError(f"[CLS] attention after ViT block {block} is not available: the early selection drops patches there")
    h, attns = model.vision(pixel_values, num_layers=block + 1, attn_layers=tuple(sorted({block} | want)))
    idx = keep_top(cls_importance(attns, [block]), k)
    x = torch.cat([h[:, :1], gather_tokens(h[:, 1:], idx)], dim=1)
    for blk in model.vision.layers[block + 1:cfg.feature_layer_index]:
        x, _ = blk(x)
    embeds = model.projector(x[:, 1:])
    index = idx
    if full:
        embeds = torch.cat([model.projector(x[:, :1]), embeds], dim=1)
        index = torch.cat([torch.zeros(idx.shape[0], 1, dtype=torch.long), idx + 1], dim=1)
    return ImageFeatures(embeds, {i: attns[i] for i in sorted(want)}, token_index=index)


__all__ = ["compress_image", "method_module", "EXTRAS_KEY"]
