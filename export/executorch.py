"""ExecuTorch exporter: one `.pte` in the layout of ExecuTorch's own LLaVA example.

Methods of the program (what ExecuTorch's LLM runners call, see executorch/extension/llm/runner):

- `vision_encoder(images f32[1, 3, S, S]) -> f32[1, K, D]`: ViT up to the feature layer, [CLS] dropped
  (as the config says), visual-token compression (when `config.extras["visual_tokens"]` is set), MLP
  projector. `images` are preprocessed as the manifest's `image_preprocessing` says.
- `token_embedding(tokens i64[1, T]) -> f32[1, T, D]`, T dynamic in 1..max_seq_len.
- `text_decoder(embeddings f32[1, T, D], input_pos i64[1]) -> f32[1, V]`: the decoder with a static
  KV cache held as mutable buffers ([1, max_context, H_kv, head_dim] per layer, written by
  `llama::update_cache`, read by `llama::custom_sdpa` with a causal mask offset by `input_pos`);
  returns the logits of the last position. T is dynamic in 1..max_seq_len; the cache needs no reset
  between prompts (a new prompt restarts at input_pos 0, and causal attention never reads beyond the
  positions written by the current prompt).
- Metadata methods (constants): get_max_seq_len, get_max_context_len, get_vocab_size, get_bos_id,
  get_eos_ids, use_kv_cache, enable_dynamic_shape.

Linear layers are lowered to XNNPACK; the custom llama ops (update_cache, custom_sdpa) run as
ExecuTorch kernels from executorch.extension.llm.custom_ops (linked into ExecuTorch's LLM runner apps).

Precisions (torchao `quantize_`, as ExecuTorch's llama/LLaVA exports do):
- `fp32`: no quantization.
- `8da8w`: every linear layer (vision, projector, decoder, lm_head) int8 per-output-channel symmetric
  weights, activations quantized dynamically to int8 per token (Int8DynamicActivationIntxWeightConfig).
- `8da4w`: decoder linear layers (lm_head included) int4 group-wise symmetric weights (`group_size`,
  default 32) with dynamic int8 activations; vision encoder and projector as in `8da8w`; a decoder
  layer whose input width is not a multiple of `group_size` falls back to 8da8w (a bundle note says so).
The token embedding table stays fp32 unless `embedding_bits=8` or `4` (IntxWeightOnlyConfig group-wise).
"""

from __future__ import annotations

import copy
import warnings

from edgemm.errors import EdgemmError

PRECISIONS = ("fp32", "8da8w", "8da4w")
PTE_FILE = "model.pte"
METHODS = ("vision_encoder", "token_embedding", "text_decoder")


def _import_executorch():
    try:
        import executorch.exir  # noqa: F401
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (registers llama::update_cache, custom_sdpa)
    except ImportError as e:
        raise EdgemmError(f"the executorch exporter needs executorch ({e.name} is missing): pip install 'edgemm[export]'") from None


# ------------------------------------------------------------------------------------ the wrappers


