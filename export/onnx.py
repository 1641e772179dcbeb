"""ONNX export in the layout optimum / transformers.js (onnx-community) / onnxruntime-genai users know.

A bundle gets, under `onnx/`:

- `vision_encoder{sfx}.onnx`: `pixel_values` f32 [B, 3, S, S] -> `image_features` f32 [B, K, D_text]
  (ViT up to the feature layer, [CLS] dropped per config, projector; the visual-token compression of
  `config.extras["visual_tokens"]` inside when set).
- `embed_tokens.onnx`: `input_ids` i64 [B, T] -> `inputs_embeds` f32 [B, T, D].
- `decoder_model_merged{sfx}.onnx`: `inputs_embeds` f32 [B, T, D], `attention_mask` i64 [B, past+T],
  `position_ids` i64 [B, T], `past_key_values.{i}.key/.value` f32 [B, H_kv, past, hd] ->
  `logits` f32 [B, T, V], `present.{i}.key/.value` f32 [B, H_kv, past+T, hd]. The first step feeds
  past tensors of length 0 (one graph for prefill and decode, like optimum's merged decoders, but
  without an If node).

`{sfx}` is "" for fp32, "_int8" (onnxruntime quantize_dynamic, int8 weights, dynamic uint8
activations) and "_q4" (MatMulNBits, 4-bit blocks of 32): transformers.js's dtype suffixes.
Beside them at the bundle root: `config.json`, `generation_config.json`, `preprocessor_config.json`,
`tokenizer_config.json` (transformers.js / optimum read these) and `genai_config.json`
(onnxruntime-genai). See docs/export-onnx.md.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

from edgemm.errors import EdgemmError

from .bundle import Artifact

OPSET = 17
VISION_OUTPUTS = ["image_features", "image_features_flat"]
PRECISIONS = ("fp32", "int8", "int4")
SUFFIX = {"fp32": "", "int8": "_int8", "int4": "_q4"}
JS_DTYPE = {"fp32": "fp32", "int8": "int8", "int4": "q4"}
INT4_BLOCK = 32


def file_name(role: str, precision: str) -> str:
    base = {"vision_encoder": "vision_encoder", "embed_tokens": "embed_tokens", "decoder": "decoder_model_merged"}[role]
    sfx = "" if role == "embed_tokens" else SUFFIX[precision]
    return f"onnx/{base}{sfx}.onnx"


# ------------------------------------------------------------------------------------ torch graphs


def _modules():
    """The export wrappers (defined lazily: importing this module must not import torch)."""
    import torch
    from torch import nn

    from edgemm.models.modeling import rope_cos_sin

    class VisionEncoder(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            feats = encode_image_for_export(self.model, pixel_values)
            # second output: the same features as [B*K, D] (what onnxruntime-genai's pipeline passes on)
            return feats, feats.reshape(-1, feats.shape[-1])

    class EmbedTokens(nn.Module):
        """onnxruntime-genai's embedding contract: input_ids -> embeddings, and when `image_features`
        [N, D] are given (N > 0) the image-token rows take them in order (the prompt holds K image
        tokens per image). With N = 0 it is a plain lookup, image-token id included."""

        def __init__(self, model):
            super().__init__()
            self.embed = model.text.embed_tokens
            self.image_token_id = model.config.image_token_id

        def forward(self, input_ids, image_features):
            emb = self.embed(input_ids)
            d = emb.shape[-1]
            flat = torch.cat([image_features.reshape(-1, d).to(emb.dtype), torch.zeros(1, d, dtype=emb.dtype)], 0)
            # only when features are given: a generated image-token id embeds as itself
            is_img = (input_ids == self.image_token_id) & (image_features.shape[0] > 0)
            idx = (torch.cumsum(is_img.to(torch.int64), -1) - 1).clamp(min=0)
            idx = torch.minimum(idx, torch.full_like(idx, flat.shape[0] - 1))
            return torch.where(is_img[..., None], flat[idx], emb)

    class Decoder(nn.Module):
        """EdgeVLM's TextDecoder with the KV cache as explicit inputs/outputs.

        Same math as edgemm.models.modeling (mask rule included: a query sees keys <= its absolute
        index that are not padding, and always itself), written with shape ops that trace."""

        def __init__(self, model):
            super().__init__()
            self.text = model.text
            self.cfg = model.config.text

        def forward(self, inputs_embeds, attention_mask, position_ids, *past):
            c = self.cfg
            b, t = inputs_embeds.shape[0], inputs_embeds.shape[1]
            past_len = past[0].shape[2]
            total = attention_mask.shape[1]
            q_pos = torch.arange(t, dtype=torch.int64) + past_len
            k_pos = torch.arange(total, dtype=torch.int64)
            causal = k_pos[None, :] <= q_pos[:, None]
            allowed = causal[None, None] & (attention_mask[:, None, None, :] > 0)
            allowed = allowed | (k_pos[None, :] == q_pos[:, None])[None, None]
            bias = torch.where(allowed, torch.zeros((), dtype=inputs_embeds.dtype),
                               torch.full((), torch.finfo(inputs_embeds.dtype).min, dtype=inputs_embeds.dtype))
            cos, sin = rope_cos_sin(position_ids, c.head_dim, c.rope_theta, inputs_embeds.dtype)
            cos, sin = cos[:, None], sin[:, None]
            h_, kv, hd = c.num_heads, c.num_kv_heads, c.head_dim
            rep = h_ // kv
            x = inputs_embeds
            presents = []
            for i, layer in enumerate(self.text.layers):
                a = layer.self_attn
                h = layer.input_layernorm(x)
                q = a.q_proj(h).reshape(b, t, h_, hd).transpose(1, 2)
                k = a.k_proj(h).reshape(b, t, kv, hd).transpose(1, 2)
                v = a.v_proj(h).reshape(b, t, kv, hd).transpose(1, 2)
                q = q * cos + _rotate_half(q) * sin
                k = k * cos + _rotate_half(k) * sin
                k = torch.cat([past[2 * i], k], dim=2)
                v = torch.cat([past[2 * i + 1], v], dim=2)
                presents += [k, v]
                if rep > 1:  # = repeat_interleave(rep, dim=1), written with expand so that it traces cleanly
                    k = k[:, :, None].expand(b, kv, rep, total, hd).reshape(b, h_, total, hd)
                    v = v[:, :, None].expand(b, kv, rep, total, hd).reshape(b, h_, total, hd)
                scores = (q @ k.transpose(-1, -2)) * (hd ** -0.5) + bias
                out = scores.softmax(-1) @ v
                x = x + a.o_proj(out.transpose(1, 2).reshape(b, t, h_ * hd))
                x = x + layer.mlp(layer.post_attention_layernorm(x))
            logits = self.text.lm_head(self.text.norm(x))
            return (logits, *presents)

    def _rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat([-x[..., half:], x[..., :half]], dim=-1)

    class EmbedPlain(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.embed = model.text.embed_tokens

        def forward(self, input_ids):
            return self.embed(input_ids)

    _modules.plain = EmbedPlain
    return VisionEncoder, EmbedTokens, Decoder


def encode_image_for_export(model, pixel_values):
    """Projected visual tokens, with the config's visual-token compression applied when set."""
    from .bundle import visual_token_count

    vt = model.config.extras.get("visual_tokens")
    if vt:
        try:
            from edgemm.tokens.apply import compress_image
        except ImportError:
            raise EdgemmError("this model sets visual_tokens but edgemm.tokens (token compression) is not available") from None
        embeds = compress_image(model, pixel_values, vt).embeds
    else:
        embeds = model.encode_image(pixel_values).embeds
    want = visual_token_count(model.config)
    if embeds.shape[1] != want:
        raise EdgemmError(f"exporter bug: the vision encoder gives {embeds.shape[1]} visual tokens, the config implies {want}")
    return embeds


