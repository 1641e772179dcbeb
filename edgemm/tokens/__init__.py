"""Visual-token compression between the vision encoder and the LLM (training-free).

The setting is part of the model's config, `config.extras["visual_tokens"]`, a JSON object
`{"method": "fastervlm", "keep": 0.25}` (plus method options, e.g. `"start": 2` for vtccls), so the
torch reference (`EdgeVLM.encode_image`), the exporters and the native engine all apply it and the
saving in the LLM's prefill is real on device. On the command line it is written `METHOD:KEEP`
(`fastervlm:0.25`, `divprune:16`, `25%` also works, options as `vtccls:0.25:start=2`).

`keep` is a ratio when it is a float in (0, 1] and a count when it is an integer >= 1. The exact
algorithms (tie-breaking, order kept) are specified in docs/tokens.md; `visual_token_count(cfg)` is
the number of visual tokens per image any runtime must produce.

This module is torch-free (the CLI parses settings before importing torch); the methods live in
one module each (fastervlm, vtccls, divprune, tome, pool, randsel, clsdiv, clsmerge) and
`edgemm.tokens.apply` runs them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import EdgemmError

EXTRAS_KEY = "visual_tokens"

# name -> (one-line description, default options). Options are validated by type against the defaults.
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "fastervlm": ("[CLS]->patch attention of the feature block, mean over heads, top-k, raster order kept "
                  "(early=true with an earlier layer: the later ViT blocks run on the kept tokens only)",
                  {"layer": None, "early": False}),
    "vtccls": ("VTC-CLS: [CLS]->patch attention (head mean) summed over ViT blocks start..end, top-k, raster order",
               {"start": 0, "end": None}),
    "divprune": ("DivPrune: greedy max-min cosine diversity on the projected tokens, original order kept", {}),
    "tome": ("ToMe-style bipartite soft matching on the ViT features, size-weighted averages, [CLS] protected", {}),
    "pool": ("2-D average pooling of the patch grid to an h x w grid (adaptive bins)", {}),
    "random": ("a fixed pseudo-random subset of patches (splitmix64 of seed and index): the floor", {"seed": 0}),
    "clsdiv": ("new: max-min diversity weighted by [CLS] importance (score = min distance x importance^alpha)",
               {"alpha": 1.0, "layer": None}),
    "clsmerge": ("new: FasterVLM top-k, each dropped patch merged into its most similar kept one, weighted by [CLS] attention",
                 {"layer": None}),
}
ALIASES = {"vtc-cls": "vtccls", "vtc_cls": "vtccls", "avgpool": "pool", "pooling": "pool", "faster-vlm": "fastervlm",
           "rand": "random", "bipartite": "tome"}
# Methods whose scores come from [CLS] attention: they need the ViT's [CLS] token (every EdgeVLM has one).
SELECTION_METHODS = ("fastervlm", "vtccls", "divprune", "random", "clsdiv")


@dataclass(frozen=True)
class TokenSetting:
    method: str
    keep: float | int  # float in (0, 1]: ratio of the patch tokens; int >= 1: count of visual tokens
    options: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ construction and validation
    @classmethod
    def from_dict(cls, d: dict) -> "TokenSetting":
        if not isinstance(d, dict):
            raise EdgemmError(f"visual_tokens must be an object like {{'method': 'fastervlm', 'keep': 0.25}}, got {d!r}")
        if "method" not in d or "keep" not in d:
            raise EdgemmError("visual_tokens needs 'method' and 'keep'")
        method = _method_name(d["method"])
        keep = _check_keep(d["keep"])
        defaults = METHODS[method][1]
        opts = {}
        for k, v in d.items():
            if k in ("method", "keep"):
                continue
            if k not in defaults:
                known = ", ".join(sorted(defaults)) or "none"
                raise EdgemmError(f"visual_tokens: method {method} has no option {k!r} (options: {known})")
            opts[k] = _check_option(method, k, v)
        return cls(method, keep, opts)

    @classmethod
    def parse(cls, spec: str) -> "TokenSetting | None":
        """'fastervlm:0.25', 'divprune:16', 'pool:25%', 'vtccls:0.25:start=2,end=4'; 'none' -> None."""
        if not isinstance(spec, str) or not spec.strip():
            raise EdgemmError("--visual-tokens is empty; expected METHOD:KEEP, e.g. fastervlm:0.25")
        s = spec.strip()
        if s.lower() in ("none", "off", "all"):
            return None
        parts = s.split(":")
        if len(parts) not in (2, 3):
            raise EdgemmError(f"bad --visual-tokens {spec!r}: expected METHOD:KEEP[:OPTION=VALUE,...], e.g. fastervlm:0.25")
        d: dict[str, Any] = {"method": parts[0].strip(), "keep": _parse_keep(parts[1].strip(), spec)}
        if len(parts) == 3 and parts[2].strip():
            for item in parts[2].split(","):
                if "=" not in item:
                    raise EdgemmError(f"bad --visual-tokens option {item!r} in {spec!r}: expected NAME=VALUE")
                k, v = (x.strip() for x in item.split("=", 1))
                d[k] = _parse_scalar(v)
        return cls.from_dict(d)

    def to_dict(self) -> dict:
        return {"method": self.method, "keep": self.keep, **self.options}

    def option(self, name: str):
        return self.options.get(name, METHODS[self.method][1].get(name))

    def __str__(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.method}:{self.keep}" + (f":{opts}" if opts else "")

    # ------------------------------------------------------------------------------------ counting
    def patch_count(self, num_patches: int, grid: int) -> int:
        """How many patch tokens are kept (the [CLS] token, when fed to the LLM, comes on top)."""
        n = num_patches
        if isinstance(self.keep, int):
            k = self.keep
            if self.method == "pool" and k < n and k not in pool_counts(grid):
                near = sorted(pool_counts(grid), key=lambda c: (abs(c - k), c))[:2]
                raise EdgemmError(f"pool cannot make {k} tokens from a {grid}x{grid} patch grid (h*w with h, w <= {grid}); "
                                  f"nearest: {', '.join(map(str, sorted(near)))}")
            return min(k, n)
        target = n * self.keep
        k = max(1, math.floor(target + 0.5))  # round half up
        if self.method == "pool" and k < n:
            k = min(pool_counts(grid), key=lambda c: (abs(c - target), c))
        return min(k, n)

    def visual_tokens(self, cfg) -> int:
        """Visual tokens per image fed to the LLM under this setting (the [CLS] token counts if fed)."""
        has_cls = cfg.vision_feature_select == "full"
        keep = self
        if has_cls and isinstance(self.keep, int):
            if self.keep < 2:
                raise EdgemmError("with vision_feature_select 'full' the [CLS] token is always kept: keep at least 2 tokens")
            keep = TokenSetting(self.method, self.keep - 1, self.options)
        return keep.patch_count(cfg.vision.num_patches, cfg.vision.grid) + (1 if has_cls else 0)

    def validate_for(self, cfg) -> "TokenSetting":
        """Check the setting against a model config (layers in range, counts achievable)."""
        self.visual_tokens(cfg)
        run = cfg.feature_layer_index  # ViT blocks that run
        if self.method in ("fastervlm", "clsdiv", "clsmerge"):
            attention_block(cfg, self.option("layer"))
        if self.method == "vtccls":
            vtc_blocks(cfg, self.option("start"), self.option("end"))
        if run == 0 and self.method in ("fastervlm", "vtccls", "clsdiv", "clsmerge"):
            raise EdgemmError(f"{self.method} needs [CLS] attention but the features are the ViT embeddings (no block runs)")
        return self


def attention_block(cfg, layer) -> int:
    """The ViT block whose [CLS] attention scores the patches: by default the block that produces the
    features (vision_feature_layer -2 -> block L-2, as FasterVLM); negative counts from the last block."""
    run = cfg.feature_layer_index
    if layer is None:
        b = run - 1
    else:
        b = layer + cfg.vision.num_layers if layer < 0 else layer
    if not 0 <= b < run:
        raise EdgemmError(f"visual_tokens: [CLS] attention of ViT block {layer} is not available; blocks 0..{run - 1} run")
    return b


def early_block(cfg, setting) -> int | None:
    """fastervlm with early=true: the ViT block after which the patches are selected inside the encoder
    (the later blocks run on the kept tokens only); None when the selection happens after the encoder."""
    if setting is None or setting.method != "fastervlm" or not setting.option("early"):
        return None
    b = attention_block(cfg, setting.option("layer"))
    return b if b < cfg.feature_layer_index - 1 else None


def vtc_blocks(cfg, start, end) -> list[int]:
    """VTC-CLS's blocks: start..end inclusive (end defaults to the feature block)."""
    e = attention_block(cfg, end)
    s = start + cfg.vision.num_layers if start < 0 else start
    if not 0 <= s <= e:
        raise EdgemmError(f"visual_tokens: vtccls start block {start} must be in 0..{e}")
    return list(range(s, e + 1))