def _modules():
    """Build the export wrappers lazily (torch is imported only when exporting)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from edgemm.models.modeling import ViTAttention

    def mean_last(x):
        """Mean over the last dim of [B, T, D] written as a 4-D mean over dims (2, 3) (what XNNPACK
        lowers, as global average pooling) -> [B, T, 1]."""
        b, _, d = x.shape  # -1 for the dynamic length: XNNPACK lowers no reshape to a symbolic size
        return x.view(b, -1, 1, d).mean(dim=(2, 3), keepdim=True).view(b, -1, 1)

    def rotate_half_matrix(d: int):
        """R with x @ R == modeling.rotate_half(x) = cat(-x2, x1), exactly (one +-1 per column).
        A matmul, because XNNPACK lowers no slice of a dynamic-length tensor."""
        r = torch.zeros(d, d)
        h = d // 2
        r[torch.arange(h) + h, torch.arange(h)] = -1.0
        r[torch.arange(h), torch.arange(h) + h] = 1.0
        return r

    class LayerNorm(nn.Module):
        """nn.LayerNorm from means XNNPACK can lower (same math; ~1e-6 apart in float32)."""

        def __init__(self, ln: nn.LayerNorm):
            super().__init__()
            self.weight, self.bias, self.eps = ln.weight, ln.bias, ln.eps

        def forward(self, x):
            xc = x - mean_last(x)
            y = xc * torch.rsqrt(mean_last(xc * xc) + self.eps)
            return y * self.weight + self.bias if self.bias is not None else y * self.weight

    class Attention3D(nn.Module):
        """ViTAttention with 3-D batched matmuls (a 4-D matmul decomposes into expand + bmm, and
        expand is not lowered by XNNPACK). Same outputs, [CLS] attention included."""

        def __init__(self, a: ViTAttention):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj, self.out_proj = a.q_proj, a.k_proj, a.v_proj, a.out_proj
            self.num_heads, self.head_dim = a.num_heads, a.head_dim

        def forward(self, x, want_cls_attn: bool = False):
            b, n, d = x.shape
            h, hd = self.num_heads, self.head_dim

            def heads(y):  # [B, N, D] -> [B*H, N, hd]
                return y.view(b, n, h, hd).permute(0, 2, 1, 3).reshape(b * h, n, hd)

            q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
            scores = torch.bmm(q, k.transpose(1, 2)) * (hd ** -0.5)
            out = torch.bmm(scores.softmax(-1), v)
            out = out.view(b, h, n, hd).permute(0, 2, 1, 3).reshape(b, n, d)
            cls_attn = None
            if want_cls_attn:
                s0 = torch.bmm(q[:, :1], k.transpose(1, 2)) / (hd ** 0.5)
                cls_attn = s0.float().softmax(-1).view(b, h, n)
            return self.out_proj(out), cls_attn

    def lowerable_vision(model):
        """Swap, in the export copy, the ViT's LayerNorms and attention for the forms above."""
        for mod in list(model.vision.modules()):
            for name, child in list(mod.named_children()):
                if isinstance(child, nn.LayerNorm):
                    setattr(mod, name, LayerNorm(child))
                elif isinstance(child, ViTAttention):
                    setattr(mod, name, Attention3D(child))
        return model

    class VisionEncoder(nn.Module):
        """images [1, 3, S, S] -> projected visual tokens [1, K, D_text] (token compression inside)."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, images):
            return image_embeds(self.model, images)

    class TokenEmbedding(nn.Module):
        def __init__(self, embed_tokens):
            super().__init__()
            self.embed_tokens = embed_tokens

        def forward(self, tokens):
            return self.embed_tokens(tokens)

    class StaticKVTextDecoder(nn.Module):
        """EdgeVLM's decoder with a static KV cache in mutable buffers (batch 1).

        The math of edgemm.models.modeling.TextDecoder on its own layers (RMSNorm, rotate-half RoPE,
        GQA, SwiGLU), written so XNNPACK lowers all but the cache ops; attention runs through
        ExecuTorch's llama::custom_sdpa over the cache with a causal mask starting at input_pos."""

        def __init__(self, text, max_context: int):
            super().__init__()
            self.text = text
            c = text.cfg
            self.max_context = max_context
            inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float32) / c.head_dim))
            self.register_buffer("inv_freq", inv_freq, persistent=False)
            self.register_buffer("rot_t", rotate_half_matrix(c.head_dim).t().contiguous(), persistent=False)
            for i in range(c.num_layers):
                self.register_buffer(f"k_cache_{i}", torch.zeros(1, max_context, c.num_kv_heads, c.head_dim), persistent=False)
                self.register_buffer(f"v_cache_{i}", torch.zeros(1, max_context, c.num_kv_heads, c.head_dim), persistent=False)

        @staticmethod
        def rms_norm(norm, x):
            return norm.weight * (x * torch.rsqrt(mean_last(x * x) + norm.eps))

        def forward(self, embeddings, input_pos):
            c = self.text.cfg
            b, t, _ = embeddings.shape
            start = input_pos[0].item()
            torch._check(start >= 0)
            torch._check(start + t <= self.max_context)
            pos = (input_pos[:1] + torch.arange(t, dtype=torch.long)).float()
            freqs = pos[:, None] * self.inv_freq[None, :]
            emb = torch.cat([freqs, freqs], dim=-1).view(1, -1, 1, c.head_dim)  # [B, S, H, D] layout of the llama ops
            cos, sin = emb.cos(), emb.sin()
            x = embeddings
            for i, layer in enumerate(self.text.layers):
                a = layer.self_attn
                h = self.rms_norm(layer.input_layernorm, x)
                q = a.q_proj(h).view(b, -1, c.num_heads, c.head_dim)
                k = a.k_proj(h).view(b, -1, c.num_kv_heads, c.head_dim)
                v = a.v_proj(h).view(b, -1, c.num_kv_heads, c.head_dim)
                q = q * cos + F.linear(q, self.rot_t) * sin
                k = k * cos + F.linear(k, self.rot_t) * sin
                k_cache, v_cache = getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}")
                torch.ops.llama.update_cache(k, k_cache, start)
                torch.ops.llama.update_cache(v, v_cache, start)
                o = torch.ops.llama.custom_sdpa(q, k_cache, v_cache, start, None, 0, True)
                x = x + a.o_proj(o.reshape(b, -1, c.num_heads * c.head_dim))
                x = x + layer.mlp(self.rms_norm(layer.post_attention_layernorm, x))
            return self.text.lm_head(self.rms_norm(self.text.norm, x[:, -1:]))[:, 0]

    return VisionEncoder, TokenEmbedding, StaticKVTextDecoder, lowerable_vision


