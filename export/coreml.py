"""Core ML exporter: three ML Program packages (iOS 18 / macOS 15), converted by coremltools on Linux.

Under `coreml/` in the bundle:

- `vision_encoder.mlpackage`: `images` f32 [1, 3, S, S] -> `image_embeds` f16 [1, K, D] (ViT to the
  feature layer, [CLS] dropped per config, visual-token compression of `config.extras["visual_tokens"]`
  inside, projector). Static shapes.
- `token_embedding.mlpackage`: `input_ids` i32 [1, T] -> `embeddings` f16 [1, T, D], T in 1..max_context.
- `text_decoder.mlpackage`: a stateful decoder. Inputs `inputs_embeds` f16 [1, T, D] and
  `causal_mask` f16 [1, 1, T, E] (additive: 0 = attend, -inf = masked), where E = past + T is the
  number of cache positions filled after this call (T and E flexible in 1..max_context). States
  `key_cache` / `value_cache` f16 [layers, 1, H_kv, max_context, head_dim] (ct.StateType): the call
  writes its keys/values at positions E-T..E-1 and attends over positions 0..E-1. Output `logits`
  f16 [1, V] of the last position. A new conversation starts with a fresh state
  (`model.make_state()`); a chunked prefill is several calls with growing E.

Precisions: `fp16` (weights and compute float16; the default), `int8` (every linear weight int8 per
output channel, linear_symmetric, `cto.linear_quantize_weights`), `int4` (decoder linear weights int4
per block of 32 along the input, vision encoder and projector int8), both with float16 compute. The
token embedding table stays float16.

What Linux can and cannot verify (see docs/export-coreml.md): coremltools' Linux build
converts and saves packages and reads them back as specs (libmodelpackage) and their weights
(libmilstoragepython), but it has no Core ML framework, so `MLModel.predict` is unavailable. edgemm
checks the saved packages' interfaces, states, ops and weight types, and runs the saved MIL programs
with its own NumPy interpreter of the op subset they use (`MilInterpreter` below), float16 rounding
after every op, against the torch reference. That interpreter is edgemm's reading of the MIL op
semantics, not Apple's runtime: Core ML's kernels, compute-unit placement (CPU/GPU/ANE) and speed
are not verified here.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from pathlib import Path

import numpy as np

from edgemm.errors import EdgemmError

PRECISIONS = ("fp16", "int8", "int4")
INT4_BLOCK = 32
PACKAGES = {"vision_encoder": "coreml/vision_encoder.mlpackage", "token_embedding": "coreml/token_embedding.mlpackage",
            "text_decoder": "coreml/text_decoder.mlpackage"}
ROLES = {"vision_encoder": "vision_encoder", "token_embedding": "embed_tokens", "text_decoder": "decoder"}


def _import_coremltools():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import logging

            logging.getLogger("coremltools").setLevel(logging.ERROR)
            import coremltools as ct
    except ImportError as e:
        raise EdgemmError(f"the coreml exporter needs coremltools ({e.name} is missing): pip install 'edgemm[export]'") from None
    return ct


@contextlib.contextmanager
def _numpy2_int_cast():
    """coremltools 9.0's torch `int`/`bool` cast of a folded constant calls int() on a 1-element array,
    which numpy >= 2.? refuses ("only 0-dimensional arrays can be converted to Python scalars"). Fold
    such constants through .item() for the duration of a conversion; everything else is unchanged."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch import ops

    orig = ops._cast

    def _cast(context, node, dtype, dtype_name):
        x = ops._get_inputs(context, node, expected=1)[0]
        if x.can_be_folded_to_const() and np.ndim(x.val) > 0 and np.size(x.val) == 1:
            context.add(mb.const(val=dtype(np.asarray(x.val).reshape(-1)[0].item()), name=node.name), node.name)
            return
        orig(context, node, dtype, dtype_name)

    ops._cast = _cast
    try:
        yield
    finally:
        ops._cast = orig


# ------------------------------------------------------------------------------------ the wrappers