def pool_counts(grid: int) -> list[int]:
    """Token counts 2-D pooling can produce from a grid x grid patch grid: h*w with 1 <= h, w <= grid."""
    return sorted({h * w for h in range(1, grid + 1) for w in range(1, grid + 1)})


def pool_shape(k: int, grid: int) -> tuple[int, int]:
    """(h, w) with h*w == k, h <= w <= grid, as square as possible (smallest w - h)."""
    best = None
    for h in range(1, grid + 1):
        if k % h == 0:
            w = k // h
            if h <= w <= grid and (best is None or w - h < best[1] - best[0]):
                best = (h, w)
    if best is None:
        raise EdgemmError(f"pool cannot make {k} tokens from a {grid}x{grid} grid")
    return best


# ------------------------------------------------------------------------------------- public API


def parse(spec: str | dict | TokenSetting | None) -> TokenSetting | None:
    """A CLI string, a dict (as stored in config.extras) or a TokenSetting -> TokenSetting (None = off)."""
    if spec is None or isinstance(spec, TokenSetting):
        return spec
    if isinstance(spec, dict):
        return TokenSetting.from_dict(spec)
    return TokenSetting.parse(spec)


def get_setting(cfg) -> TokenSetting | None:
    """The setting stored in a VLMConfig (None when the model keeps every visual token)."""
    d = cfg.extras.get(EXTRAS_KEY)
    return TokenSetting.from_dict(d) if d else None