def image_embeds(model, images):
    """The vision side as the bundle runs it: EdgeVLM.encode_image, i.e. ViT features -> visual-token
    compression (config.extras["visual_tokens"], edgemm.tokens) -> projector."""
    return model.encode_image(images).embeds


def stable_sort(x, dim: int = -1, descending: bool = False):
    """torch.sort(x, dim, descending, stable=True) from comparisons, sums and a scatter.

    ExecuTorch's portable kernels have no sort (visual-token selection sorts patch scores); the rank
    of x_i is #{j: x_j before x_i} + #{j < i: x_j == x_i}, and scattering i to its rank gives the stable
    order, so the result is exactly the stable sort (O(N^2) comparisons: N is a patch count)."""
    import torch

    x_t = x.transpose(dim, -1)  # (a transpose is its own inverse; Core ML's converter has no movedim)
    n = x_t.shape[-1]
    a = x_t.unsqueeze(-1)  # x_i
    b = x_t.unsqueeze(-2)  # x_j
    before = (b > a) if descending else (b < a)
    idx = torch.arange(n)
    earlier = idx[None, :] < idx[:, None]  # j < i, [i, j]
    rank = torch.logical_or(before, torch.logical_and(b == a, earlier)).long().sum(-1)
    order = torch.zeros_like(rank).scatter(-1, rank, idx.expand_as(rank).contiguous())
    values = x_t.gather(-1, order)
    return torch.return_types.sort((values.transpose(dim, -1), order.transpose(dim, -1)))