def _export(module, args, path: Path, input_names, output_names, dynamic_axes):
    import torch

    with warnings.catch_warnings():
        # The TorchScript-based exporter: on torch 2.13 it traces these small graphs in well under a
        # second into clean ONNX (Gather/MatMul/Softmax, no If), where torch.export would need a Dim
        # per cache length and still specialize the empty first-step cache. See docs/export-onnx.md.
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=OPSET, input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True)


def _sort_symbolic(g, self, *args):
    """aten::sort (also the stable overload, which the TorchScript exporter rejects) as ONNX TopK
    over the whole axis. TopK breaks ties by the lower index, which is exactly a stable sort."""
    from torch.onnx import symbolic_helper

    dim, desc = args[-2], args[-1]
    dim = symbolic_helper._parse_arg(dim, "i")
    desc = symbolic_helper._parse_arg(desc, "i")
    import torch

    size = g.op("Gather", g.op("Shape", self), g.op("Constant", value_t=torch.tensor([dim], dtype=torch.int64)), axis_i=0)
    return g.op("TopK", self, size, axis_i=dim, largest_i=int(bool(desc)), sorted_i=1, outputs=2)


def export_vision(model, path: Path, static: bool = False) -> str:
    """The vision encoder (with visual-token compression) as ONNX, checked against torch on random
    images at batch 1 and 3 (batch 1 only when `static`: fixed shape [1, C, S, S] for NPUs).
    TorchScript exporter first (with a TopK sort); the torch.export-based exporter as the fallback
    for what it cannot trace (e.g. DivPrune's torch.eye). Returns the exporter used."""
    import numpy as np
    import torch

    VisionEncoder, _, _ = _modules()
    cfg = model.config
    s, ch = cfg.vision.image_size, cfg.vision.num_channels
    mod = VisionEncoder(model).eval()
    batch = 1 if static else 2
    dyn_axes = None if static else {"pixel_values": {0: "batch_size"}, "image_features": {0: "batch_size"},
                                    "image_features_flat": {0: "num_image_tokens"}}
    dyn_shapes = None if static else ({0: torch.export.Dim("batch_size", min=1, max=4096)},)
    errors = []
    for how in ("torchscript", "dynamo"):
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if how == "torchscript":
                    torch.onnx.register_custom_op_symbolic("aten::sort", _sort_symbolic, OPSET)
                    try:
                        _export(mod, (torch.randn(batch, ch, s, s),), path, ["pixel_values"], VISION_OUTPUTS, dyn_axes)
                    finally:
                        torch.onnx.unregister_custom_op_symbolic("aten::sort", OPSET)
                else:
                    with _quiet():
                        torch.onnx.export(mod, (torch.randn(batch, ch, s, s),), str(path), dynamo=True,
                                          input_names=["pixel_values"], output_names=VISION_OUTPUTS,
                                          dynamic_shapes=dyn_shapes,
                                          external_data=False, verbose=False)
            _check(path)
            import onnxruntime as ort

            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            gen = torch.Generator().manual_seed(0)
            for b in ((1,) if static else (1, 3)):
                px = torch.randn(b, ch, s, s, generator=gen)
                with torch.no_grad():
                    ref = mod(px)[0].numpy()
                got = sess.run(["image_features"], {"pixel_values": px.numpy()})[0]
                if got.shape != ref.shape or np.abs(got - ref).max() > 1e-3 * max(1.0, float(np.abs(ref).max())):
                    raise EdgemmError(f"the {how}-exported vision encoder disagrees with torch")
            return how
        except EdgemmError as e:
            errors.append(f"{how}: {e}")
        except Exception as e:  # exporter failures come as many types
            errors.append(f"{how}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
    raise EdgemmError("cannot export the vision encoder to ONNX (" + "; ".join(errors) + ")")


def kv_names(n_layers: int):
    ins, outs = [], []
    for i in range(n_layers):
        ins += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outs += [f"present.{i}.key", f"present.{i}.value"]
    return ins, outs


def export_fp32(model, out_dir: Path) -> dict[str, Path]:
    """Write the three fp32 graphs into out_dir; -> {role: path}."""
    import torch

    _, EmbedTokens, Decoder = _modules()
    EmbedPlain = _modules.plain
    cfg = model.config
    tc = cfg.text
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    model = model.eval()
    with torch.no_grad():
        paths["vision_encoder"] = out_dir / "vision_encoder.onnx"
        export_vision(model, paths["vision_encoder"])
        paths["embed_tokens"] = out_dir / "embed_tokens.onnx"
        _export(EmbedPlain(model), (torch.zeros(2, 5, dtype=torch.int64),), paths["embed_tokens"],
                ["input_ids"], ["inputs_embeds"],
                {"input_ids": {0: "batch_size", 1: "sequence_length"}, "inputs_embeds": {0: "batch_size", 1: "sequence_length"}})
        paths["embed_genai"] = out_dir / "embed_tokens_genai.onnx"
        ids = torch.tensor([[1, cfg.image_token_id, cfg.image_token_id, 5, 6]] * 2)
        _export(EmbedTokens(model), (ids, torch.randn(4, tc.hidden_size)), paths["embed_genai"],
                ["input_ids", "image_features"], ["inputs_embeds"],
                {"input_ids": {0: "batch_size", 1: "sequence_length"}, "image_features": {0: "num_image_tokens"},
                 "inputs_embeds": {0: "batch_size", 1: "sequence_length"}})
        b, t, past = 2, 5, 3
        kv_in, kv_out = kv_names(tc.num_layers)
        pkv = tuple(torch.randn(b, tc.num_kv_heads, past, tc.head_dim) for _ in kv_in)
        args = (torch.randn(b, t, tc.hidden_size), torch.ones(b, past + t, dtype=torch.int64),
                torch.arange(past, past + t, dtype=torch.int64).expand(b, t).contiguous(), *pkv)
        dyn = {"inputs_embeds": {0: "batch_size", 1: "sequence_length"},
               "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
               "position_ids": {0: "batch_size", 1: "sequence_length"},
               "logits": {0: "batch_size", 1: "sequence_length"}}
        for n in kv_in:
            dyn[n] = {0: "batch_size", 2: "past_sequence_length"}
        for n in kv_out:
            dyn[n] = {0: "batch_size", 2: "total_sequence_length"}
        paths["decoder"] = out_dir / "decoder_model_merged.onnx"
        _export(Decoder(model), args, paths["decoder"], ["inputs_embeds", "attention_mask", "position_ids", *kv_in],
                ["logits", *kv_out], dyn)
    for p in paths.values():
        _check(p)
    return paths


def _check(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # onnx raises its own ValidationError / InferenceError
        raise EdgemmError(f"exporter bug: {path.name} fails onnx.checker: {str(e).splitlines()[0][:200]}") from None


# ------------------------------------------------------------------------------------ quantization


def quantize_int8(src: Path, dst: Path, prequantized: dict | None = None) -> dict:
    """onnxruntime's dynamic int8 (MatMul weights int8 per output channel, activations uint8 per
    call); MatMuls whose weights the checkpoint already holds as edgemm int8/int4 become MatMulNBits
    with those codes instead (see `map_prequantized`). Returns {"mapped": n, "requantized": n}."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src))
    mapped = map_prequantized(model, prequantized) if prequantized else 0
    tmp = dst.with_name(dst.stem + ".mapped.onnx")
    onnx.save(model, str(tmp))
    try:
        with _quiet():
            quantize_dynamic(str(tmp), str(dst), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8, per_channel=True)
    finally:
        tmp.unlink(missing_ok=True)
    _check(dst)
    out = onnx.load(str(dst)).graph.node
    return {"mapped": mapped, "requantized": sum(1 for n in out if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul"))}


def quantize_int4(src: Path, dst: Path, block_size: int = INT4_BLOCK, prequantized: dict | None = None) -> dict:
    """MatMulNBits (4-bit, symmetric blocks of `block_size`) through onnxruntime's
    MatMulNBitsQuantizer; MatMuls whose weights the checkpoint already holds as edgemm int4/int8
    take those codes verbatim (`map_prequantized`). Returns {"mapped": n, "requantized": n}."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))
    mapped = map_prequantized(model, prequantized) if prequantized else 0
    q = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=True)
    with _quiet():
        q.process()
    out = q.model.model
    n_nbits = sum(1 for n in out.graph.node if n.op_type == "MatMulNBits")
    onnx.save(out, str(dst))
    _check(dst)
    return {"mapped": mapped, "requantized": n_nbits - mapped}


@contextlib.contextmanager
def _quiet():
    """onnxruntime.quantization logs advice at WARNING/INFO on the root logger; keep exports quiet."""
    import logging

    root = logging.getLogger()
    old = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(old)


def _fingerprint(arr) -> str:
    import hashlib

    import numpy as np

    a = np.ascontiguousarray(np.asarray(arr, dtype=np.float32))
    return f"{a.shape}:" + hashlib.sha1(a.tobytes()).hexdigest()


@dataclass
class PackedWeight:
    """One linear's edgemm int4/int8 tensors (docs/formats.md) as MatMulNBits wants them."""

    name: str
    bits: int
    codes: "object"  # uint8 [N, K/2] (4-bit, even k in the low nibble) or [N, K] (8-bit, code + 128)
    scales: "object"  # float32 [N, K/G]
    zeros: "object"  # uint8 [N, K/G] unsigned zero points (None = symmetric: 8 or 128)
    group: int


def edgemm_packed_weights(model) -> dict:
    """{fingerprint of the dequantized W^T (as the exported MatMul holds it): PackedWeight} for every
    linear carrying edgemm int4/int8 tensors (module buffers qweight/scales[/zeros], docs/formats.md)."""
    import numpy as np

    out = {}
    for name, mod in model.named_modules():
        pw = _packed(name, mod)
        if pw is None:
            continue
        w = _dequant_packed(pw)
        out[_fingerprint(np.ascontiguousarray(w.T))] = pw
    return out


def _packed(name, mod):
    import numpy as np

    qw, sc = getattr(mod, "qweight", None), getattr(mod, "scales", None)
    if qw is None or sc is None or hasattr(mod, "input_scale"):  # W8A8 layers are not weight-only
        return None
    dt = str(qw.dtype)
    zeros = getattr(mod, "zeros", None)
    if dt == "torch.uint8" and getattr(mod, "bits", 4) == 4:
        n, k2 = qw.shape
        group = 2 * k2 // sc.shape[1]
        return PackedWeight(name, 4, qw.numpy(), sc.float().numpy(), None if zeros is None else zeros.numpy().astype(np.uint8), group)
    if dt == "torch.int8" and getattr(mod, "bits", 8) == 8:
        n, k = qw.shape
        group = k // sc.shape[1]
        codes = (qw.numpy().astype(np.int16) + 128).astype(np.uint8)
        z = None if zeros is None else (zeros.numpy().astype(np.int16) + 128).astype(np.uint8)
        return PackedWeight(name, 8, codes, sc.float().numpy(), z, group)
    return None


def _dequant_packed(pw: PackedWeight):
    import numpy as np

    if pw.bits == 4:
        lo, hi = pw.codes & 0xF, pw.codes >> 4
        u = np.stack([lo, hi], -1).reshape(pw.codes.shape[0], -1).astype(np.float32)
        zdef = 8
    else:
        u = pw.codes.astype(np.float32)
        zdef = 128
    z = np.float32(zdef) if pw.zeros is None else np.repeat(pw.zeros.astype(np.float32), pw.group, 1)
    return (u - z) * np.repeat(pw.scales.astype(np.float32), pw.group, 1)


def map_prequantized(model, pre: dict) -> int:
    """Replace MatMuls whose constant weight equals an edgemm-quantized weight by MatMulNBits nodes
    holding edgemm's codes, scales and zero points verbatim (4-bit: same nibble order as edgemm;
    8-bit: code + 128 with default zero point 128). Returns how many were mapped."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    new_nodes, mapped = [], 0
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits:
            w = numpy_helper.to_array(inits[node.input[1]])
            pw = pre.get(_fingerprint(w)) if w.ndim == 2 else None
            g = pw.group if pw is not None else 0
            if pw is not None and g >= 16 and not g & (g - 1):  # MatMulNBits: power-of-2 blocks >= 16
                n = pw.codes.shape[0]
                k = w.shape[0]
                base = f"{node.name or 'MatMul'}_{mapped}_NBits"
                per = g // 2 if pw.bits == 4 else g
                model.graph.initializer.extend([
                    numpy_helper.from_array(pw.codes.reshape(n, k // g, per).astype(np.uint8), base + "_B"),
                    numpy_helper.from_array(pw.scales.astype(np.float32).reshape(-1), base + "_scales")])
                ins = [node.input[0], base + "_B", base + "_scales"]
                if pw.zeros is not None:
                    zp = pw.zeros.astype(np.uint8)
                    if pw.bits == 4:
                        if zp.shape[1] % 2:
                            zp = np.concatenate([zp, np.zeros((n, 1), np.uint8)], 1)
                        zp = (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8)
                    model.graph.initializer.append(numpy_helper.from_array(zp.reshape(-1), base + "_zp"))
                    ins.append(base + "_zp")
                new_nodes.append(helper.make_node("MatMulNBits", ins, list(node.output), name=base, domain="com.microsoft",
                                                  K=k, N=n, bits=pw.bits, block_size=g))
                mapped += 1
                continue
        new_nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    if mapped and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return mapped


# ------------------------------------------------------------------------------------ HF side files


def hf_config(cfg, precision: str, processor) -> dict:
    """config.json in the shape of a transformers LLaVA config (what transformers.js and optimum
    read to size the KV cache and find the image token), plus edgemm's own config."""
    t, v = cfg.text, cfg.vision
    from .bundle import visual_token_count

    k = visual_token_count(cfg)
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_index": cfg.image_token_id,
        "image_seq_length": k,
        "vision_feature_layer": cfg.vision_feature_layer,
        "vision_feature_select_strategy": cfg.vision_feature_select,
        "projector_hidden_act": cfg.projector.hidden_act,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
        "tie_word_embeddings": t.tie_word_embeddings,
        "text_config": {
            "model_type": "llama", "architectures": ["LlamaForCausalLM"],
            "vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_layers, "num_attention_heads": t.num_heads,
            "num_key_value_heads": t.num_kv_heads, "head_dim": t.head_dim, "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta, "max_position_embeddings": t.max_position_embeddings,
            "hidden_act": "silu", "tie_word_embeddings": t.tie_word_embeddings,
            "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
            "use_cache": True,
        },
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": v.hidden_size, "image_size": v.image_size,
            "patch_size": v.patch_size, "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads,
            "intermediate_size": v.intermediate_size, "layer_norm_eps": v.layer_norm_eps, "hidden_act": v.hidden_act,
            "num_channels": v.num_channels,
        },
        "transformers.js_config": {
            "dtype": {"vision_encoder": JS_DTYPE[precision if precision != "int4" else "int8"],
                      "embed_tokens": "fp32", "decoder_model_merged": JS_DTYPE[precision]},
            "kv_cache_dtype": "float32",
        },
        "edgemm": {"note": "EdgeVLM exported by edgemm; the ONNX graphs are the model, this file describes their shapes",
                   "config": cfg.to_dict(), "prompt_template": cfg.prompt_template,
                   "image_token": processor.image_token},
    }