def apply_to_config(cfg, spec) -> TokenSetting | None:
    """Store a setting in `cfg.extras["visual_tokens"]` (validated against cfg); None/'none' removes it.

    This is all a loaded model needs: `EdgeVLM.encode_image` reads it on every call. Returns the
    normalized setting."""
    s = parse(spec)
    if s is None:
        cfg.extras.pop(EXTRAS_KEY, None)
        return None
    s.validate_for(cfg)
    cfg.extras[EXTRAS_KEY] = s.to_dict()
    return s


def set_visual_tokens(model_or_loaded, spec) -> TokenSetting | None:
    """Apply a setting to a loaded model (a LoadedModel, an EdgeVLM, or anything with `.config`)."""
    m = getattr(model_or_loaded, "model", model_or_loaded)
    return apply_to_config(m.config, spec)


def visual_token_count(cfg) -> int:
    """Visual tokens per image after compression (cfg.num_visual_tokens when no setting is stored)."""
    s = get_setting(cfg)
    return cfg.num_visual_tokens if s is None else s.visual_tokens(cfg)


def describe_methods() -> list[dict]:
    return [{"method": m, "description": d, "options": o} for m, (d, o) in METHODS.items()]


# --------------------------------------------------------------------------------------- helpers


def _method_name(m) -> str:
    if not isinstance(m, str):
        raise EdgemmError(f"visual_tokens method must be a string, got {m!r}")
    name = ALIASES.get(m.strip().lower(), m.strip().lower())
    if name not in METHODS:
        raise EdgemmError(f"unknown visual-token method {m!r}; choose one of {', '.join(METHODS)}")
    return name


def _check_keep(k):
    if isinstance(k, bool):
        raise EdgemmError(f"visual_tokens keep must be a ratio in (0, 1] or a count >= 1, got {k!r}")
    if isinstance(k, int):
        if k < 1:
            raise EdgemmError(f"visual_tokens keep count must be >= 1, got {k}")
        return k
    if isinstance(k, float):
        if not (0 < k <= 1) or math.isnan(k):
            raise EdgemmError(f"visual_tokens keep ratio must be in (0, 1], got {k} (write a count as an integer)")
        return k
    raise EdgemmError(f"visual_tokens keep must be a ratio in (0, 1] or a count >= 1, got {k!r}")


def _parse_keep(s: str, spec: str):
    try:
        if s.endswith("%"):
            return float(s[:-1]) / 100
        if any(c in s for c in ".eE"):
            return float(s)
        return int(s)
    except ValueError:
        raise EdgemmError(f"bad keep {s!r} in --visual-tokens {spec!r}: a ratio like 0.25 or 25%, or a count like 16") from None


def _parse_scalar(v: str):
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    if v.lower() in ("none", "null"):
        return None
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    return v


def _check_option(method: str, k: str, v):
    default = METHODS[method][1][k]
    if k in ("layer", "end", "start", "seed"):
        if v is None and k in ("layer", "end"):
            return None
        if not isinstance(v, int) or isinstance(v, bool):
            raise EdgemmError(f"visual_tokens: {method} option {k} must be an integer, got {v!r}")
        if k == "seed" and v < 0:
            raise EdgemmError("visual_tokens: random seed must be >= 0")
        return v
    if isinstance(default, bool):
        if not isinstance(v, bool):
            raise EdgemmError(f"visual_tokens: {method} option {k} must be true or false, got {v!r}")
        return v
    if isinstance(default, float):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise EdgemmError(f"visual_tokens: {method} option {k} must be a number >= 0, got {v!r}")
        return float(v)
    return v


__all__ = ["TokenSetting", "METHODS", "EXTRAS_KEY", "parse", "get_setting", "apply_to_config", "set_visual_tokens",
           "visual_token_count", "describe_methods", "pool_counts", "pool_shape", "attention_block", "early_block"]