def _sort_free_mode():
    """A TorchFunctionMode that routes torch.sort / argsort through `stable_sort` while exporting."""
    import torch
    from torch.overrides import TorchFunctionMode

    sorts = {torch.sort, torch.Tensor.sort}
    argsorts = {torch.argsort, torch.Tensor.argsort}

    def _args(args, kwargs):
        x = args[0]
        dim = kwargs.get("dim", args[1] if len(args) > 1 and not isinstance(args[1], bool) else -1)
        desc = kwargs.get("descending", False)
        if len(args) > 2 and isinstance(args[2], bool):
            desc = args[2]
        elif len(args) > 1 and isinstance(args[1], bool):
            desc = args[1]
        return x, dim, desc

    class SortFree(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in sorts:
                return stable_sort(*_args(args, kwargs))
            if func in argsorts:
                return stable_sort(*_args(args, kwargs)).indices
            return func(*args, **kwargs)

    return SortFree()


# ----------------------------------------------------------------------------------- quantization


def _unpack_edgemm_layers(model) -> dict:
    """Replace edgemm's packed layers (edgemm.compress: QuantLinear, W8A8Linear) in `model` (a copy) by
    nn.Linear with the dequantized weight; return {qualified name: packed module} so that a precision
    with a matching XNNPACK type can take the codes verbatim (see _map_codes)."""
    import torch
    from torch import nn

    packed = {}
    for name, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            if hasattr(child, "dequantized_weight") and not isinstance(child, nn.Linear):
                w = child.dequantized_weight().float()
                lin = nn.Linear(w.shape[1], w.shape[0], bias=getattr(child, "bias", None) is not None)
                with torch.no_grad():
                    lin.weight.copy_(w)
                    if lin.bias is not None:
                        lin.bias.copy_(child.bias.float())
                setattr(mod, cname, lin)
                packed[f"{name}.{cname}" if name else cname] = child
    return packed


def _intx_weight(qdata, scale, bits: int, block: int):
    """A torchao IntxUnpackedToInt8Tensor (dynamic int8 activations) from signed codes and float scales."""
    import torch
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8Tensor, IntxUnpackedToInt8TensorActivationQuantization)

    return IntxUnpackedToInt8Tensor(qdata.to(torch.int8).contiguous(), scale.float().contiguous(),
                                    torch.zeros(scale.shape, dtype=torch.int8), getattr(torch, f"int{bits}"), (1, block),
                                    torch.float32, IntxUnpackedToInt8TensorActivationQuantization.INT8_ASYM_PER_TOKEN)


def _map_codes(module, name: str, packed, precision: str, group_size: int) -> bool:
    """Put edgemm's own codes and scales into `module` (an nn.Linear of the export copy) when XNNPACK has
    the same type: symmetric int4 with groups that are a multiple of 32 (8da4w), symmetric int8 per
    output channel (8da8w and 8da4w). Returns whether it did."""
    import torch

    bits = getattr(packed, "bits", None)
    if not getattr(packed, "symmetric", False) or bits not in (4, 8) or not hasattr(packed, "codes"):
        return False
    u, scale, _ = packed.codes()
    k = u.shape[1]
    g = packed.group_size
    if bits == 4 and (precision != "8da4w" or g % 32):
        return False
    if bits == 8 and g != k:
        return False
    q = u.to(torch.int16) - (8 if bits == 4 else 128)
    module.weight = torch.nn.Parameter(_intx_weight(q, scale, bits, g), requires_grad=False)
    return True


def _round_group_scales_bf16(root) -> None:
    """XNNPACK stores the scales of group-wise int4 weights as bfloat16 (executorch/backends/xnnpack/
    operators/node_visitor.py). Round them here too, so the eager quantized copy computes what the .pte
    computes (the rounding is part of the int4 format ExecuTorch ships)."""
    import torch

    for mod in root.modules():
        w = getattr(mod, "weight", None)
        if type(w).__name__ == "IntxUnpackedToInt8Tensor" and w.block_size[1] != w.shape[1]:
            w.scale = w.scale.to(torch.bfloat16).to(w.scale.dtype)