def _modules():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class VisionEncoder(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, images):
            return self.model.encode_image(images).embeds

    class TokenEmbedding(nn.Module):
        def __init__(self, embed_tokens):
            super().__init__()
            self.embed_tokens = embed_tokens

        def forward(self, input_ids):
            return self.embed_tokens(input_ids)

    class StatefulTextDecoder(nn.Module):
        """EdgeVLM's decoder over a float16 KV cache held in registered buffers (Core ML states).

        The positions come from the shapes (E = causal_mask.shape[-1], start = E - T), as in Apple's
        stateful Llama example, so no tensor-to-int conversion enters the graph."""

        def __init__(self, text, max_context: int):
            super().__init__()
            self.text = text
            c = text.cfg
            self.max_context = max_context
            inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float32) / c.head_dim))
            self.register_buffer("inv_freq", inv_freq, persistent=False)
            shape = (c.num_layers, 1, c.num_kv_heads, max_context, c.head_dim)
            self.register_buffer("key_cache", torch.zeros(shape, dtype=torch.float16))
            self.register_buffer("value_cache", torch.zeros(shape, dtype=torch.float16))

        def forward(self, inputs_embeds, causal_mask):
            c = self.text.cfg
            t = inputs_embeds.shape[1]
            end = causal_mask.shape[-1]
            start = end - t
            freqs = torch.arange(start, end).float()[:, None] * self.inv_freq[None]
            emb = torch.cat([freqs, freqs], -1)[None, None]  # [1, 1, T, head_dim]
            cos, sin = emb.cos(), emb.sin()
            h2 = c.head_dim // 2
            rep = c.num_heads // c.num_kv_heads
            x = inputs_embeds
            for i, layer in enumerate(self.text.layers):
                a = layer.self_attn
                h = layer.input_layernorm(x)
                q = a.q_proj(h).view(1, t, c.num_heads, c.head_dim).transpose(1, 2)
                k = a.k_proj(h).view(1, t, c.num_kv_heads, c.head_dim).transpose(1, 2)
                v = a.v_proj(h).view(1, t, c.num_kv_heads, c.head_dim).transpose(1, 2)
                q = q * cos + torch.cat([-q[..., h2:], q[..., :h2]], -1) * sin
                k = k * cos + torch.cat([-k[..., h2:], k[..., :h2]], -1) * sin
                self.key_cache[i:i + 1, :, :, start:end] = k.to(torch.float16)[None]
                self.value_cache[i:i + 1, :, :, start:end] = v.to(torch.float16)[None]
                kc = self.key_cache[i, :, :, :end].to(q.dtype)
                vc = self.value_cache[i, :, :, :end].to(q.dtype)
                if rep > 1:
                    kc, vc = kc.repeat_interleave(rep, dim=1), vc.repeat_interleave(rep, dim=1)
                o = F.scaled_dot_product_attention(q, kc, vc, attn_mask=causal_mask.to(q.dtype))
                x = x + a.o_proj(o.transpose(1, 2).reshape(1, t, c.num_heads * c.head_dim))
                x = x + layer.mlp(layer.post_attention_layernorm(x))
            return self.text.lm_head(self.text.norm(x[:, -1]))

    return VisionEncoder, TokenEmbedding, StatefulTextDecoder


def causal_mask(past: int, t: int, dtype=np.float16) -> np.ndarray:
    """The text_decoder's mask for T new tokens after `past` cached ones: [1, 1, T, past + T]."""
    q = np.arange(past, past + t)[:, None]
    k = np.arange(past + t)[None, :]
    return np.where(k <= q, 0.0, -np.inf).astype(dtype)[None, None]


def prepare(model, max_context: int | None = None) -> dict:
    """The eager modules that become the packages (deep copies; edgemm's packed layers dequantized)."""
    import torch

    from .executorch import _unpack_edgemm_layers

    cfg = model.config
    max_context = int(max_context or cfg.text.max_position_embeddings)
    if not 8 <= max_context <= cfg.text.max_position_embeddings:
        raise EdgemmError(f"max_context must be in 8..{cfg.text.max_position_embeddings} (the model's context), got {max_context}")
    VisionEncoder, TokenEmbedding, StatefulTextDecoder = _modules()
    m = copy.deepcopy(model).eval()
    packed = _unpack_edgemm_layers(m)
    text = m.text
    m.text = None
    embed = TokenEmbedding(copy.deepcopy(text.embed_tokens)).eval()
    if cfg.text.tie_word_embeddings:
        text.lm_head.weight = torch.nn.Parameter(text.embed_tokens.weight.detach().clone())
    text.embed_tokens = None
    return {"vision_encoder": VisionEncoder(m).eval(), "token_embedding": embed,
            "text_decoder": StatefulTextDecoder(text, max_context).eval(), "packed": packed}


# ------------------------------------------------------------------------------------- conversion