def side_files(cfg, precision: str, processor, max_context: int) -> dict[str, dict]:
    v = cfg.vision
    tok = processor.tokenizer
    name = lambda i: tok.id_to_token(i)  # noqa: E731
    return {
        "config.json": hf_config(cfg, precision, processor),
        "generation_config.json": {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
                                   "pad_token_id": cfg.pad_token_id, "do_sample": False,
                                   "max_length": max_context},
        "preprocessor_config.json": {
            "image_processor_type": "CLIPImageProcessor", "processor_class": "LlavaProcessor",
            "do_resize": True, "size": {"height": v.image_size, "width": v.image_size},
            "do_center_crop": False, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(v.image_mean), "image_std": list(v.image_std), "do_convert_rgb": True,
            "resample": 3, "edgemm_resize": v.image_resize,
        },
        "tokenizer_config.json": {
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name(cfg.bos_token_id),
            "eos_token": name(cfg.eos_token_id), "pad_token": name(cfg.pad_token_id),
            "add_bos_token": True, "add_eos_token": False, "model_max_length": max_context,
            "image_token": processor.image_token, "padding_side": "left",
        },
    }


def genai_config(cfg, precision: str, max_context: int) -> dict:
    """onnxruntime-genai's genai_config.json (decoder + embedding + vision sections)."""
    t = cfg.text
    return {
        "model": {
            "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
            # genai has no LLaVA type; "gemma3" is its generic vision -> embedding -> decoder pipeline
            # whose vision model takes only pixel_values (docs/export-onnx.md says what is verified)
            "context_length": max_context, "vocab_size": t.vocab_size, "type": "gemma3",
            "image_token_id": cfg.image_token_id,
            "vision": {"filename": file_name("vision_encoder", "int8" if precision == "int4" else precision),
                       "inputs": {"pixel_values": "pixel_values"},
                       "outputs": {"image_features": "image_features_flat"}},
            "embedding": {"filename": "onnx/embed_tokens_genai.onnx",
                          "inputs": {"input_ids": "input_ids", "image_features": "image_features"},
                          "outputs": {"inputs_embeds": "inputs_embeds"}},
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": file_name("decoder", precision),
                "head_size": t.head_dim, "hidden_size": t.hidden_size, "num_attention_heads": t.num_heads,
                "num_key_value_heads": t.num_kv_heads, "num_hidden_layers": t.num_layers,
                "inputs": {"inputs_embeds": "inputs_embeds", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "max_length": max_context, "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0, "early_stopping": True, "length_penalty": 1.0,
                   "no_repeat_ngram_size": 0, "diversity_penalty": 0.0},
    }


# ------------------------------------------------------------------------------------ bundle writer


def write(bw, loaded, precision: str = "fp32", lane: str = "cpu", processor: str = "cpu", side: bool = True, **_ignored) -> list:
    """Add the ONNX graphs of `loaded` at `precision` (fp32 | int8 | int4) to the bundle `bw`.

    Returns the added Artifacts. Can be called several times on one bundle (one per precision); the
    fp32 graphs are exported once and quantized from."""
    import shutil
    import tempfile

    if precision not in PRECISIONS:
        raise EdgemmError(f"unknown ONNX precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    model = loaded.model
    cfg = loaded.config
    max_context = int(bw.extra.get("max_context") or cfg.text.max_position_embeddings)
    quant = cfg.extras.get("quantization")
    arts = []
    with tempfile.TemporaryDirectory(prefix="edgemm-onnx-") as td:
        fp = export_fp32(_float_copy(model), Path(td))
        vis_prec = "int8" if precision == "int4" else precision  # the q4 set keeps an int8 vision encoder
        rel = {r: file_name(r, vis_prec if r == "vision_encoder" else precision) for r in ("vision_encoder", "embed_tokens", "decoder")}
        emb = bw.path(rel["embed_tokens"])
        if not emb.exists():
            shutil.copy(fp["embed_tokens"], emb)
            arts.append(Artifact(rel["embed_tokens"], "embed_tokens", "onnx", "fp32", lane, processor, "onnxruntime",
                                 extra={"inputs": ["input_ids"], "outputs": ["inputs_embeds"]}))
        emb_g = bw.path("onnx/embed_tokens_genai.onnx")
        if side and not emb_g.exists():
            shutil.copy(fp["embed_genai"], emb_g)
            arts.append(Artifact("onnx/embed_tokens_genai.onnx", "embed_tokens_genai", "onnx", "fp32", lane, processor, "",
                                 extra={"inputs": ["input_ids", "image_features"], "outputs": ["inputs_embeds"],
                                        "for": "onnxruntime-genai"}))
        extra_dec = {}
        if precision == "fp32":
            shutil.copy(fp["vision_encoder"], bw.path(rel["vision_encoder"]))
            shutil.copy(fp["decoder"], bw.path(rel["decoder"]))
            if quant:
                bw.note(f"the model carries edgemm {_quant_desc(quant)} weights; the fp32 ONNX graphs hold them dequantized")
        else:
            pre = edgemm_packed_weights(model) if quant else {}
            vis = bw.path(rel["vision_encoder"])
            if not vis.exists():  # int8 in both sets (the q4 set keeps an int8 vision encoder, as llama.cpp its mmproj)
                quantize_int8(fp["vision_encoder"], vis, prequantized=pre)
            if precision == "int8":
                res = quantize_int8(fp["decoder"], bw.path(rel["decoder"]), prequantized=pre)
                msg = "ONNX int8: onnxruntime quantize_dynamic (int8 per-channel MatMul weights, dynamic uint8 activations)"
            else:
                res = quantize_int4(fp["decoder"], bw.path(rel["decoder"]), prequantized=pre)
                msg = f"ONNX int4: MatMulNBits (4-bit, symmetric, block {INT4_BLOCK}) from onnxruntime's MatMulNBitsQuantizer"
                extra_dec["int4_block_size"] = INT4_BLOCK
            extra_dec.update(res)
            if res["mapped"]:
                msg += (f"; {res['mapped']} decoder MatMuls carry the checkpoint's own edgemm int4/int8 codes, scales and zero "
                        f"points verbatim as MatMulNBits, {res['requantized']} were quantized by onnxruntime")
            elif quant:
                msg += f"; the model's edgemm {_quant_desc(quant)} weights had no MatMulNBits mapping and were re-quantized"
            bw.note(msg)
        if not any(a.file == rel["vision_encoder"] for a in bw.artifacts):
            arts.append(Artifact(rel["vision_encoder"], "vision_encoder", "onnx", vis_prec, lane, processor, "onnxruntime",
                                 extra={"inputs": ["pixel_values"], "outputs": ["image_features"]}))
        arts.append(Artifact(rel["decoder"], "decoder", "onnx", precision, lane, processor, "onnxruntime",
                             extra={"num_layers": cfg.text.num_layers, "kv_cache": "explicit", **extra_dec}))
    for a in arts:
        bw.add(a)
    if side:
        for name, obj in side_files(cfg, precision, loaded.processor, max_context).items():
            p = bw.path(name)
            if not p.exists():
                p.write_text(json.dumps(obj, indent=2) + "\n")
                bw.add(Artifact(name, "hf_" + name.split(".")[0], "json", "-", "cpu", "cpu", ""))
        gp = bw.path("genai_config.json")
        if not gp.exists():
            gp.write_text(json.dumps(genai_config(cfg, precision, max_context), indent=2) + "\n")
            bw.add(Artifact("genai_config.json", "genai_config", "json", "-", "cpu", "cpu", ""))
    return arts


def _quant_desc(q) -> str:
    if isinstance(q, dict) and isinstance(q.get("layers"), dict):  # edgemm.compress metadata
        fmts = sorted({str(v.get("format", "?")) for v in q["layers"].values() if isinstance(v, dict)})
        return "/".join(fmts) or "quantized"
    if isinstance(q, dict):
        return str(q.get("method") or q.get("format") or q.get("bits") or "quantized")
    return str(q)


def _float_copy(model):
    """The model as plain float nn.Linear layers (compressed layers dequantized) for tracing."""
    import copy

    import torch
    from torch import nn

    if all(type(m) in (nn.Linear,) or not hasattr(m, "qweight") for m in model.modules()):
        return model
    m2 = copy.deepcopy(model)
    for name, mod in list(m2.named_modules()):
        for cname, child in list(mod.named_children()):
            if hasattr(child, "qweight") and not isinstance(child, nn.Linear):
                w = _dequant_module(child)
                lin = nn.Linear(w.shape[1], w.shape[0], bias=getattr(child, "bias", None) is not None)
                with torch.no_grad():
                    lin.weight.copy_(w)
                    if lin.bias is not None:
                        lin.bias.copy_(child.bias.float())
                setattr(mod, cname, lin)
    return m2.eval()


def _dequant_module(mod):
    """A compressed linear's float weight: docs/formats.md's dequantization for int4/int8 packed
    layers (so that `map_prequantized` recognises them), else the layer's own dequantize()."""
    import torch

    pw = _packed("", mod)
    if pw is not None:
        return torch.from_numpy(_dequant_packed(pw))
    for attr in ("dequantize", "dequantized_weight", "weight_float"):
        f = getattr(mod, attr, None)
        if callable(f):
            return f().float()
    raise EdgemmError(f"cannot read the weights of compressed layer {type(mod).__name__}")
