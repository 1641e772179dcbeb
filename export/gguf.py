"""GGUF export: the text model in llama.cpp's `llama` layout plus the ViT + projector as an mmproj
file that llama.cpp's multimodal library (mtmd, `clip` architecture, `mlp` projector) loads.

Both files are written with gguf-py's GGUFWriter. See docs/export-gguf.md for the layout, what is
mapped bit-exactly and what is quantized, and the llama.cpp pitfalls this module handles:

- RoPE: edgemm (like Hugging Face Llama) rotates the two halves of each head (rotate_half); llama.cpp's
  `llama` architecture rotates adjacent pairs, so the Q and K rows of every head are interleaved
  (row 2j <- j, row 2j+1 <- j + d/2).
- Feature layer: mtmd's llava graph runs `block_count - 1` blocks unless `clip.vision.feature_layer`
  is set; it is always written (as the non-negative hidden-state index) and only the blocks that run
  are stored.
- [CLS]: the mmproj stores the class embedding and the position table in the standard CLS-first
  layout (as llama.cpp's own converter does). llama.cpp builds with bug #25814 append [CLS] after the
  patches instead; edgemm's llamacpp adapter detects that at run time and corrects it.
- FFN naming: mtmd swaps ffn_up/ffn_down when ffn_down's input width equals the embedding width; a
  ViT whose intermediate size equals its hidden size is zero-padded (exact) so the heuristic never fires.
- Tokenizer: byte-level BPE becomes llama.cpp's `gpt2` tokenizer with the GPT-2 pre-tokenizer; token
  strings must be unique (llama.cpp aborts on duplicates) and the padded tail of the vocabulary gets
  unique UNUSED tokens.

Weights: `precision` (f16, q8_0, q4_0) is the GGUF type of the text model's matmul weights. edgemm's
packed int8/int4 layers (docs/formats.md) are written bit-exactly whenever the type holds their codes
(group size a multiple of 32: int8 symmetric -> Q8_0, int4 symmetric -> Q4_0 or Q8_0); everything
else is quantized by gguf-py (or kept F16 when a row is not a multiple of 32) and the bundle notes it.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from edgemm.errors import EdgemmError

from .bundle import Artifact

PRECISIONS = ("f16", "q8_0", "q4_0")
MMPROJ_PRECISIONS = ("f32", "f16", "q8_0", "q4_0")
QK = 32  # block size of Q8_0 and Q4_0
# Visual-token methods the llamacpp adapter can apply to mtmd's projected tokens (no [CLS] attention,
# no feature-level merging): see docs/export-gguf.md.
GGUF_TOKEN_METHODS = ("divprune", "random")

TEXT_ROLE, MMPROJ_ROLE = "text_model", "mmproj"


def write(bw, loaded, precision: str | None = None, mmproj_precision: str | None = None, **options) -> list[Artifact]:
    """Add the text-model GGUF and the mmproj GGUF of `loaded` to the bundle writer `bw`.

    precision: f16 | q8_0 | q4_0 for the text model's matmul weights; mmproj_precision: f32 | f16 | q8_0 |
    q4_0 for the ViT's and projector's. Defaults: f16 (llama.cpp's converter writes mmproj files in F16),
    or, when that part of the model has packed int8/int4 layers, the smallest type that holds all of
    them exactly."""
    if options:
        raise EdgemmError(f"gguf export: unknown option {sorted(options)[0]!r} (options: precision, mmproj_precision)")
    import gguf  # noqa: F401  (a clear error early if the package is missing)

    model = loaded.model
    cfg = loaded.config
    check_representable(cfg)
    if precision is None:
        precision = _auto_precision(model.text)
    if mmproj_precision is None:
        mmproj_precision = _auto_precision(model.vision, model.projector)
    precision = str(precision).lower()
    if precision not in PRECISIONS:
        raise EdgemmError(f"gguf precision {precision!r} is not supported; choose one of {', '.join(PRECISIONS)}")
    mmproj_precision = str(mmproj_precision).lower()
    if mmproj_precision not in MMPROJ_PRECISIONS:
        raise EdgemmError(f"gguf mmproj_precision {mmproj_precision!r} is not supported; choose one of {', '.join(MMPROJ_PRECISIONS)}")

    from edgemm.progress import progress

    text_file, mm_file = f"edgevlm-{precision}.gguf", f"mmproj-{mmproj_precision}.gguf"
    n_text = 3 + 9 * cfg.text.num_layers
    n_mm = 8 + 16 * cfg.feature_layer_index
    with progress(n_text + n_mm, f"gguf {precision}", quiet=True) as bar:
        text_log = write_text_gguf(bw.path(text_file), loaded, precision, advance=bar.advance)
        mm_log = write_mmproj_gguf(bw.path(mm_file), loaded, mmproj_precision, advance=bar.advance)
    arts = [
        bw.add(Artifact(text_file, TEXT_ROLE, "gguf", precision, runtime="llamacpp",
                        extra={"architecture": "llama", "tensor_types": text_log.type_counts(),
                               "tokenizer": "gpt2", "context_length": cfg.text.max_position_embeddings})),
        bw.add(Artifact(mm_file, MMPROJ_ROLE, "gguf", mmproj_precision, runtime="llamacpp",
                        extra={"architecture": "clip", "projector_type": "mlp", "tensor_types": mm_log.type_counts(),
                               "feature_layer": cfg.feature_layer_index, "blocks": cfg.feature_layer_index,
                               "cls_layout": "cls-first"})),
    ]
    for note in text_log.notes(text_file) + mm_log.notes(mm_file):
        bw.note(note)
    vt = cfg.extras.get("visual_tokens")
    if vt:
        bw.note(f"gguf: visual-token compression {vt.get('method')} (keep {vt.get('keep')}) is not in the GGUF files "
                f"(llama.cpp's mtmd has none); edgemm's llamacpp adapter applies it to mtmd's projected tokens. "
                f"Stock llama.cpp tools feed all {cfg.num_visual_tokens} visual tokens.")
    return arts


# ----------------------------------------------------------------------------------- what fits


def check_representable(cfg) -> None:
    """Refuse, with one line each, what llama.cpp's llava graph cannot compute."""
    if cfg.vision_feature_select != "default":
        raise EdgemmError("gguf: vision_feature_select 'full' (the [CLS] token fed to the LLM) cannot be exported: "
                          "llama.cpp's mtmd llava graph feeds exactly one token per patch")
    if cfg.projector.hidden_act not in ("gelu", "gelu_tanh"):
        raise EdgemmError(f"gguf: projector activation {cfg.projector.hidden_act!r} cannot be exported: llama.cpp's "
                          f"mlp projector always applies GELU")
    if cfg.vision.image_size % cfg.vision.patch_size:
        raise EdgemmError("gguf: the image size must be a multiple of the patch size")
    vt = cfg.extras.get("visual_tokens")
    if vt:
        method = str(vt.get("method", "?"))
        if method not in GGUF_TOKEN_METHODS:
            raise EdgemmError(f"gguf: visual-token method {method!r} cannot run with llama.cpp: mtmd exposes neither the "
                              f"ViT's [CLS] attention nor its features before the projector; methods that work on the "
                              f"projected tokens do: {', '.join(GGUF_TOKEN_METHODS)}")


def vision_ffn_op(act: str) -> dict:
    """clip.use_gelu / clip.use_silu for a ViT activation (no key = quick GELU in mtmd)."""
    if act in ("gelu", "gelu_tanh"):
        return {"clip.use_gelu": True}
    if act == "silu":
        return {"clip.use_silu": True}
    if act == "quick_gelu":
        return {}
    raise EdgemmError(f"gguf: ViT activation {act!r} cannot be exported")


# ------------------------------------------------------------------------------- weights


@dataclass
class Packed:
    """A packed edgemm layer as signed integer codes: W = codes * scale (per group of `group` inputs)."""

    fmt: str  # int8 | int4 | w8a8
    codes: np.ndarray  # int16 [N, K], codes minus zero point
    scales: np.ndarray  # float32 [N, K / group] (float16 values for int8/int4)
    group: int

    def dequantize(self) -> np.ndarray:
        return (self.codes.astype(np.float32) * np.repeat(self.scales, self.group, axis=1)).astype(np.float32)


def layer_weight(module) -> tuple[np.ndarray, Packed | None]:
    """-> (float32 weight [N, K], Packed or None) for an nn.Linear or an edgemm packed layer."""
    import torch

    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor) and w.is_floating_point():
        return w.detach().float().cpu().numpy(), None
    q = getattr(module, "qweight", None)
    if not isinstance(q, torch.Tensor):
        raise EdgemmError(f"gguf: cannot read the weight of a {type(module).__name__} layer")
    q = q.detach().cpu()
    ws = getattr(module, "weight_scale", None)
    if isinstance(ws, torch.Tensor):  # W8A8: int8 per output channel, float32 scales
        codes = q.numpy().astype(np.int16)
        scales = ws.detach().float().cpu().numpy().reshape(-1, 1)
        p = Packed("w8a8", codes, scales, codes.shape[1])
        return p.dequantize(), p
    scales = module.scales.detach().float().cpu().numpy()
    zeros = getattr(module, "zeros", None)
    if q.dtype == torch.int8:  # int8: W = (qweight - zeros) * scale
        codes = q.numpy().astype(np.int16)
        if isinstance(zeros, torch.Tensor):
            codes = codes - np.repeat(zeros.detach().cpu().numpy().astype(np.int16), codes.shape[1] // scales.shape[1], axis=1)
        fmt = "int8"
    elif q.dtype == torch.uint8:  # int4: two inputs per byte, even k in the low nibble
        b = q.numpy()
        u = np.empty((b.shape[0], b.shape[1] * 2), np.int16)
        u[:, 0::2] = b & 0x0F
        u[:, 1::2] = b >> 4
        z = 8 if not isinstance(zeros, torch.Tensor) else np.repeat(zeros.detach().cpu().numpy().astype(np.int16),
                                                                     u.shape[1] // scales.shape[1], axis=1)
        codes = u - z
        fmt = "int4"
    else:
        raise EdgemmError(f"gguf: unknown packed weight dtype {q.dtype}")
    p = Packed(fmt, codes, scales, codes.shape[1] // scales.shape[1])
    return p.dequantize(), p


def exact_block_types(p: Packed | None) -> list[str]:
    """The GGUF block types that hold a packed layer bit-exactly (none for float layers)."""
    if p is None or p.fmt == "w8a8" or p.group % QK or p.codes.shape[1] % QK:
        return []
    if not np.array_equal(p.scales, p.scales.astype(np.float16).astype(np.float32)):
        return []
    lo, hi = int(p.codes.min(initial=0)), int(p.codes.max(initial=0))
    out = []
    if -8 <= lo and hi <= 7:
        out.append("q4_0")
    if -128 <= lo and hi <= 127:
        out.append("q8_0")
    return out


def pack_exact(p: Packed, kind: str) -> np.ndarray:
    """Packed codes -> Q8_0 / Q4_0 blocks (uint8 [N, K/32 * bytes]) with d = the layer's float16 scale."""
    n, k = p.codes.shape
    nb = k // QK
    d = np.repeat(p.scales, p.group // QK, axis=1).astype(np.float16).reshape(n, nb, 1).view(np.uint8)  # [n, nb, 2]
    c = p.codes.reshape(n, nb, QK)
    if kind == "q8_0":
        qs = c.astype(np.int8).view(np.uint8)
    elif kind == "q4_0":
        u = (c + 8).astype(np.uint8)
        qs = u[..., : QK // 2] | (u[..., QK // 2:] << np.uint8(4))
    else:
        raise ValueError(kind)
    return np.concatenate([d, qs], axis=-1).reshape(n, -1)


GGML = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0"}


@dataclass
class TensorLog:
    """What happened to each tensor: its GGUF type and whether it was mapped, converted or quantized."""

    types: dict = field(default_factory=dict)
    mapped: list = field(default_factory=list)  # packed -> same numbers, bit-exact
    quantized: list = field(default_factory=list)  # float -> quantized by gguf-py
    requantized: list = field(default_factory=list)  # packed -> another quantization (lossy)
    dequantized: list = field(default_factory=list)  # packed -> float16/32 (exact up to float rounding)
    kept_f16: list = field(default_factory=list)  # asked for a block type, rows not a multiple of 32

    def type_counts(self) -> dict:
        return dict(sorted(Counter(self.types.values()).items()))

    def notes(self, file: str) -> list[str]:
        out = []

        def names(xs):
            xs = [x[0] if isinstance(x, tuple) else x for x in xs]
            return ", ".join(xs[:4]) + (f" and {len(xs) - 4} more" if len(xs) > 4 else "")

        if self.mapped:
            kinds = Counter(f"{src}->{dst}" for _, src, dst in self.mapped)
            out.append(f"{file}: {len(self.mapped)} packed edgemm layers mapped bit-exactly "
                       f"({', '.join(f'{v} {k}' for k, v in sorted(kinds.items()))})")
        if self.requantized:
            kinds = Counter(f"{src}->{dst}" for _, src, dst in self.requantized)
            out.append(f"{file}: {len(self.requantized)} packed layers RE-QUANTIZED by gguf-py from their dequantized "
                       f"weights ({', '.join(f'{v} {k}' for k, v in sorted(kinds.items()))}): {names(self.requantized)}")
        if self.dequantized:
            out.append(f"{file}: {len(self.dequantized)} packed layers stored dequantized as float "
                       f"({names(self.dequantized)})")
        if self.quantized:
            kinds = Counter(dst for _, dst in self.quantized)
            out.append(f"{file}: {len(self.quantized)} float weights quantized by gguf-py "
                       f"({', '.join(f'{v} to {k.upper()}' for k, v in sorted(kinds.items()))}, round-to-nearest, block 32)")
        if self.kept_f16:
            out.append(f"{file}: {len(self.kept_f16)} weights kept F16 (rows not a multiple of 32): {names(self.kept_f16)}")
        return out


class _Writer:
    """GGUFWriter plus the per-tensor type decisions."""

    def __init__(self, path, arch: str):
        import gguf

        self.gguf = gguf
        self.w = gguf.GGUFWriter(str(path), arch)
        self.log = TensorLog()

    def f32(self, name: str, a) -> None:
        self._add(name, np.ascontiguousarray(np.asarray(a, dtype=np.float32)), "f32")

    def matrix(self, name: str, w: np.ndarray, packed: Packed | None, want: str, src: str = "") -> None:
        """A matmul weight [N, K] in the type `want` (f32 | f16 | q8_0 | q4_0)."""
        gguf = self.gguf
        k = w.shape[1]
        if packed is not None:
            exact = exact_block_types(packed)
            if want in exact:
                self._add(name, pack_exact(packed, want), want, raw=True)
                self.log.mapped.append((src or name, packed.fmt, want.upper()))
                return
            if want in ("f32", "f16"):
                self.log.dequantized.append(src or name)
            elif k % QK == 0:
                self.log.requantized.append((src or name, packed.fmt, want.upper()))
        if want in ("q8_0", "q4_0"):
            if k % QK:
                self.log.kept_f16.append(src or name)
                want = "f16"
            else:
                qt = gguf.GGMLQuantizationType.Q8_0 if want == "q8_0" else gguf.GGMLQuantizationType.Q4_0
                data = gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), qt)
                self._add(name, data, want, raw=True)
                if packed is None:
                    self.log.quantized.append((src or name, want))
                return
        dt = np.float16 if want == "f16" else np.float32
        self._add(name, np.ascontiguousarray(w.astype(dt)), want)

    def _add(self, name: str, data: np.ndarray, kind: str, raw: bool = False) -> None:
        gguf = self.gguf
        if raw:
            qt = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[kind]
            self.w.add_tensor(name, data, raw_dtype=qt)
        else:
            self.w.add_tensor(name, data)
        self.log.types[name] = GGML[kind]

    def finish(self) -> None:
        self.w.write_header_to_file()
        self.w.write_kv_data_to_file()
        self.w.write_tensors_to_file()
        self.w.close()


def _auto_precision(*parts) -> str:
    """f16 for float layers; with packed layers, the smallest type that holds all of them exactly (the
    ViT's patch embedding is a convolution kernel in llama.cpp, F16 whatever the type, so it is left out)."""
    kinds = []
    for part in parts:
        for name, mod in part.named_modules():
            if hasattr(mod, "qweight") and name != "patch_embed":
                _, p = layer_weight(mod)
                kinds.append(set(exact_block_types(p)))
    if not kinds:
        return "f16"
    for t in ("q4_0", "q8_0"):
        if all(t in k for k in kinds):
            return t
    return "f16"


def _file_type(gguf, precision: str):
    return {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
            "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "f32": gguf.LlamaFileType.ALL_F32}[precision]


# ---------------------------------------------------------------------------------- text model


def permute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Q/K rows from rotate-half order (pairs j, j+d/2) to llama.cpp's adjacent-pair order (2j, 2j+1)."""
    n, k = w.shape
    d = n // n_heads
    return w.reshape(n_heads, 2, d // 2, k).swapaxes(1, 2).reshape(n, k)


def write_text_gguf(path, loaded, precision: str, advance=lambda n=1: None, permute_qk: bool = True) -> TensorLog:
    """The decoder as a llama-architecture GGUF with the tokenizer. `permute_qk=False` only exists so
    the tests can show that llama.cpp then computes wrong logits."""
    model, cfg = loaded.model, loaded.config
    t = cfg.text
    out = _Writer(path, "llama")
    w, gguf = out.w, out.gguf
    w.add_name(f"edgemm {loaded.source}")
    w.add_file_type(_file_type(gguf, precision))
    if precision in ("q8_0", "q4_0"):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(t.max_position_embeddings)
    w.add_embedding_length(t.hidden_size)
    w.add_block_count(t.num_layers)
    w.add_feed_forward_length(t.intermediate_size)
    w.add_head_count(t.num_heads)
    w.add_head_count_kv(t.num_kv_heads)
    w.add_key_length(t.head_dim)
    w.add_value_length(t.head_dim)
    w.add_rope_dimension_count(t.head_dim)
    w.add_rope_freq_base(float(t.rope_theta))
    w.add_layer_norm_rms_eps(float(t.rms_norm_eps))
    w.add_vocab_size(t.vocab_size)
    write_tokenizer(w, gguf, loaded)

    block = precision  # type of the matmul weights
    # The embedding table and the output projection stay at Q8_0 in a Q4_0 file (unless they are packed
    # int4 layers that Q4_0 holds exactly): edgemm's int4 recipes leave them in float, and llama.cpp's
    # own quantizer also keeps the output higher (Q6_K, which gguf-py cannot write).
    edge = "q8_0" if block == "q4_0" else block
    emb_w, emb_p = layer_weight(model.text.embed_tokens)
    head = model.text.lm_head
    out.matrix("token_embd.weight", emb_w, emb_p, "q4_0" if "q4_0" in exact_block_types(emb_p) and block == "q4_0" else edge,
               "text.embed_tokens")
    advance()
    for i, layer in enumerate(model.text.layers):
        a, m = layer.self_attn, layer.mlp
        p = f"blk.{i}."
        out.f32(p + "attn_norm.weight", layer.input_layernorm.weight.detach().float().numpy())
        for gname, mod, heads in (("attn_q", a.q_proj, t.num_heads), ("attn_k", a.k_proj, t.num_kv_heads)):
            wt, pk = layer_weight(mod)
            if permute_qk:
                wt = permute_rope(wt, heads)
                if pk is not None:
                    pk = Packed(pk.fmt, permute_rope(pk.codes, heads), permute_rope(pk.scales, heads), pk.group)
            out.matrix(p + gname + ".weight", wt, pk, block, f"text.layers.{i}.self_attn.{gname[-1]}_proj")
            advance()
        for gname, mod, src in (("attn_v", a.v_proj, "self_attn.v_proj"), ("attn_output", a.o_proj, "self_attn.o_proj"),
                                ("ffn_gate", m.gate_proj, "mlp.gate_proj"), ("ffn_up", m.up_proj, "mlp.up_proj"),
                                ("ffn_down", m.down_proj, "mlp.down_proj")):
            wt, pk = layer_weight(mod)
            out.matrix(p + gname + ".weight", wt, pk, block, f"text.layers.{i}.{src}")
            advance()
        for bname, mod in (("attn_q", a.q_proj), ("attn_k", a.k_proj), ("attn_v", a.v_proj), ("attn_output", a.o_proj)):
            if getattr(mod, "bias", None) is not None:
                raise EdgemmError(f"gguf: text layer {i} {bname} has a bias; the llama layout has none")
        out.f32(p + "ffn_norm.weight", layer.post_attention_layernorm.weight.detach().float().numpy())
    out.f32("output_norm.weight", model.text.norm.weight.detach().float().numpy())
    advance()
    if not t.tie_word_embeddings:
        hw, hp = layer_weight(head)
        out.matrix("output.weight", hw, hp, "q4_0" if "q4_0" in exact_block_types(hp) and block == "q4_0" else edge,
                   "text.lm_head")
    advance()
    out.finish()
    return out.log


def write_tokenizer(w, gguf, loaded) -> None:
    """A byte-level BPE tokenizers.Tokenizer as llama.cpp's `gpt2` tokenizer (GPT-2 pre-tokenizer)."""
    cfg = loaded.config
    tj = json.loads(loaded.processor.tokenizer.to_str())
    mdl = tj.get("model") or {}
    pre = tj.get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence":
        pres = pre.get("pretokenizers") or []
        pre = pres[0] if len(pres) == 1 else {"type": "Sequence"}
    dec = tj.get("decoder") or {}
    problems = []
    if mdl.get("type") != "BPE":
        problems.append(f"model {mdl.get('type')}")
    if mdl.get("byte_fallback") or mdl.get("continuing_subword_prefix") or mdl.get("end_of_word_suffix"):
        problems.append("byte fallback / subword affixes")
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex", True):
        problems.append(f"pre-tokenizer {pre.get('type')}")
    if tj.get("normalizer"):
        problems.append("a normalizer")
    if dec.get("type") != "ByteLevel":
        problems.append(f"decoder {dec.get('type')}")
    if problems:
        raise EdgemmError("gguf: only byte-level BPE tokenizers (GPT-2 style, no prefix space, no normalizer) are "
                          f"converted to llama.cpp's gpt2 tokenizer; this one has {', '.join(problems)}")
    tokens: dict[int, str] = {int(i): s for s, i in mdl["vocab"].items()}
    types: dict[int, int] = {i: gguf.TokenType.NORMAL for i in tokens}
    for a in tj.get("added_tokens") or []:
        tokens[int(a["id"])] = a["content"]
        types[int(a["id"])] = gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED
    n = cfg.text.vocab_size
    if max(tokens) >= n:
        raise EdgemmError(f"gguf: the tokenizer has token id {max(tokens)} but the model's vocabulary is {n}")
    seen = set(tokens.values())
    if len(seen) != len(tokens):
        dup = Counter(tokens.values()).most_common(1)[0][0]
        raise EdgemmError(f"gguf: token string {dup!r} appears twice in the vocabulary (llama.cpp aborts on duplicates)")
    for i in range(n):
        if i not in tokens:
            s, j = f"<edgemm_unused_{i}>", 0
            while s in seen:
                j += 1
                s = f"<edgemm_unused_{i}_{j}>"
            tokens[i], types[i] = s, gguf.TokenType.UNUSED
            seen.add(s)
    merges = [" ".join(m) if isinstance(m, (list, tuple)) else m for m in mdl.get("merges") or []]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list([tokens[i] for i in range(n)])
    w.add_token_types([int(types[i]) for i in range(n)])
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_pad_token_id(cfg.pad_token_id)
    w.add_add_bos_token(True)  # edgemm's prompts start with BOS
    w.add_add_eos_token(False)


# -------------------------------------------------------------------------------------- mmproj


def write_mmproj_gguf(path, loaded, precision: str = "f16", advance=lambda n=1: None) -> TensorLog:
    """ViT blocks up to the feature layer + the MLP projector as a `clip` GGUF with projector `mlp`."""
    model, cfg = loaded.model, loaded.config
    check_representable(cfg)
    v = cfg.vision
    nrun = cfg.feature_layer_index
    out = _Writer(path, "clip")
    w, gguf = out.w, out.gguf
    w.add_name(f"edgemm {loaded.source} mmproj")
    w.add_file_type(_file_type(gguf, precision))
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_text_encoder", False)
    w.add_string("clip.projector_type", "mlp")
    w.add_uint32("clip.vision.image_size", v.image_size)
    w.add_uint32("clip.vision.patch_size", v.patch_size)
    w.add_uint32("clip.vision.embedding_length", v.hidden_size)
    inter = v.intermediate_size
    pad = 0
    if inter == v.hidden_size:  # mtmd would swap ffn_up/ffn_down (legacy-name heuristic): pad with zero units
        pad = QK
    w.add_uint32("clip.vision.feed_forward_length", inter + pad)
    w.add_uint32("clip.vision.block_count", nrun)
    w.add_uint32("clip.vision.attention.head_count", v.num_heads)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", float(v.layer_norm_eps))
    w.add_uint32("clip.vision.projection_dim", cfg.text.hidden_size)
    w.add_array("clip.vision.image_mean", [float(x) for x in v.image_mean])
    w.add_array("clip.vision.image_std", [float(x) for x in v.image_std])
    w.add_array("clip.vision.feature_layer", [nrun])
    for k, val in vision_ffn_op(v.hidden_act).items():
        w.add_bool(k, val)

    vt = model.vision
    pw, pp = layer_weight(vt.patch_embed)
    if pp is not None:
        out.log.dequantized.append("vision.patch_embed")
    d = v.hidden_size
    # the patch embedding is a convolution in llama.cpp (im2col + matmul): F16 kernel [D, C, p, p]
    out._add("v.patch_embd.weight", np.ascontiguousarray(pw.reshape(d, v.num_channels, v.patch_size, v.patch_size)
                                                          .astype(np.float32 if precision == "f32" else np.float16)),
             "f32" if precision == "f32" else "f16")
    if getattr(vt.patch_embed, "bias", None) is not None:
        out.f32("v.patch_embd.bias", vt.patch_embed.bias.detach().float().numpy())
    out.f32("v.class_embd", vt.class_embedding.detach().float().numpy())
    out.f32("v.position_embd.weight", vt.position_embedding.detach().float().numpy())
    if vt.pre_layernorm is not None:
        out.f32("v.pre_ln.weight", vt.pre_layernorm.weight.detach().float().numpy())
        out.f32("v.pre_ln.bias", vt.pre_layernorm.bias.detach().float().numpy())
    advance(4)
    mat = "f16" if precision == "f16" else precision
    for i in range(nrun):
        blk = vt.layers[i]
        p = f"v.blk.{i}."
        at = blk.self_attn
        for gname, mod, src in (("attn_q", at.q_proj, "q_proj"), ("attn_k", at.k_proj, "k_proj"),
                                ("attn_v", at.v_proj, "v_proj"), ("attn_out", at.out_proj, "out_proj")):
            wt, pk = layer_weight(mod)
            out.matrix(p + gname + ".weight", wt, pk, mat, f"vision.layers.{i}.self_attn.{src}")
            out.f32(p + gname + ".bias", _bias(mod, wt.shape[0]))
            advance(2)
        w1, p1 = layer_weight(blk.mlp.fc1)
        w2, p2 = layer_weight(blk.mlp.fc2)
        b1 = _bias(blk.mlp.fc1, w1.shape[0])
        if pad:
            w1 = np.concatenate([w1, np.zeros((pad, w1.shape[1]), np.float32)])
            b1 = np.concatenate([b1, np.zeros(pad, np.float32)])
            w2 = np.concatenate([w2, np.zeros((w2.shape[0], pad), np.float32)], axis=1)
            p1 = p2 = None  # padded: written from the dequantized weights
        out.matrix(p + "ffn_up.weight", w1, p1, mat, f"vision.layers.{i}.mlp.fc1")
        out.f32(p + "ffn_up.bias", b1)
        out.matrix(p + "ffn_down.weight", w2, p2, mat, f"vision.layers.{i}.mlp.fc2")
        out.f32(p + "ffn_down.bias", _bias(blk.mlp.fc2, w2.shape[0]))
        for gname, ln in (("ln1", blk.layer_norm1), ("ln2", blk.layer_norm2)):
            out.f32(p + gname + ".weight", ln.weight.detach().float().numpy())
            out.f32(p + gname + ".bias", ln.bias.detach().float().numpy())
        advance(8)
    pr = model.projector
    for idx, mod, src in ((0, pr.linear_1, "projector.linear_1"), (2, pr.linear_2, "projector.linear_2")):
        wt, pk = layer_weight(mod)
        out.matrix(f"mm.{idx}.weight", wt, pk, mat, src)
        out.f32(f"mm.{idx}.bias", _bias(mod, wt.shape[0]))  # mtmd adds the bias unconditionally: zeros if none
        advance(2)
    out.finish()
    return out.log


def _bias(mod, n: int) -> np.ndarray:
    b = getattr(mod, "bias", None)
    return np.zeros(n, np.float32) if b is None else b.detach().float().cpu().numpy()


__all__ = ["write", "write_text_gguf", "write_mmproj_gguf", "check_representable", "PRECISIONS", "MMPROJ_PRECISIONS",
           "GGUF_TOKEN_METHODS", "permute_rope", "layer_weight", "exact_block_types", "pack_exact"]