def convert(mods: dict, config, precision: str = "fp16", progress=None) -> dict:
    """jit.trace + ct.convert each module; quantize weights as `precision` says. -> {name: MLModel}."""
    ct = _import_coremltools()
    import torch

    from .executorch import _sort_free_mode

    if precision not in PRECISIONS:
        raise EdgemmError(f"unknown coreml precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    step = progress or (lambda msg: None)
    cfg = config
    dec = mods["text_decoder"]
    n = dec.max_context
    s, d = cfg.vision.image_size, cfg.text.hidden_size
    common = dict(minimum_deployment_target=ct.target.iOS18, compute_precision=ct.precision.FLOAT16,
                  skip_model_load=True, convert_to="mlprogram")
    out = {}
    with torch.no_grad(), warnings.catch_warnings(), _numpy2_int_cast():
        warnings.simplefilter("ignore")
        step("vision_encoder")
        px = torch.zeros(1, cfg.vision.num_channels, s, s)
        with _sort_free_mode():  # stable, exact top-k for visual-token compression (as in the .pte)
            tr = torch.jit.trace(mods["vision_encoder"], (px,), check_trace=False)
        out["vision_encoder"] = ct.convert(
            tr, inputs=[ct.TensorType("images", shape=tuple(px.shape), dtype=np.float32)],
            outputs=[ct.TensorType("image_embeds", dtype=np.float16)], **common)
        step("token_embedding")
        t = ct.RangeDim(lower_bound=1, upper_bound=n, default=4)
        tr = torch.jit.trace(mods["token_embedding"], (torch.zeros(1, 4, dtype=torch.long),), check_trace=False)
        out["token_embedding"] = ct.convert(
            tr, inputs=[ct.TensorType("input_ids", shape=(1, t), dtype=np.int32)],
            outputs=[ct.TensorType("embeddings", dtype=np.float16)], **common)
        step("text_decoder")
        ex = (torch.zeros(1, 4, d), torch.from_numpy(causal_mask(2, 4, np.float32)))
        tr = torch.jit.trace(dec, ex, check_trace=False)
        t = ct.RangeDim(lower_bound=1, upper_bound=n, default=4)
        e = ct.RangeDim(lower_bound=1, upper_bound=n, default=6)
        shape = tuple(dec.key_cache.shape)
        out["text_decoder"] = ct.convert(
            tr, inputs=[ct.TensorType("inputs_embeds", shape=(1, t, d), dtype=np.float16),
                        ct.TensorType("causal_mask", shape=(1, 1, t, e), dtype=np.float16)],
            outputs=[ct.TensorType("logits", dtype=np.float16)],
            states=[ct.StateType(ct.TensorType(shape=shape, dtype=np.float16), name="key_cache"),
                    ct.StateType(ct.TensorType(shape=shape, dtype=np.float16), name="value_cache")],
            **common)
    if precision != "fp16":
        step(f"weights {precision}")
        out["vision_encoder"] = _quantize(out["vision_encoder"], "int8")
        out["text_decoder"] = _quantize(out["text_decoder"], precision)
    return out


def _quantize(mlmodel, precision: str):
    import coremltools.optimize.coreml as cto

    if precision == "int8":
        op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=0)
    else:
        op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block",
                                         block_size=INT4_BLOCK, weight_threshold=0)
    cfg = cto.OptimizationConfig(op_type_configs={"linear": op, "matmul": None})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cto.linear_quantize_weights(mlmodel, config=cfg)


# ---------------------------------------------------------------------------------- inspection


def inspect_package(path) -> dict:
    """What a saved .mlpackage declares, read back on Linux: spec version, deployment target, inputs,
    outputs and states (name, type, shape or flexible range), op counts per function, and the
    weight storage types (const / constexpr ops)."""
    ct = _import_coremltools()
    from collections import Counter

    spec = ct.utils.load_spec(str(path))
    desc = spec.description

    def feature(f):
        t = f.type
        kind = t.WhichOneof("Type")
        if kind == "multiArrayType":
            a = t.multiArrayType
            shape = list(a.shape)
            rng = None
            if a.WhichOneof("ShapeFlexibility") == "shapeRange":
                rng = [[r.lowerBound, r.upperBound] for r in a.shapeRange.sizeRanges]
            dtype = ct.proto.FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(a.dataType).lower()
            return {"name": f.name, "type": "tensor", "dtype": dtype, "shape": shape, "range": rng}
        if kind == "stateType":
            a = t.stateType.arrayType
            dtype = ct.proto.FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(a.dataType).lower()
            return {"name": f.name, "type": "state", "dtype": dtype, "shape": list(a.shape)}
        return {"name": f.name, "type": kind}

    functions = {}
    weights = Counter()
    linear = Counter()  # linear/matmul weight inputs by storage: float16 const, or the constexpr op producing them
    for fname, fn in spec.mlProgram.functions.items():
        for opset, blk in fn.block_specializations.items():
            ops = Counter(op.type for op in blk.operations)
            functions[fname] = {"opset": opset, "ops": dict(sorted(ops.items())), "num_ops": sum(ops.values())}
            producer = {o.name: op for op in blk.operations for o in op.outputs}
            for op in blk.operations:
                if op.type in ("linear", "matmul"):
                    arg = op.inputs.get("weight") or op.inputs.get("y")
                    b = arg.arguments[0] if arg is not None and arg.arguments else None
                    src = producer.get(b.name) if b is not None and b.WhichOneof("binding") == "name" else None
                    if src is None:
                        continue  # an activation (e.g. attention's matmul)
                    if src.type == "const":
                        linear["const:" + _dtype_name(src.attributes["val"].type)] += 1
                    elif src.type.startswith("constexpr_"):
                        data = src.inputs.get("data") or src.inputs.get("indices")
                        dt = ""
                        if data is not None and data.arguments:
                            a0 = data.arguments[0]
                            if a0.WhichOneof("binding") == "value":
                                dt = ":" + _dtype_name(a0.value.type)
                            else:
                                d = producer.get(a0.name)
                                dt = ":" + _dtype_name(d.attributes["val"].type) if d is not None and d.type == "const" else ""
                        linear[src.type + dt] += 1
            for op in blk.operations:
                if op.type == "const":
                    v = op.attributes["val"]
                    if v.WhichOneof("value") == "blobFileValue":
                        weights["const:" + _dtype_name(v.type)] += 1
                elif op.type.startswith("constexpr_"):
                    weights[op.type] += 1
    return {
        "specification_version": spec.specificationVersion,
        "inputs": [feature(f) for f in desc.input],
        "outputs": [feature(f) for f in desc.output],
        "states": [feature(f) for f in desc.state],
        "functions": functions,
        "weights": dict(sorted(weights.items())),
        "linear_weights": dict(sorted(linear.items())),
    }