def _quantize(vision_side, decoder, precision: str, group_size: int, embedding, embedding_bits: int | None,
              packed: dict, notes: list):
    """Apply torchao weight quantization in place to the export copies (edgemm codes mapped where they fit)."""
    import torch
    from torch import nn
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    mapped, requant = [], []

    def take(root, prefix):
        """Map edgemm codes into root's linears that have them; return the names handled."""
        done = set()
        if precision == "fp32":
            return done
        for n, mod in root.named_modules():
            src = packed.get(prefix + n)
            if isinstance(mod, nn.Linear) and src is not None:
                if _map_codes(mod, n, src, precision, group_size):
                    done.add(n)
                    mapped.append(prefix + n)
                else:
                    requant.append(prefix + n)
        return done

    w8 = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    w4 = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group_size))
    fallback = []
    with torch.no_grad():
        if precision in ("8da8w", "8da4w"):
            skip = take(vision_side.model, "")
            quantize_(vision_side, w8, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn.removeprefix("model.") not in skip)
        if precision == "8da8w":
            skip = take(decoder.text, "text.")
            quantize_(decoder, w8, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn.removeprefix("text.") not in skip)
        elif precision == "8da4w":
            skip = take(decoder.text, "text.")
            ok = lambda m, fqn: isinstance(m, nn.Linear) and fqn.removeprefix("text.") not in skip  # noqa: E731
            fallback = [n for n, m in decoder.named_modules() if ok(m, n) and m.in_features % group_size]
            quantize_(decoder, w4, filter_fn=lambda m, fqn: ok(m, fqn) and m.in_features % group_size == 0)
            quantize_(decoder, w8, filter_fn=lambda m, fqn: ok(m, fqn) and m.in_features % group_size != 0)
            _round_group_scales_bf16(decoder)
        if embedding_bits:
            gs = 32 if embedding.embedding_dim % 32 == 0 else embedding.embedding_dim
            quantize_(embedding, IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{embedding_bits}"), granularity=PerGroup(gs)),
                      filter_fn=lambda m, fqn: isinstance(m, nn.Embedding))
    if fallback:
        notes.append(f"executorch 8da4w: {len(fallback)} decoder linear layer(s) have an input width that is not a multiple "
                     f"of group_size {group_size} and use 8da8w instead (e.g. {fallback[0]})")
    if mapped:
        notes.append(f"executorch {precision}: {len(mapped)} linear layer(s) carry edgemm's own int4/int8 codes verbatim"
                     + (" (int4 scales rounded to bfloat16, XNNPACK's group-scale type)" if precision == "8da4w" else ""))
    if requant:
        notes.append(f"executorch {precision}: {len(requant)} edgemm-quantized linear layer(s) have no matching XNNPACK type "
                     f"(asymmetric, or a group size XNNPACK does not take) and were re-quantized by torchao from their "
                     f"dequantized weights (e.g. {requant[0]})")
    elif packed and precision == "fp32":
        notes.append(f"executorch fp32: the model's {len(packed)} edgemm-quantized layer(s) are stored dequantized (fp32)")


# ---------------------------------------------------------------------------------------- export


