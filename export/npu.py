"""android-npu: static, NPU-ready ONNX graphs for chunked prefill after mllm-NPU.

Everything here has fixed shapes (chunk length C, maximum context M), int32 ids and positions, and
no dynamic dimension, so a QNN HTP context (or any NPU compiler) can be built ahead of time.

Graph set (all under `npu/`; `lane` says where each runs; see docs/export-onnx.md for the contract):

NPU lane (W8A8 in QDQ form: QuantizeLinear/DequantizeLinear with the static per-tensor activation
scale, uint8 codes with zero point 128 == edgemm's int8 codes + 128; int8 weights per output channel):
- `layer{i}_qkv.onnx`:  x [1,C,D] -> RMSNorm -> q [1,C,H*hd], k, v [1,C,Hkv*hd]
- `layer{i}_o.onnx`:    x, attn [1,C,H*hd], o_shadow [1,C,D] -> x_mid = x + o_proj(attn) + o_shadow
- `layer{i}_mlp.onnx`:  x_mid, gate_shadow, up_shadow [1,C,I] -> RMSNorm -> SwiGLU (shadows added to the
                        gate/up outputs) -> x_out = x_mid + down(act), act [1,C,I]
- `vision_encoder.onnx` [1,3,S,S] -> [1,K,D], QDQ by onnxruntime's QNN static quantization (uint16
  activations, uint8 weights), calibrated on CALIBRATION_SEED images.
CPU lane (float):
- `attention.onnx` (one graph for every layer): RoPE from int32 positions, attention over the static
  cache [1,Hkv,M,hd] (the first `past_len` rows valid) plus the chunk (causal), -> attn, new keys/values
- `layer{i}_shadow_{qkv,o,mlp,down}.onnx`: the shadow-outlier path: for the calibrated outlier
  channels, every element whose int8 code would clip contributes its remainder x - code*s times the
  weight column in float (docs/formats.md, W8A8); outside those channels the `shadow_slots` largest
  clipped remainders of each token (TopK, static) are corrected the same way. Each also returns
  `clipped_unhandled`, the clipped elements beyond those slots (0 in every run measured; the
  runtime reports it as stats["shadow_unhandled"]).
- `embed_chunk.onnx` int32 [1,C] -> [1,C,D]; `lm_head.onnx` [1,1,D] -> [1,1,V] (final norm + head,
  run once on the last prompt token).
- decode: `onnx/embed_tokens.onnx` + `onnx/decoder_model_merged{_q4,_int8,}.onnx` (export/onnx.py)
  continuing from the static cache.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgemm.errors import EdgemmError

from .bundle import Artifact

OPSET = 17
MASK_VALUE = -65504.0  # finite (fp16-safe) instead of -inf, as QNN HTP needs
DEFAULT_CHUNK = 32
CALIB_SAMPLES = 32
CLIP_PERCENTILE = 99.9
OUTLIER_THRESHOLD = 4.0
SHADOW_SLOTS = 4  # clipped elements per token and linear corrected outside the outlier channels


# ------------------------------------------------------------------------------------ W8A8 parameters


@dataclass
class W8A8Params:
    """One linear's W8A8 tensors as docs/formats.md defines them."""

    qweight: np.ndarray  # int8 [N, K]
    weight_scale: np.ndarray  # float32 [N]
    input_scale: float
    outlier_channels: np.ndarray  # int32 [C]
    source: str = "calibrated at export"

    @property
    def w_float(self) -> np.ndarray:
        return self.qweight.astype(np.float32) * self.weight_scale[:, None]


LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _weight_of(mod):
    w = getattr(mod, "weight", None)
    if w is not None and getattr(w, "is_floating_point", lambda: False)():
        return w.detach().float()
    for attr in ("dequantized_weight", "dequantize"):
        f = getattr(mod, attr, None)
        if callable(f):
            return f().float()
    raise EdgemmError(f"cannot read the weights of {type(mod).__name__}")