def _dtype_name(value_type) -> str:
    from coremltools.proto import MIL_pb2

    return MIL_pb2.DataType.Name(value_type.tensorType.dataType).lower()


# ------------------------------------------------------------------------------- MIL interpreter

_NP = {"bool": np.bool_, "float16": np.float16, "float32": np.float32, "float64": np.float64, "int8": np.int8,
       "int16": np.int16, "int32": np.int32, "int64": np.int64, "uint8": np.uint8, "uint16": np.uint16,
       "uint32": np.uint32, "uint64": np.uint64, "int4": np.int8, "uint4": np.uint8, "uint1": np.uint8,
       "uint2": np.uint8, "uint3": np.uint8, "uint6": np.uint8}
_CAST = {"fp16": np.float16, "fp32": np.float32, "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8,
         "uint16": np.uint16, "bool": np.bool_}


class MilInterpreter:
    """Runs a saved ML Program (.mlpackage) with NumPy: edgemm's reading of the MIL op semantics for the
    ops edgemm's packages use, so the converted graph (wiring, states, masks, weights as saved) can be
    checked against torch on Linux, where Core ML itself is unavailable.

    Every op computes in float32 (float64 for reductions) and rounds its result to the dtype the
    program declares for that output (float16 here), as an fp16 device would store it. It is not
    Core ML: kernel accumulation order, fused ops and compute-unit placement differ on a device.
    States persist across calls (`reset_state()` zeroes them, like a fresh `make_state()`)."""

    def __init__(self, package, function: str = "main"):
        ct = _import_coremltools()
        from coremltools.libmilstoragepython import _BlobStorageReader
        from coremltools.proto import MIL_pb2

        self.MIL = MIL_pb2
        self.path = Path(package)
        spec = ct.utils.load_spec(str(self.path))
        fn = spec.mlProgram.functions[function]
        self.block = fn.block_specializations[fn.opset]
        self.inputs = {i.name: i.type for i in fn.inputs}
        self.state_names = [n for n, t in self.inputs.items() if t.WhichOneof("type") == "stateType"]
        weights = self.path / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
        self.reader = _BlobStorageReader(str(weights)) if weights.exists() else None
        self.consts: dict = {}
        self.states: dict = {}
        for op in self.block.operations:
            if op.type == "const":
                self.consts[op.outputs[0].name] = self._value(op.attributes["val"])
        self.reset_state()

    # -- values
    def _dtype(self, value_type) -> str:
        return self.MIL.DataType.Name(value_type.tensorType.dataType).lower()

    def _shape(self, value_type):
        return [d.constant.size for d in value_type.tensorType.dimensions]

    def _value(self, v):
        dtype, shape = self._dtype(v.type), self._shape(v.type)
        if v.WhichOneof("value") == "blobFileValue":
            off = v.blobFileValue.offset
            read = {"float16": lambda: self.reader.read_fp16_data(off).view(np.float16),
                    "float32": lambda: self.reader.read_float_data(off), "int8": lambda: self.reader.read_int8_data(off),
                    "uint8": lambda: self.reader.read_uint8_data(off), "int4": lambda: self.reader.read_int4_data(off),
                    "uint4": lambda: self.reader.read_uint4_data(off), "int16": lambda: self.reader.read_int16_data(off),
                    "uint16": lambda: self.reader.read_uint16_data(off), "int32": lambda: self.reader.read_int32_data(off),
                    "uint32": lambda: self.reader.read_uint32_data(off)}
            if dtype not in read:
                raise EdgemmError(f"MilInterpreter: no reader for {dtype} weights")
            arr = np.asarray(read[dtype]())
            return arr.reshape(-1)[: int(np.prod(shape))].reshape(shape).astype(_NP[dtype])
        t = v.immediateValue.tensor
        kind = t.WhichOneof("value")
        if kind == "strings":
            vals = list(t.strings.values)
            return vals[0] if not shape else np.array(vals).reshape(shape)
        if kind == "bytes":
            raw = t.bytes.values
            np_t = {"float16": np.float16, "int8": np.int8, "uint8": np.uint8, "int16": np.int16, "uint16": np.uint16,
                    "bfloat16": None}.get(dtype)
            if np_t is None:
                raise EdgemmError(f"MilInterpreter: immediate {dtype} bytes are not supported")
            arr = np.frombuffer(raw, dtype=np_t)
        else:
            arr = np.array(list(getattr(t, kind).values))
        if dtype in _NP:
            arr = arr.astype(_NP[dtype])
        return arr.reshape(shape) if shape else arr.reshape(()) if arr.size == 1 else arr

    def constexpr_values(self) -> dict:
        """{output name: decompressed float32 array} of the program's constexpr (compressed weight) ops,
        as Core ML materializes them at load (e.g. int4 codes x block scales)."""
        out = {}
        for op in self.block.operations:
            if op.type.startswith("constexpr_"):
                fn = getattr(self, "op_" + op.type, None)
                if fn is None:
                    raise EdgemmError(f"MilInterpreter: op {op.type} is not implemented")
                args = {}
                for k, arg in op.inputs.items():
                    b = arg.arguments[0]
                    args[k] = self.consts[b.name] if b.WhichOneof("binding") == "name" else self._value(b.value)
                out[op.outputs[0].name] = np.asarray(fn(**args), np.float32)
        return out

    def reset_state(self):
        for n in self.state_names:
            t = self.inputs[n].stateType.wrappedType
            self.states[n] = np.zeros(self._shape(t), dtype=_NP[self._dtype(t)])

    # -- execution
    def __call__(self, **feeds) -> dict:
        env = dict(self.consts)
        for n, t in self.inputs.items():
            if n in self.state_names:
                env[n] = ("state", n)
            elif n not in feeds:
                raise EdgemmError(f"MilInterpreter: missing input {n}")
            else:
                env[n] = np.asarray(feeds[n]).astype(_NP[self._dtype(t)])
        for op in self.block.operations:
            if op.type == "const":
                continue
            args = {}
            for k, arg in op.inputs.items():
                vals = [env[b.name] if b.WhichOneof("binding") == "name" else self._value(b.value) for b in arg.arguments]
                args[k] = vals if k in ("values",) else vals[0]
            fn = getattr(self, "op_" + op.type, None)
            if fn is None:
                raise EdgemmError(f"MilInterpreter: op {op.type} is not implemented")
            res = fn(**args)
            res = res if isinstance(res, tuple) else (res,)
            for o, r in zip(op.outputs, res):
                if o.type.WhichOneof("type") == "tensorType" and r is not None:
                    r = np.asarray(r).astype(_NP[self._dtype(o.type)])
                    tt = o.type.tensorType
                    if r.ndim != tt.rank and all(d.WhichOneof("dimension") == "constant" for d in tt.dimensions):
                        r = r.reshape(self._shape(o.type))  # e.g. a 1-element vector declared as a scalar
                env[o.name] = r
        return {n: env[n] for n in self.block.outputs}

    # -- ops (MIL iOS18 semantics for the parameters edgemm's programs use)
    @staticmethod
    def _f(x):
        return np.asarray(x, dtype=np.float32)

    def op_cast(self, x, dtype):
        return np.asarray(x).astype(_CAST[str(dtype)])

    def op_add(self, x, y): return self._f(x) + self._f(y) if np.asarray(x).dtype.kind == "f" else np.asarray(x) + np.asarray(y)
    def op_sub(self, x, y): return self._f(x) - self._f(y) if np.asarray(x).dtype.kind == "f" else np.asarray(x) - np.asarray(y)
    def op_mul(self, x, y): return self._f(x) * self._f(y) if np.asarray(x).dtype.kind == "f" else np.asarray(x) * np.asarray(y)
    def op_real_div(self, x, y): return self._f(x) / self._f(y)
    def op_floor_div(self, x, y): return np.floor_divide(x, y)
    def op_pow(self, x, y): return np.power(self._f(x), self._f(y))
    def op_maximum(self, x, y): return np.maximum(x, y)
    def op_minimum(self, x, y): return np.minimum(x, y)
    def op_sqrt(self, x): return np.sqrt(self._f(x))
    def op_rsqrt(self, x, epsilon=1e-12): return 1.0 / np.sqrt(self._f(x) + np.float32(epsilon))
    def op_exp(self, x): return np.exp(self._f(x))
    def op_cos(self, x): return np.cos(self._f(x))
    def op_sin(self, x): return np.sin(self._f(x))
    def op_neg(self, x): return -np.asarray(x)
    def op_sigmoid(self, x): return 1.0 / (1.0 + np.exp(-self._f(x)))
    def op_silu(self, x): return self._f(x) / (1.0 + np.exp(-self._f(x)))
    def op_relu(self, x): return np.maximum(self._f(x), 0)

    def op_gelu(self, x, mode="EXACT"):
        import math
        x = self._f(x).astype(np.float64)
        if mode == "EXACT":
            from math import erf
            return 0.5 * x * (1 + np.vectorize(erf)(x / math.sqrt(2)))
        if mode == "TANH_APPROXIMATION":
            return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
        return x / (1 + np.exp(-1.702 * x))

    def op_equal(self, x, y): return np.equal(x, y)
    def op_not_equal(self, x, y): return np.not_equal(x, y)
    def op_greater(self, x, y): return np.greater(x, y)
    def op_greater_equal(self, x, y): return np.greater_equal(x, y)
    def op_less(self, x, y): return np.less(x, y)
    def op_less_equal(self, x, y): return np.less_equal(x, y)
    def op_logical_and(self, x, y): return np.logical_and(x, y)
    def op_logical_or(self, x, y): return np.logical_or(x, y)
    def op_logical_not(self, x): return np.logical_not(x)
    def op_select(self, cond, a, b): return np.where(cond, a, b)

    def _axes(self, axes):
        return None if axes is None else tuple(int(a) for a in np.atleast_1d(axes))

    def op_reduce_mean(self, x, axes=None, keep_dims=False):
        return np.mean(np.asarray(x, np.float64), axis=self._axes(axes), keepdims=bool(keep_dims))

    def op_reduce_sum(self, x, axes=None, keep_dims=False):
        acc = np.float64 if np.asarray(x).dtype.kind == "f" else np.int64
        return np.sum(np.asarray(x, acc), axis=self._axes(axes), keepdims=bool(keep_dims))

    def op_reduce_max(self, x, axes=None, keep_dims=False):
        return np.max(x, axis=self._axes(axes), keepdims=bool(keep_dims))

    def op_linear(self, x, weight, bias=None):
        y = np.matmul(np.asarray(x, np.float64), np.asarray(weight, np.float64).T)
        return y + np.asarray(bias, np.float64) if bias is not None else y

    def op_matmul(self, x, y, transpose_x=False, transpose_y=False):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if transpose_x:
            x = np.swapaxes(x, -1, -2)
        if transpose_y:
            y = np.swapaxes(y, -1, -2)
        return np.matmul(x, y)

    def op_softmax(self, x, axis=-1):
        x = np.asarray(x, np.float64)
        e = np.exp(x - x.max(axis=int(axis), keepdims=True))
        return e / e.sum(axis=int(axis), keepdims=True)

    def op_layer_norm(self, x, axes, gamma=None, beta=None, epsilon=1e-5):
        x = np.asarray(x, np.float64)
        ax = self._axes(axes)
        mu = x.mean(axis=ax, keepdims=True)
        var = ((x - mu) ** 2).mean(axis=ax, keepdims=True)
        y = (x - mu) / np.sqrt(var + float(epsilon))
        if gamma is not None:
            y = y * np.asarray(gamma, np.float64)
        if beta is not None:
            y = y + np.asarray(beta, np.float64)
        return y

    def op_scaled_dot_product_attention(self, query, key, value, attn_mask=None):
        q, k, v = (np.asarray(t, np.float64) for t in (query, key, value))
        scores = np.matmul(q, np.swapaxes(k, -1, -2)) / np.sqrt(q.shape[-1])
        if attn_mask is not None:
            m = np.asarray(attn_mask)
            scores = np.where(m, scores, -np.inf) if m.dtype == np.bool_ else scores + m.astype(np.float64)
        return np.matmul(self.op_softmax(scores, -1), v)

    def op_transpose(self, x, perm): return np.transpose(x, [int(p) for p in perm])
    def op_reshape(self, x, shape): return np.reshape(x, [int(d) for d in np.atleast_1d(shape)])
    def op_expand_dims(self, x, axes): return np.expand_dims(x, self._axes(axes))
    def op_squeeze(self, x, axes=None): return np.squeeze(x, axis=self._axes(axes))
    def op_tile(self, x, reps): return np.tile(x, [int(r) for r in np.atleast_1d(reps)])
    def op_shape(self, x): return np.array(np.shape(x), dtype=np.int32)
    def op_identity(self, x): return x
    def op_range_1d(self, end, start, step): return np.arange(int(start), int(end), int(step), dtype=np.int32)

    def op_concat(self, values, axis, interleave=False):
        if interleave:
            raise EdgemmError("MilInterpreter: concat(interleave=True) is not implemented")
        vals = [np.asarray(v) for v in values]
        if all(v.ndim == 0 for v in vals):  # a shape built from scalars
            vals = [v.reshape(1) for v in vals]
        return np.concatenate(vals, axis=int(axis))

    def op_split(self, x, axis, num_splits=None, split_sizes=None):
        if split_sizes is not None:
            idx = np.cumsum(np.atleast_1d(split_sizes))[:-1]
        else:
            idx = int(num_splits)
        return tuple(np.split(x, idx, axis=int(axis)))

    def op_gather(self, x, indices, axis=0, batch_dims=0, validate_indices=False):
        if int(batch_dims):
            raise EdgemmError("MilInterpreter: gather with batch_dims is not implemented")
        x = np.asarray(x)
        idx = np.asarray(indices).astype(np.int64)
        idx = np.where(idx < 0, idx + x.shape[int(axis)], idx)
        return np.take(x, idx, axis=int(axis))

    def op_gather_along_axis(self, x, indices, axis=0, validate_indices=False):
        return np.take_along_axis(np.asarray(x), np.asarray(indices).astype(np.int64), axis=int(axis))

    def op_scatter_along_axis(self, data, indices, updates, axis=0, mode="update", validate_indices=False):
        if mode != "update":
            raise EdgemmError(f"MilInterpreter: scatter mode {mode} is not implemented")
        out = np.array(data, copy=True)
        np.put_along_axis(out, np.asarray(indices).astype(np.int64), np.asarray(updates), axis=int(axis))
        return out

    def _slices(self, shape, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
        n = len(shape)
        begin, end = np.atleast_1d(begin).astype(np.int64), np.atleast_1d(end).astype(np.int64)
        stride = np.ones(n, np.int64) if stride is None else np.atleast_1d(stride).astype(np.int64)
        bm = np.zeros(n, bool) if begin_mask is None else np.atleast_1d(begin_mask)
        em = np.zeros(n, bool) if end_mask is None else np.atleast_1d(end_mask)
        sm = np.zeros(n, bool) if squeeze_mask is None else np.atleast_1d(squeeze_mask)
        sl, squeeze = [], []
        for i in range(n):
            b, e, st = int(begin[i]), int(end[i]), int(stride[i])
            if sm[i]:
                b = b + shape[i] if b < 0 else b
                sl.append(slice(b, b + 1))
                squeeze.append(i)
                continue
            if bm[i]:
                b = 0 if st > 0 else shape[i] - 1
            elif b < 0:
                b += shape[i]
            if em[i]:
                e = shape[i] if st > 0 else -shape[i] - 1
            elif e < 0:
                e += shape[i]
            sl.append(slice(b, e, st))
        return tuple(sl), tuple(squeeze)

    def op_slice_by_index(self, x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
        x = np.asarray(x)
        sl, sq = self._slices(x.shape, begin, end, stride, begin_mask, end_mask, squeeze_mask)
        y = x[sl]
        return np.squeeze(y, axis=sq) if sq else y

    def op_slice_by_size(self, x, begin, size):
        x = np.asarray(x)
        sl = tuple(slice(int(b), x.shape[i] if int(s) == -1 else int(b) + int(s)) for i, (b, s) in enumerate(zip(begin, size)))
        return x[sl]

    def op_slice_update(self, x, update, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
        out = np.array(x, copy=True)
        sl, sq = self._slices(out.shape, begin, end, stride, begin_mask, end_mask, squeeze_mask)
        upd = np.asarray(update)
        if sq:
            upd = np.expand_dims(upd, sq)
        out[sl] = upd.reshape(out[sl].shape)
        return out

    def op_read_state(self, input):
        return np.array(self.states[input[1]], copy=True)

    def op_write_state(self, input, data):
        name = input[1]
        self.states[name] = np.asarray(data).astype(self.states[name].dtype).reshape(self.states[name].shape)
        return None

    def op_constexpr_blockwise_shift_scale(self, data, scale, offset=None):
        """iOS18: (data - offset) * scale, scale/offset broadcast over blocks of data."""
        data = np.asarray(data).astype(np.float32)
        scale = np.asarray(scale, np.float32)
        reps = [d // s for d, s in zip(data.shape, scale.shape)]
        sc = _expand_blocks(scale, reps)
        if offset is not None:
            data = data - _expand_blocks(np.asarray(offset, np.float32), reps)
        return data * sc


def _expand_blocks(x, reps):
    for axis, r in enumerate(reps):
        if r > 1:
            x = np.repeat(x, r, axis=axis)
    return x


def simulate_decoder(package, embeds_chunks, past: int = 0, interp: MilInterpreter | None = None):
    """Run text_decoder.mlpackage through MilInterpreter on successive chunks ([1, T, D] arrays),
    continuing its state; returns the logits [1, V] after each chunk."""
    it = interp or MilInterpreter(package)
    outs = []
    for e in embeds_chunks:
        t = e.shape[1]
        outs.append(it(inputs_embeds=e, causal_mask=causal_mask(past, t))["logits"])
        past += t
    return outs


# ------------------------------------------------------------------------------------------ write


def write(bw, loaded, precision: str = "fp16", max_context: int | None = None, **unknown) -> list:
    """Add the three Core ML packages of `loaded` to the bundle writer `bw`; returns the Artifacts.

    precision: fp16 | int8 | int4 (default fp16). max_context: state length = max prompt + answer
    (default: bw.extra["max_context"], else the model's context)."""
    from edgemm.progress import progress

    from .bundle import Artifact, visual_token_count

    if unknown:
        raise EdgemmError(f"unknown coreml export option(s): {', '.join(sorted(unknown))}; options: precision, max_context")
    precision = precision or "fp16"
    if precision not in PRECISIONS:
        raise EdgemmError(f"unknown coreml precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    cfg = loaded.config
    max_ctx = int(max_context or bw.extra.get("max_context") or cfg.text.max_position_embeddings)
    if any(a.file in PACKAGES.values() for a in bw.artifacts):
        raise EdgemmError("this bundle already holds Core ML packages (one precision per bundle)")
    mods = prepare(loaded.model, max_ctx)
    packed = mods.pop("packed")
    with progress(4 if precision != "fp16" else 3, f"coreml {precision}") as bar:
        models = convert(mods, cfg, precision, progress=lambda msg: bar.advance(1, info=msg))
    if packed:
        bw.note(f"coreml: the model's {len(packed)} edgemm-quantized layer(s) were dequantized"
                + (f" and re-quantized by coremltools ({precision})" if precision != "fp16" else " (stored float16)"))
    d, k, n = cfg.text.hidden_size, visual_token_count(cfg), max_ctx
    weights = {"fp16": {"vision_encoder": "fp16", "text_decoder": "fp16"},
               "int8": {"vision_encoder": "int8", "text_decoder": "int8"},
               "int4": {"vision_encoder": "int8", "text_decoder": "int4"}}[precision]
    io = {
        "vision_encoder": {"inputs": {"images": ["float32", [1, cfg.vision.num_channels, cfg.vision.image_size, cfg.vision.image_size]]},
                           "outputs": {"image_embeds": ["float16", [1, k, d]]}},
        "token_embedding": {"inputs": {"input_ids": ["int32", [1, f"1..{n}"]]}, "outputs": {"embeddings": ["float16", [1, "T", d]]}},
        "text_decoder": {"inputs": {"inputs_embeds": ["float16", [1, f"T in 1..{n}", d]],
                                    "causal_mask": ["float16", [1, 1, "T", f"E in 1..{n}"]]},
                         "states": {"key_cache": ["float16", [cfg.text.num_layers, 1, cfg.text.num_kv_heads, n, cfg.text.head_dim]],
                                    "value_cache": ["float16", [cfg.text.num_layers, 1, cfg.text.num_kv_heads, n, cfg.text.head_dim]]},
                         "outputs": {"logits": ["float16", [1, cfg.text.vocab_size]]},
                         "mask": "additive float16: 0 attend, -inf masked; E = positions filled after the call"},
    }
    arts = []
    for name, rel in PACKAGES.items():
        models[name].save(str(bw.path(rel)))
        info = inspect_package(bw.path(rel))
        lw = info["linear_weights"]
        left = lw.get("const:float16", 0)
        if precision != "fp16" and name != "token_embedding" and left:
            bw.note(f"coreml {precision}: {left} of {sum(lw.values())} linear weight(s) of {name} stay float16 "
                    f"(coremltools quantizes a layer only when its input width is a multiple of the block, {INT4_BLOCK})")
        extra = {**io[name], "deployment_target": "iOS18", "compute_precision": "float16",
                 "weights": weights.get(name, "fp16"), "linear_weights": lw, "ops": info["functions"]["main"]["num_ops"],
                 "op_counts": info["functions"]["main"]["ops"], "specification_version": info["specification_version"],
                 "verified_on_linux": "spec, states, ops, weights; numerics by edgemm's MIL interpreter (not Core ML)"}
        if name == "text_decoder":
            extra["max_context"] = n
        arts.append(bw.add(Artifact(file=rel, role=ROLES[name], format="coreml", precision=weights.get(name, "fp16"),
                                    lane="cpu", processor="ane" if name == "vision_encoder" else "gpu", runtime="coreml",
                                    extra=extra)))
    bw.note("coreml: converted and checked on Linux (spec, states, ops, weights, and numerics through edgemm's own MIL "
            "interpreter); Core ML prediction itself needs macOS/iOS and was not run")
    return arts