def prepare(model, precision: str = "fp32", max_context: int | None = None, group_size: int = 32,
            embedding_bits: int | None = None, notes: list | None = None) -> dict:
    """The eager modules that become the program's methods: {"vision_encoder", "token_embedding",
    "text_decoder"}, quantized as `precision` says. Works on deep copies (`model` is untouched), so these
    modules are also the eager reference the lowered program is compared with."""
    _import_executorch()
    import torch

    if precision not in PRECISIONS:
        raise EdgemmError(f"unknown executorch precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if embedding_bits not in (None, 4, 8):
        raise EdgemmError("embedding_bits must be 4, 8 or None")
    if group_size < 32 or group_size % 32:
        raise EdgemmError(f"group_size must be a multiple of 32 (XNNPACK's group-wise int4), got {group_size}")
    notes = notes if notes is not None else []
    cfg = model.config
    max_context = int(max_context or cfg.text.max_position_embeddings)
    if not 8 <= max_context <= cfg.text.max_position_embeddings:
        raise EdgemmError(f"max_context must be in 8..{cfg.text.max_position_embeddings} (the model's context), got {max_context}")
    VisionEncoder, TokenEmbedding, StaticKVTextDecoder, lowerable_vision = _modules()

    m = copy.deepcopy(model).eval()
    packed = _unpack_edgemm_layers(m)
    text = m.text
    m.text = None  # the vision program needs no decoder
    m = lowerable_vision(m)
    embed = TokenEmbedding(copy.deepcopy(text.embed_tokens)).eval()
    if cfg.text.tie_word_embeddings:  # untie in the copy (lm_head may be quantized, the table not)
        text.lm_head.weight = torch.nn.Parameter(text.embed_tokens.weight.detach().clone())
    text.embed_tokens = None
    mods = {"vision_encoder": VisionEncoder(m).eval(), "token_embedding": embed,
            "text_decoder": StaticKVTextDecoder(text, max_context).eval()}
    _quantize(mods["vision_encoder"], mods["text_decoder"], precision, group_size, embed.embed_tokens, embedding_bits,
              packed, notes)
    return mods


def lower(mods: dict, config, per_op_linear: bool = False, progress=None, methods=METHODS):
    """torch.export the prepared modules (those named in `methods`), lower them to XNNPACK and emit
    the program. Returns (ExecutorchProgramManager, delegation summary)."""
    _import_executorch()
    import torch
    from executorch.backends.xnnpack.partition.config.xnnpack_config import ConfigPrecisionType
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.quant_fusion_pass import QuantFusionPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass
    from torch.export import Dim

    cfg = config
    step = progress or (lambda msg: None)
    max_context = mods["text_decoder"].max_context
    s = cfg.vision.image_size
    seq = Dim("seq", min=1, max=max_context)
    args = {
        "vision_encoder": ((torch.zeros(1, cfg.vision.num_channels, s, s),), None),
        "token_embedding": ((torch.zeros(1, 3, dtype=torch.long),), ({1: seq},)),
        "text_decoder": ((torch.zeros(1, 3, cfg.text.hidden_size), torch.tensor([0], dtype=torch.long)), ({1: seq}, None)),
    }
    step("torch.export")
    with torch.no_grad(), warnings.catch_warnings(), _sort_free_mode():
        warnings.simplefilter("ignore")
        eps = {name: torch.export.export(mods[name], args[name][0], dynamic_shapes=args[name][1], strict=False)
               for name in methods}
    constants = {
        "get_max_seq_len": max_context,
        "get_max_context_len": max_context,
        "get_vocab_size": cfg.text.vocab_size,
        "get_bos_id": cfg.bos_token_id,
        "get_eos_ids": [cfg.eos_token_id],
        "use_kv_cache": True,
        "enable_dynamic_shape": True,
    }
    step("lowering to XNNPACK")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # One partitioner for fp32 and dynamically quantized ops alike by default. ExecuTorch's LLaVA example
        # first puts every dynamically quantized linear in its own subgraph (per_op_mode) to bound the peak
        # memory while XNNPACK packs a large model's weights; at edgemm's sizes that only fragments the graph.
        part = [XnnpackPartitioner(config_precisions=ConfigPrecisionType.DYNAMIC_QUANT, per_op_mode=True), XnnpackPartitioner()] \
            if per_op_linear else [XnnpackPartitioner()]
        edge = to_edge_transform_and_lower(
            eps,
            partitioner={name: part if name != "token_embedding" else [] for name in methods},
            constant_methods=constants if "text_decoder" in methods else None,
            compile_config=EdgeCompileConfig(_check_ir_validity=False),
        )
        summary = delegation_summary(edge)
        step("to_executorch")
        prog = edge.to_executorch(ExecutorchBackendConfig(
            extract_delegate_segments=True,
            passes=[QuantFusionPass()],
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
            sym_shape_eval_pass={name: ConstraintBasedSymShapeEvalPass() for name in methods},
        ))
    return prog, summary


def build_program(model, precision: str = "fp32", max_context: int | None = None, group_size: int = 32,
                  embedding_bits: int | None = None, notes: list | None = None, progress=None, per_op_linear: bool = False):
    """prepare + lower: (ExecutorchProgramManager, delegation summary). `model` is not modified."""
    step = progress or (lambda msg: None)
    if precision != "fp32" or embedding_bits:
        step(f"quantizing ({precision})")
    mods = prepare(model, precision, max_context, group_size, embedding_bits, notes)
    return lower(mods, model.config, per_op_linear=per_op_linear, progress=step)


def delegation_summary(edge) -> dict:
    """Per method of a lowered EdgeProgramManager: how many XNNPACK subgraphs (call_delegate nodes)
    and which ops stay outside them (run by ExecuTorch's portable / custom kernels)."""
    import operator

    out = {}
    for name in edge.methods:
        if name not in METHODS:
            continue
        gm = edge.exported_program(name).graph_module
        delegates, other = 0, {}
        for n in gm.graph.nodes:
            if n.op != "call_function" or n.target is operator.getitem:
                continue
            if "executorch_call_delegate" in str(n.target):
                delegates += 1
                continue
            op = getattr(n.target, "_op", n.target)  # edge dialect op -> its aten/custom overload
            key = getattr(op, "_schema", None)
            key = key.name.split("::")[-1] if key is not None else getattr(op, "__name__", str(op))
            if key in ("sym_size",):
                continue
            other[key] = other.get(key, 0) + 1
        out[name] = {"xnnpack_delegates": delegates, "portable_ops": dict(sorted(other.items()))}
    return out


def write(bw, loaded, precision: str = "fp32", max_context: int | None = None, group_size: int = 32,
          embedding_bits: int | None = None, per_op_linear: bool = False, file: str | None = None, **unknown) -> list:
    """Add the ExecuTorch program of `loaded` to the bundle writer `bw`; returns the added Artifacts.

    precision: fp32 | 8da8w | 8da4w (default fp32). max_context: KV-cache length = max prompt+answer
    (default: bw.extra["max_context"], else the model's context). group_size: int4 group of 8da4w (a
    multiple of 32). embedding_bits: 4 or 8 to quantize the token embedding table (default fp32).
    per_op_linear: ExecuTorch LLaVA's per-linear XNNPACK partitioning (lower peak memory for large
    models). file: the .pte's name in the bundle (default model.pte, or model_<precision>.pte when the
    bundle already holds one, so a target can ship several precisions)."""
    from edgemm.progress import progress

    from .bundle import Artifact, visual_token_count

    if unknown:
        raise EdgemmError(f"unknown executorch export option(s): {', '.join(sorted(unknown))}; "
                          "options: precision, max_context, group_size, embedding_bits, per_op_linear, file")
    precision = precision or "fp32"
    if precision not in PRECISIONS:
        raise EdgemmError(f"unknown executorch precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    cfg = loaded.config
    max_ctx = int(max_context or bw.extra.get("max_context") or cfg.text.max_position_embeddings)
    if file is None:
        file = PTE_FILE if not any(a.file == PTE_FILE for a in bw.artifacts) else f"model_{precision}.pte"
    notes: list[str] = []
    quantizing = precision != "fp32" or bool(embedding_bits)
    with progress(4 if quantizing else 3, f"executorch {precision}") as bar:
        prog, summary = build_program(loaded.model, precision=precision, max_context=max_ctx, group_size=group_size,
                                      embedding_bits=embedding_bits, notes=notes, per_op_linear=per_op_linear,
                                      progress=lambda msg: bar.advance(1, info=msg))
    with open(bw.path(file), "wb") as f:
        prog.write_to_file(f)
    for n in notes:
        bw.note(n)
    d, k = cfg.text.hidden_size, visual_token_count(cfg)
    extra = {
        "methods": {
            "vision_encoder": {"inputs": {"images": ["float32", [1, cfg.vision.num_channels, cfg.vision.image_size, cfg.vision.image_size]]},
                               "outputs": {"image_embeds": ["float32", [1, k, d]]}},
            "token_embedding": {"inputs": {"tokens": ["int64", [1, "T"]]}, "outputs": {"embeddings": ["float32", [1, "T", d]]}},
            "text_decoder": {"inputs": {"embeddings": ["float32", [1, "T", d]], "input_pos": ["int64", [1]]},
                             "outputs": {"logits": ["float32", [1, cfg.text.vocab_size]]}},
        },
        "metadata_methods": ["get_max_seq_len", "get_max_context_len", "get_vocab_size", "get_bos_id", "get_eos_ids",
                             "use_kv_cache", "enable_dynamic_shape"],
        "max_seq_len": max_ctx,
        "max_context_len": max_ctx,
        "kv_cache": {"kind": "mutable buffers (static)", "shape": [1, max_ctx, cfg.text.num_kv_heads, cfg.text.head_dim],
                     "layers": cfg.text.num_layers},
        "backend": "xnnpack",
        "custom_ops": ["llama::update_cache", "llama::custom_sdpa"],
        "delegation": summary,
        "weights": {"fp32": "fp32", "8da8w": "int8 per-channel, dynamic int8 activations",
                    "8da4w": f"decoder int4 group {group_size} (bf16 scales), vision int8 per-channel; dynamic int8 activations"}[precision],
    }
    if precision == "8da4w":
        extra["group_size"] = group_size
    if embedding_bits:
        extra["embedding_bits"] = embedding_bits
    art = bw.add(Artifact(file=file, role="program", format="executorch", precision=precision, lane="cpu", processor="cpu",
                          runtime="executorch", extra=extra))
    return [art]