def quantize_weight(w) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output channel, codes in [-127, 127] (docs/formats.md)."""
    w = np.asarray(w, dtype=np.float32)
    scale = np.abs(w).max(1) / 127.0
    scale = np.where(scale > 0, scale, 1e-8).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def activation_scale(values: np.ndarray, ch_min: np.ndarray, ch_max: np.ndarray,
                     percentile: float = CLIP_PERCENTILE, threshold: float = OUTLIER_THRESHOLD):
    """mllm-NPU's rule: the clipped scale (top 0.1% of |x| removed) where max-abs >= threshold x
    clipped, else max-abs; outlier channels = those where calibration values would clip."""
    a = np.abs(values.astype(np.float32).ravel())
    amax = float(max(np.abs(ch_min).max(), np.abs(ch_max).max(), 1e-8))
    clipped = float(min(max(np.percentile(a, percentile, method="higher"), 1e-8), amax))
    use = clipped if amax >= threshold * clipped else amax
    s = float(np.float32(use / 127.0))
    hot = (np.rint(ch_max / s) > 127) | (np.rint(ch_min / s) < -128)
    return s, np.nonzero(hot)[0].astype(np.int32)


def calibration_inputs(loaded, n: int = CALIB_SAMPLES):
    """(ids, mask, pixels) batches of calibration prompts (CALIBRATION_SEED, never evaluation data)."""
    from edgemm.data import CALIBRATION_SEED, load_dataset

    ds = load_dataset(f"shapes:{n}:{CALIBRATION_SEED}")
    proc = loaded.processor
    ims = [ds.image(r) for r in ds.records]
    ids, mask = proc.batch([r.question for r in ds.records], with_image=True)
    return ids, mask, proc.images(ims)


def w8a8_params(loaded, n_calib: int = CALIB_SAMPLES) -> tuple[dict[str, W8A8Params], str]:
    """{"text.layers.{i}.{linear}": W8A8Params}: the checkpoint's own W8A8 tensors (edgemm.compress
    w8a8) when the model carries them, otherwise a calibration with the same rule."""
    import torch

    model = loaded.model
    names = [f"text.layers.{i}.{n}" for i in range(model.config.text.num_layers) for n in LINEARS]
    mods = dict(model.named_modules())
    out: dict[str, W8A8Params] = {}
    carried = [n for n in names if hasattr(mods[n], "input_scale") and hasattr(mods[n], "weight_scale")]
    for n in carried:
        m = mods[n]
        out[n] = W8A8Params(m.qweight.numpy().astype(np.int8), m.weight_scale.float().numpy(), float(m.input_scale),
                            m.outlier_channels.numpy().astype(np.int32), "checkpoint (edgemm w8a8)")
    todo = [n for n in names if n not in out]
    if todo:
        ids, mask, px = calibration_inputs(loaded, n_calib)
        stats: dict[str, dict] = {}
        rng = np.random.default_rng(0)

        def hook_for(name):
            def hook(_m, args):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float().numpy()
                st = stats.setdefault(name, {"min": np.full(x.shape[1], np.inf, np.float32),
                                             "max": np.full(x.shape[1], -np.inf, np.float32), "sample": []})
                st["min"] = np.minimum(st["min"], x.min(0))
                st["max"] = np.maximum(st["max"], x.max(0))
                flat = x.ravel()
                st["sample"].append(flat if flat.size <= 65536 else rng.choice(flat, 65536, replace=False))
            return hook

        hs = [mods[n].register_forward_pre_hook(hook_for(n)) for n in todo]
        try:
            with torch.no_grad():
                for i in range(0, len(ids), 16):
                    model(torch.from_numpy(ids[i:i + 16]), torch.from_numpy(px[i:i + 16]), torch.from_numpy(mask[i:i + 16]))
        finally:
            for h in hs:
                h.remove()
        for n in todo:
            st = stats[n]
            q, ws = quantize_weight(_weight_of(mods[n]).numpy())
            s, hot = activation_scale(np.concatenate(st["sample"]), st["min"], st["max"])
            out[n] = W8A8Params(q, ws, s, hot)
    src = ("checkpoint" if not todo else "calibrated at export" if not carried else "mixed")
    return out, src


# ------------------------------------------------------------------------------------ graph builder


class Graph:
    """A minimal ONNX graph builder (static shapes only)."""

    def __init__(self, name: str):
        self.name = name
        self.nodes, self.inits, self.inputs, self.outputs = [], [], [], []
        self.k = 0

    def _n(self, base: str) -> str:
        self.k += 1
        return f"{base}_{self.k}"

    def const(self, arr, name: str | None = None) -> str:
        from onnx import numpy_helper

        name = name or self._n("c")
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def op(self, op_type: str, *inputs: str, n_out: int = 1, **attrs):
        from onnx import helper

        outs = [self._n(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self._n("n_" + op_type), **attrs))
        return outs[0] if n_out == 1 else outs

    def input(self, name: str, dtype, shape) -> str:
        from onnx import helper

        self.inputs.append(helper.make_tensor_value_info(name, _elem(dtype), list(shape)))
        return name

    def output(self, src: str, name: str, dtype, shape) -> None:
        from onnx import helper

        self.nodes.append(helper.make_node("Identity", [src], [name], name=self._n("n_out")))
        self.outputs.append(helper.make_tensor_value_info(name, _elem(dtype), list(shape)))

    def save(self, path: Path, doc: str = "") -> None:
        import onnx
        from onnx import helper

        g = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgemm",
                              doc_string=doc)
        m.ir_version = 9
        onnx.checker.check_model(m, full_check=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(m, str(path))

    # --- building blocks
    def rms_norm(self, x: str, weight, eps: float) -> str:
        sq = self.op("Mul", x, x)
        ms = self.op("ReduceMean", sq, axes=[-1], keepdims=1)
        inv = self.op("Reciprocal", self.op("Sqrt", self.op("Add", ms, self.const(np.float32(eps)))))
        return self.op("Mul", self.op("Mul", x, inv), self.const(np.asarray(weight, np.float32)))

    def qdq_act(self, x: str, scale: float) -> str:
        s, z = self.const(np.float32(scale)), self.const(np.uint8(128))
        return self.op("DequantizeLinear", self.op("QuantizeLinear", x, s, z), s, z)

    def w8a8_linear(self, x_dq: str, p: W8A8Params) -> str:
        w = self.const(np.ascontiguousarray(p.qweight.T))  # int8 [K, N]
        ws = self.const(p.weight_scale.astype(np.float32))
        wz = self.const(np.zeros(p.qweight.shape[0], np.int8))
        return self.op("MatMul", x_dq, self.op("DequantizeLinear", w, ws, wz, axis=1))

    def shadow(self, x: str, p: W8A8Params, slots: int) -> tuple[str | None, str]:
        """The shadow-outlier correction of one W8A8 linear for input x [1, C, K] (float).

        Outlier channels (from calibration): every clipped element's remainder through a dense
        [n_hot, N] float weight slice. Other channels: the `slots` largest clipped remainders per
        token (TopK, static shape) through the int8 weight rows gathered and dequantized. Returns
        (correction [1, C, N] or None, the number of clipped elements beyond the slots)."""
        s = self.const(np.float32(p.input_scale))
        lo, hi = self.const(np.float32(-128)), self.const(np.float32(127))
        n, k = p.qweight.shape
        r = self.op("Round", self.op("Div", x, s))
        code = self.op("Clip", r, lo, hi)
        clipped = self.op("Cast", self.op("Not", self.op("Equal", r, code)), to=1)
        elsewhere = np.ones(k, np.float32)
        elsewhere[p.outlier_channels] = 0
        clipped_else = self.op("Mul", clipped, self.const(elsewhere))
        per_tok = self.op("ReduceSum", clipped_else, self.const(np.array([-1], np.int64)), keepdims=0)
        slots = min(slots, k)
        over = self.op("Relu", self.op("Sub", per_tok, self.const(np.float32(slots))))
        count = self.op("ReduceSum", over, keepdims=0)
        parts = []
        if slots > 0:
            rem = self.op("Mul", self.op("Sub", x, self.op("Mul", code, s)), clipped_else)  # 0 unless clipped
            _, idx = self.op("TopK", self.op("Abs", rem), self.const(np.array([slots], np.int64)), axis=-1, n_out=2)
            vals = self.op("GatherElements", rem, idx, axis=-1)  # [1, C, R]
            wq = self.op("Cast", self.op("Gather", self.const(np.ascontiguousarray(p.qweight.T)), idx, axis=0), to=1)  # [1, C, R, N]
            v4 = self.op("Unsqueeze", vals, self.const(np.array([2], np.int64)))  # [1, C, 1, R]
            acc = self.op("Squeeze", self.op("MatMul", v4, wq), self.const(np.array([2], np.int64)))  # [1, C, N] in code units
            parts.append(self.op("Mul", acc, self.const(p.weight_scale.astype(np.float32))))  # x weight_scale per column
        if p.outlier_channels.size:
            xh = self.op("Gather", x, self.const(p.outlier_channels.astype(np.int64)), axis=-1)
            rh = self.op("Round", self.op("Div", xh, s))
            ch = self.op("Clip", rh, lo, hi)
            remh = self.op("Where", self.op("Equal", rh, ch), self.const(np.float32(0)), self.op("Sub", xh, self.op("Mul", ch, s)))
            wcols = np.ascontiguousarray(p.w_float[:, p.outlier_channels].T)  # [n_hot, N]
            parts.append(self.op("MatMul", remh, self.const(wcols)))
        if not parts:
            return None, count
        return (parts[0] if len(parts) == 1 else self.op("Add", *parts)), count


def _elem(dtype):
    from onnx import helper

    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


# ------------------------------------------------------------------------------------ the graph set


def _rotate_half(g: Graph, x: str, hd: int) -> str:
    a = g.op("Slice", x, g.const(np.array([0], np.int64)), g.const(np.array([hd // 2], np.int64)), g.const(np.array([-1], np.int64)))
    b = g.op("Slice", x, g.const(np.array([hd // 2], np.int64)), g.const(np.array([hd], np.int64)), g.const(np.array([-1], np.int64)))
    return g.op("Concat", g.op("Neg", b), a, axis=-1)


def build_attention(path: Path, tc, C: int, M: int) -> None:
    """CPU-lane attention shared by all layers (float)."""
    H, KV, hd = tc.num_heads, tc.num_kv_heads, tc.head_dim
    rep = H // KV
    g = Graph("attention")
    q = g.input("q", np.float32, [1, C, H * hd])
    k = g.input("k", np.float32, [1, C, KV * hd])
    v = g.input("v", np.float32, [1, C, KV * hd])
    pk = g.input("past_key", np.float32, [1, KV, M, hd])
    pv = g.input("past_value", np.float32, [1, KV, M, hd])
    pos = g.input("position_ids", np.int32, [1, C])
    plen = g.input("past_len", np.int32, [1])
    inv_freq = (1.0 / (tc.rope_theta ** (np.arange(0, hd, 2, dtype=np.float32) / hd))).astype(np.float32)
    freqs = g.op("Mul", g.op("Unsqueeze", g.op("Cast", pos, to=1), g.const(np.array([2], np.int64))), g.const(inv_freq))
    emb = g.op("Concat", freqs, freqs, axis=-1)  # [1, C, hd]
    cos = g.op("Unsqueeze", g.op("Cos", emb), g.const(np.array([1], np.int64)))  # [1, 1, C, hd]
    sin = g.op("Unsqueeze", g.op("Sin", emb), g.const(np.array([1], np.int64)))

    def heads(x, n):
        return g.op("Transpose", g.op("Reshape", x, g.const(np.array([1, C, n, hd], np.int64))), perm=[0, 2, 1, 3])

    def rope(x):
        return g.op("Add", g.op("Mul", x, cos), g.op("Mul", _rotate_half(g, x, hd), sin))

    qh, kh, vh = rope(heads(q, H)), rope(heads(k, KV)), heads(v, KV)
    keys = g.op("Concat", pk, kh, axis=2)  # [1, KV, M+C, hd]
    vals = g.op("Concat", pv, vh, axis=2)
    if rep > 1:
        def expand(x):
            x5 = g.op("Unsqueeze", x, g.const(np.array([2], np.int64)))
            x5 = g.op("Expand", x5, g.const(np.array([1, KV, rep, M + C, hd], np.int64)))
            return g.op("Reshape", x5, g.const(np.array([1, H, M + C, hd], np.int64)))
        keys, vals = expand(keys), expand(vals)
    scores = g.op("Mul", g.op("MatMul", qh, g.op("Transpose", keys, perm=[0, 1, 3, 2])), g.const(np.float32(hd ** -0.5)))
    # mask: cache rows j < past_len, chunk rows causal
    valid_past = g.op("Less", g.const(np.arange(M, dtype=np.int32)), plen)  # [M]
    vp = g.op("Expand", g.op("Unsqueeze", valid_past, g.const(np.array([0], np.int64))), g.const(np.array([C, M], np.int64)))
    tri = g.const(np.tril(np.ones((C, C), bool)))
    allowed = g.op("Concat", vp, tri, axis=1)  # [C, M+C]
    bias = g.op("Where", allowed, g.const(np.float32(0)), g.const(np.float32(MASK_VALUE)))
    probs = g.op("Softmax", g.op("Add", scores, bias), axis=-1)
    out = g.op("MatMul", probs, vals)  # [1, H, C, hd]
    out = g.op("Reshape", g.op("Transpose", out, perm=[0, 2, 1, 3]), g.const(np.array([1, C, H * hd], np.int64)))
    g.output(out, "attn", np.float32, [1, C, H * hd])
    g.output(kh, "key", np.float32, [1, KV, C, hd])
    g.output(vh, "value", np.float32, [1, KV, C, hd])
    g.save(path, "edgemm android-npu: CPU-lane attention (RoPE, static cache of max_context rows + one chunk)")


def build_layer(out_dir: Path, i: int, layer, params: dict, tc, C: int, slots: int = 4) -> dict[str, Path]:
    """The three NPU graphs and four shadow graphs of decoder layer i."""
    D, I, H, KV, hd = tc.hidden_size, tc.intermediate_size, tc.num_heads, tc.num_kv_heads, tc.head_dim
    eps = tc.rms_norm_eps
    P = lambda n: params[f"text.layers.{i}.{n}"]  # noqa: E731
    w_in = layer.input_layernorm.weight.detach().float().numpy()
    w_post = layer.post_attention_layernorm.weight.detach().float().numpy()
    paths = {}
    dims = {"q": H * hd, "k": KV * hd, "v": KV * hd}

    # NPU: norm + q/k/v
    g = Graph(f"layer{i}_qkv")
    x = g.input("x", np.float32, [1, C, D])
    h = g.rms_norm(x, w_in, eps)
    for nm in "qkv":
        p = P(f"self_attn.{nm}_proj")
        g.output(g.w8a8_linear(g.qdq_act(h, p.input_scale), p), nm, np.float32, [1, C, dims[nm]])
    paths["qkv"] = out_dir / f"layer{i}_qkv.onnx"
    g.save(paths["qkv"], f"edgemm android-npu: layer {i} RMSNorm + W8A8 q/k/v (QDQ)")

    # CPU: shadow of q/k/v (adds the corrections to q, k, v)
    g = Graph(f"layer{i}_shadow_qkv")
    x = g.input("x", np.float32, [1, C, D])
    h = g.rms_norm(x, w_in, eps)
    counts = []
    for nm in "qkv":
        y = g.input(nm, np.float32, [1, C, dims[nm]])
        corr, cnt = g.shadow(h, P(f"self_attn.{nm}_proj"), slots)
        counts.append(cnt)
        g.output(y if corr is None else g.op("Add", y, corr), nm + "_out", np.float32, [1, C, dims[nm]])
    g.output(g.op("Sum", *counts), "clipped_unhandled", np.float32, [])
    paths["shadow_qkv"] = out_dir / f"layer{i}_shadow_qkv.onnx"
    g.save(paths["shadow_qkv"], f"edgemm android-npu: layer {i} shadow outliers of q/k/v (float)")

    # CPU: shadow of o_proj (a correction fed into the NPU o graph)
    g = Graph(f"layer{i}_shadow_o")
    a = g.input("attn", np.float32, [1, C, H * hd])
    corr, cnt = g.shadow(a, P("self_attn.o_proj"), slots)
    g.output(corr if corr is not None else g.const(np.zeros((1, C, D), np.float32)), "o_shadow", np.float32, [1, C, D])
    g.output(cnt, "clipped_unhandled", np.float32, [])
    paths["shadow_o"] = out_dir / f"layer{i}_shadow_o.onnx"
    g.save(paths["shadow_o"], f"edgemm android-npu: layer {i} shadow outliers of o_proj (float)")

    # NPU: o_proj + residual
    g = Graph(f"layer{i}_o")
    x = g.input("x", np.float32, [1, C, D])
    a = g.input("attn", np.float32, [1, C, H * hd])
    osh = g.input("o_shadow", np.float32, [1, C, D])
    p = P("self_attn.o_proj")
    g.output(g.op("Add", g.op("Add", x, g.w8a8_linear(g.qdq_act(a, p.input_scale), p)), osh), "x_mid", np.float32, [1, C, D])
    paths["o"] = out_dir / f"layer{i}_o.onnx"
    g.save(paths["o"], f"edgemm android-npu: layer {i} W8A8 o_proj + residual (QDQ)")

    # CPU: shadow of gate/up (corrections fed into the NPU mlp graph)
    g = Graph(f"layer{i}_shadow_mlp")
    xm = g.input("x_mid", np.float32, [1, C, D])
    h2 = g.rms_norm(xm, w_post, eps)
    counts = []
    for nm in ("gate", "up"):
        corr, cnt = g.shadow(h2, P(f"mlp.{nm}_proj"), slots)
        counts.append(cnt)
        g.output(corr if corr is not None else g.const(np.zeros((1, C, I), np.float32)), f"{nm}_shadow", np.float32, [1, C, I])
    g.output(g.op("Sum", *counts), "clipped_unhandled", np.float32, [])
    paths["shadow_mlp"] = out_dir / f"layer{i}_shadow_mlp.onnx"
    g.save(paths["shadow_mlp"], f"edgemm android-npu: layer {i} shadow outliers of gate/up (float)")

    # NPU: norm + SwiGLU + down + residual
    g = Graph(f"layer{i}_mlp")
    xm = g.input("x_mid", np.float32, [1, C, D])
    gs = g.input("gate_shadow", np.float32, [1, C, I])
    us = g.input("up_shadow", np.float32, [1, C, I])
    h2 = g.rms_norm(xm, w_post, eps)
    pg, pu, pd = P("mlp.gate_proj"), P("mlp.up_proj"), P("mlp.down_proj")
    gate = g.op("Add", g.w8a8_linear(g.qdq_act(h2, pg.input_scale), pg), gs)
    up = g.op("Add", g.w8a8_linear(g.qdq_act(h2, pu.input_scale), pu), us)
    act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)
    y = g.op("Add", xm, g.w8a8_linear(g.qdq_act(act, pd.input_scale), pd))
    g.output(y, "x_out", np.float32, [1, C, D])
    g.output(act, "act", np.float32, [1, C, I])
    paths["mlp"] = out_dir / f"layer{i}_mlp.onnx"
    g.save(paths["mlp"], f"edgemm android-npu: layer {i} RMSNorm + W8A8 SwiGLU + residual (QDQ)")

    # CPU: shadow of down_proj (added to the layer output)
    g = Graph(f"layer{i}_shadow_down")
    act = g.input("act", np.float32, [1, C, I])
    y = g.input("x_out", np.float32, [1, C, D])
    corr, cnt = g.shadow(act, P("mlp.down_proj"), slots)
    g.output(y if corr is None else g.op("Add", y, corr), "x_next", np.float32, [1, C, D])
    g.output(cnt, "clipped_unhandled", np.float32, [])
    paths["shadow_down"] = out_dir / f"layer{i}_shadow_down.onnx"
    g.save(paths["shadow_down"], f"edgemm android-npu: layer {i} shadow outliers of down_proj (float)")
    return paths


def build_embed_chunk(path: Path, table: np.ndarray, C: int) -> None:
    g = Graph("embed_chunk")
    ids = g.input("input_ids", np.int32, [1, C])
    g.output(g.op("Gather", g.const(table.astype(np.float32)), ids, axis=0), "inputs_embeds", np.float32, [1, C, table.shape[1]])
    g.save(path, "edgemm android-npu: token embedding of one chunk (int32 ids)")


def build_lm_head(path: Path, text) -> None:
    tc = text.cfg
    g = Graph("lm_head")
    x = g.input("hidden", np.float32, [1, 1, tc.hidden_size])
    h = g.rms_norm(x, text.norm.weight.detach().float().numpy(), tc.rms_norm_eps)
    w = _weight_of(text.lm_head).numpy()
    g.output(g.op("MatMul", h, g.const(np.ascontiguousarray(w.T))), "logits", np.float32, [1, 1, tc.vocab_size])
    g.save(path, "edgemm android-npu: final RMSNorm + lm_head on the last prompt token")


def build_vision(path: Path, loaded, qdq: bool = True, n_calib: int = 32) -> str:
    """Static-shape vision encoder; QDQ by onnxruntime's QNN static quantization when `qdq`.
    Returns its precision."""
    import tempfile

    from .onnx import _float_copy as onnx_float_model
    from .onnx import export_vision

    with tempfile.TemporaryDirectory(prefix="edgemm-npu-") as td:
        f32 = Path(td) / "vision_f32.onnx"
        export_vision(onnx_float_model(loaded.model), f32, static=True)
        if not qdq:
            import shutil

            shutil.copy(f32, path)
            return "fp32"
        from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize
        from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

        from .onnx import _quiet

        _, _, px = calibration_inputs(loaded, n_calib)

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter([{"pixel_values": px[i:i + 1]} for i in range(len(px))])

            def get_next(self):
                return next(self.it, None)

        with _quiet():
            qcfg = get_qnn_qdq_config(str(f32), Reader(), activation_type=QuantType.QUInt16, weight_type=QuantType.QUInt8)
            quantize(str(f32), str(path), qcfg)
    import onnx

    onnx.checker.check_model(str(path))
    return "a16w8"


# ------------------------------------------------------------------------------------ torch reference


def reference_logits(loaded, params: dict[str, W8A8Params], inputs_embeds):
    """Full-sequence (unchunked) torch decoder forward over `inputs_embeds` [1, T, D] with every
    decoder linear computing docs/formats.md's W8A8 + shadow exactly (all clipped elements, any
    channel): the plain reference the chunked graphs are checked against. -> last logits [1, V]."""
    import torch
    from torch import nn

    class Ref(nn.Module):
        def __init__(self, p: W8A8Params):
            super().__init__()
            self.w = torch.from_numpy(p.w_float)
            self.s = p.input_scale

        def forward(self, x):
            r = torch.round(x / self.s)
            code = r.clamp(-128, 127)
            xq = code * self.s + torch.where(r != code, x - code * self.s, torch.zeros_like(x))
            return xq @ self.w.T

    m = copy.deepcopy(loaded.model).eval()
    mods = dict(m.named_modules())
    for name, p in params.items():
        parent, child = name.rsplit(".", 1)
        setattr(mods[parent], child, Ref(p))
    x = torch.from_numpy(np.asarray(inputs_embeds, np.float32))
    t = x.shape[1]
    with torch.no_grad():
        return m.text(x, torch.arange(t)[None], torch.ones(1, t, dtype=torch.long))[:, -1].numpy()


# ------------------------------------------------------------------------------------ bundle writer


def write_android_npu(bw, loaded, chunk_size: int | None = None, max_context: int | None = None,
                      decode_precision: str = "int4", vision_quant: bool = True, shadow_slots: int = SHADOW_SLOTS,
                      **_ignored) -> list:
    """Add the android-npu graph set to the bundle `bw` (see the module docstring)."""
    import shutil
    import tempfile

    from . import onnx as onnx_export

    cfg = loaded.config
    tc = cfg.text
    C = int(chunk_size or bw.extra.get("chunk_size") or DEFAULT_CHUNK)
    M = int(max_context or bw.extra.get("max_context") or tc.max_position_embeddings)
    if C < 1 or M < C:
        raise EdgemmError(f"android-npu needs 1 <= chunk_size <= max_context, got chunk {C}, context {M}")
    if M > tc.max_position_embeddings:
        raise EdgemmError(f"max_context {M} exceeds the model's max_position_embeddings {tc.max_position_embeddings}")
    if decode_precision not in onnx_export.PRECISIONS:
        raise EdgemmError(f"unknown decode precision {decode_precision!r}; choose one of {', '.join(onnx_export.PRECISIONS)}")
    bw.extra["chunk_size"], bw.extra["max_context"] = C, M
    params, src = w8a8_params(loaded)
    model = loaded.model.eval()
    arts: list[Artifact] = []
    ort = "onnxruntime"

    def add(rel, role, precision, lane, **extra):
        a = Artifact(rel, role, "onnx", precision, lane, "npu" if lane == "npu" else "cpu", ort, extra=extra)
        arts.append(bw.add(a))

    vis_rel = "npu/vision_encoder.onnx"
    vprec = build_vision(bw.path(vis_rel), loaded, qdq=vision_quant)
    add(vis_rel, "vision_encoder", vprec, "npu" if vision_quant else "cpu", static_shape=[1, cfg.vision.num_channels,
        cfg.vision.image_size, cfg.vision.image_size])
    build_embed_chunk(bw.path("npu/embed_chunk.onnx"), model.text.embed_tokens.weight.detach().float().numpy(), C)
    add("npu/embed_chunk.onnx", "embed_chunk", "fp32", "cpu")
    build_attention(bw.path("npu/attention.onnx"), tc, C, M)
    add("npu/attention.onnx", "prefill_attention", "fp32", "cpu")
    hot = {}
    for i, layer in enumerate(model.text.layers):
        paths = build_layer(bw.path("npu/x").parent, i, layer, params, tc, C, shadow_slots)
        for stage in ("qkv", "o", "mlp"):
            add(f"npu/layer{i}_{stage}.onnx", "prefill_layer", "w8a8", "npu", layer=i, stage=stage)
        for stage in ("qkv", "o", "mlp", "down"):
            add(f"npu/layer{i}_shadow_{stage}.onnx", "shadow", "fp32", "cpu", layer=i, stage=stage)
        assert len(paths) == 7
    for n, p in params.items():
        if p.outlier_channels.size:
            hot[n] = int(p.outlier_channels.size)
    build_lm_head(bw.path("npu/lm_head.onnx"), model.text)
    add("npu/lm_head.onnx", "lm_head", "fp32", "cpu")

    # CPU decode: the dynamic decoder (explicit KV cache) continuing from the static cache
    with tempfile.TemporaryDirectory(prefix="edgemm-npu-dec-") as td:
        fp = onnx_export.export_fp32(onnx_export._float_copy(model), Path(td))
        emb_rel = "onnx/embed_tokens.onnx"
        if not bw.path(emb_rel).exists():
            shutil.copy(fp["embed_tokens"], bw.path(emb_rel))
            add(emb_rel, "embed_tokens", "fp32", "cpu")
        dec_rel = onnx_export.file_name("decoder", decode_precision)
        pre = onnx_export.edgemm_packed_weights(model) if cfg.extras.get("quantization") else {}
        if decode_precision == "fp32":
            shutil.copy(fp["decoder"], bw.path(dec_rel))
        elif decode_precision == "int8":
            onnx_export.quantize_int8(fp["decoder"], bw.path(dec_rel), prequantized=pre)
        else:
            onnx_export.quantize_int4(fp["decoder"], bw.path(dec_rel), prequantized=pre)
        add(dec_rel, "decoder", decode_precision, "cpu", kv_cache="explicit", num_layers=tc.num_layers)

    bw.extra["npu"] = {
        "graph_set": "edgemm-chunked-prefill-v1",
        "w8a8_source": src,
        "activation_qdq": "uint8, zero point 128 (== int8 code + 128), one static scale per tensor",
        "weight_qdq": "int8 symmetric per output channel (axis 1 of the [K, N] MatMul weight)",
        "outlier_channels": hot,
        "shadow_slots": shadow_slots,
        "prefill_order": ["embed_chunk", "for each layer i: layer{i}_qkv (npu), layer{i}_shadow_qkv, attention, "
                          "(write key/value rows into the cache), layer{i}_shadow_o, layer{i}_o (npu), "
                          "layer{i}_shadow_mlp, layer{i}_mlp (npu), layer{i}_shadow_down", "lm_head on the last prompt token"],
        "kv_cache": {"shape": [1, tc.num_kv_heads, M, tc.head_dim], "dtype": "float32", "per_layer": ["key", "value"]},
    }
    bw.note(f"android-npu: prefill in chunks of {C} tokens over a static context of {M}; W8A8 from {src}; "
            f"{len(hot)} of {len(params)} linears have shadow-outlier channels; decode on the CPU lane at {decode_precision}")
    bw.note("android-npu graphs are verified here with onnxruntime's CPU provider only; the QNN EP (HTP) run needs a "
            "Snapdragon device (docs/export-onnx.md)")
    return arts


def write(bw, loaded, **options) -> list:
    """Alias so that the dispatcher can treat android-npu like a format module."""
    return write_android_npu(bw, loaded, **options)


def chunk_plan(n_tokens: int, chunk: int) -> list[tuple[int, int]]:
    """[(start, n_real)] of the chunks covering a prompt of n_tokens."""
    return [(s, min(chunk, n_tokens - s)) for s in range(0, n_tokens, chunk)]


__all__ = ["write_android_npu", "W8A8Params", "w8a8_params", "reference_logits", "chunk_plan"]
