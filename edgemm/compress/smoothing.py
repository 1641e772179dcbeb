"""Per-input-channel scales folded into the preceding op (AWQ, SmoothQuant).

A scale s on the inputs of a group of linears that share one input X is exact when it can be folded:
X' = X / s is produced by the preceding op (a norm's weight and bias, or a linear's output rows) and
the group's weights become W' = W * s. Where the graph does not allow that (the input comes from a
GELU, the residual stream, the pixels, or grouped-query v_proj rows shared by several heads), no scale
is applied: no extra op is ever added, so the packed formats stay plain (docs/formats.md).

The graph is recognised by attribute names, so Llama-style decoder layers (input_layernorm, self_attn.
{q,k,v,o}_proj, post_attention_layernorm, mlp.{gate,up,down}_proj), CLIP/ViT-style blocks (layer_norm1,
self_attn.{q,k,v,out}_proj, layer_norm2, mlp.fc1) and a final `norm` + `lm_head` are found in EdgeVLM,
Hugging Face models and others alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ScaleGroup:
    prev: str  # module name of the op producing the group's input
    prev_kind: str  # "norm" or "linear"
    linears: list[str]


def _get(mod: nn.Module, path: str):
    for p in path.split("."):
        mod = getattr(mod, p, None)
        if mod is None:
            return None
    return mod


def _is_norm(m, k: int) -> bool:
    w = getattr(m, "weight", None)
    return (m is not None and not isinstance(m, nn.Linear) and isinstance(w, torch.Tensor) and w.ndim == 1
            and w.shape[0] == k)


def _join(a: str, b: str) -> str:
    return f"{a}.{b}" if a else b


def scale_groups(model: nn.Module, selected) -> list[ScaleGroup]:
    """Foldable groups whose linears are all selected float nn.Linear layers."""
    selected = set(selected)
    out: list[ScaleGroup] = []

    def add(block_name, block, prev_path, prev_kind, paths):
        mods = [_get(block, p) for p in paths]
        prev = _get(block, prev_path)
        if prev is None or any(m is None for m in mods):
            return
        names = [_join(block_name, p) for p in paths]
        if not all(isinstance(m, nn.Linear) and n in selected for m, n in zip(mods, names)):
            return
        k = mods[0].in_features
        if any(m.in_features != k for m in mods):
            return
        if prev_kind == "norm" and not _is_norm(prev, k):
            return
        if prev_kind == "linear" and not (isinstance(prev, nn.Linear) and prev.out_features == k):
            return
        out.append(ScaleGroup(_join(block_name, prev_path), prev_kind, names))

    for bname, block in model.named_modules():
        attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
        if attn is not None and mlp is not None:
            ln1 = next((n for n in ("input_layernorm", "layer_norm1", "ln_1", "norm1") if getattr(block, n, None) is not None), None)
            ln2 = next((n for n in ("post_attention_layernorm", "layer_norm2", "ln_2", "norm2") if getattr(block, n, None) is not None), None)
            if ln1:
                add(bname, block, ln1, "norm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"])
            out_name = "o_proj" if getattr(attn, "o_proj", None) is not None else "out_proj"
            # v rows -> o columns is a per-channel map only without grouped-query sharing (same width).
            add(bname, block, "self_attn.v_proj", "linear", [f"self_attn.{out_name}"])
            if ln2:
                if getattr(mlp, "gate_proj", None) is not None:
                    add(bname, block, ln2, "norm", ["mlp.gate_proj", "mlp.up_proj"])
                    add(bname, block, "mlp.up_proj", "linear", ["mlp.down_proj"])
                elif getattr(mlp, "fc1", None) is not None:
                    add(bname, block, ln2, "norm", ["mlp.fc1"])
        if getattr(block, "norm", None) is not None and getattr(block, "lm_head", None) is not None:
            add(bname, block, "norm", "norm", ["lm_head"])
    return out


@torch.no_grad()
def fold(model: nn.Module, group: ScaleGroup, s: torch.Tensor) -> None:
    """Divide the group's input by s (in the preceding op) and multiply the group's weight columns by s."""
    prev = model.get_submodule(group.prev)
    s = s.float()
    if group.prev_kind == "norm":
        prev.weight.div_(s.to(prev.weight.dtype))
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    else:
        prev.weight.div_(s[:, None].to(prev.weight.dtype))
        if prev.bias is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    for n in group.linears:
        lin = model.get_submodule(n)
        lin.weight.mul_(s[None, :].to(lin.weight.dtype))
