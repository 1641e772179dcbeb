"""Native export: one model file for edgemm's own C++ engine (native/), a GGUF container.

The file is written with gguf-py's GGUFWriter (`general.architecture = "edgemm"`), so gguf tooling
(gguf-dump, GGUFReader) can read it; native/README.md ("File format") is the contract with the engine.

Keys: `edgemm.format_version` (u32, 1), `edgemm.config` (the edgemm config.json text, with
`extras.quantization` / `extras.sparsity` / `extras.visual_tokens`), `edgemm.tokenizer` (tokenizer.json
text), `edgemm.preprocess` (JSON {image_size, resize, mean, std}), `edgemm.prompt_template`,
`edgemm.chunk_size` (u32), `edgemm.max_context` (u32), `edgemm.decode_quantization` (JSON like
extras.quantization for the decode-only weight set, "{}" when there is none).

Tensors: the edgemm checkpoint's names and shapes (docs/formats.md): float tensors F32 (or F16 when
asked and exact), int8 `qweight` I8, int4 `qweight` (uint8 [N, K/2]) as I8 raw bytes, `scales` F16,
`zeros` I8 raw bytes, `weight_scale` F32, `input_scale` F32 [1], `outlier_channels` I32 (absent when
empty: GGUF has no zero-size tensors). gguf-py writes numpy shapes innermost-first (GGML `ne` order):
a [N, K] tensor is stored with ne = [K, N]. A second, decode-only weight set for the LLM's linear
layers and its LM head lives under the prefix `decode.` (`decode.text.layers.0.mlp.up_proj.qweight`,
`.scales`, `.zeros`; `decode.text.lm_head.*`; the bias, if any, is the main set's). With tied embeddings
the main set has no lm_head tensor (the engine reads the embedding) and the decode set has its own
quantized copy of it. The engine runs single-token steps on the decode set and prompt chunks on the main
set; the LM head, which computes one row per step (a decode step or the last row of a prefill), is the
decode set's for both, so the file holds no float copy of it then (older files did; the engine ignores it).

Weight sets (`precision` presets; `prefill` / `decode` override them):
- fp32:       float weights everywhere, no decode set.
- int8:       W8A8 (+ shadow outliers) prefill set for the LLM; int8 (per channel) decode set.
- w8a8-int4:  W8A8 prefill set; int4 group-wise (`group_size`, default 32) decode set (default).
From a float checkpoint the W8A8 set is calibrated with edgemm.compress (`calib_n` shapes questions of
the calibration split) and the decode set is quantized from the *float* weights (RTN, or GPTQ with
`decode_method="gptq"`; the LM head is always RTN). A checkpoint that is already compressed is mapped
verbatim (its packed tensors are the main set); a decode set is then derived only for W8A8 layers (from
their int8 weights, noted), and it takes the LM head along unless the checkpoint stores that weight-only.
N:M sparsity (extras.sparsity) is kept: both sets keep the zeros exactly. The vision encoder and the
projector stay as the checkpoint has them (float unless compressed) unless `vision="w8a8"`.

Memory: the export holds the float model once. The W8A8 calibration runs on a copy of the module tree
that shares the float tensors (W8A8 replaces modules and never writes to a weight), with the LM head cut
off (no calibration logits); the RTN decode set is quantized one layer at a time straight into the
packed arrays; float tensors go to the file as views of the model's memory, and the file is verified with
plain block reads. Peak ~ the float model + the int8 main set + the decode set (GPTQ needs more).

`reference_model(path)` rebuilds, from a written model file, the torch model with the very same tensors
(W8A8 for prompt chunks, the decode set for single tokens): the yardstick of the native engine's
agreement tests (`python -m edgemm.export.native agree BUNDLE`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from edgemm.errors import EdgemmError

from .bundle import Artifact

ARCH = "edgemm"
FORMAT_VERSION = 1
FILE = "native/model.gguf"
ROLE = "model"
DECODE_PREFIX = "decode."
PRESETS = {"fp32": ("fp32", None), "int8": ("w8a8", "int8"), "w8a8-int4": ("w8a8", "int4")}
PREFILL = ("fp32", "w8a8")
DECODE = ("int4", "int8", "none")
DECODE_METHODS = ("rtn", "gptq")
FLOAT_TYPES = ("f32", "f16", "auto")
TEXT_LINEARS = "text.layers.*"
KEYS = ("format_version", "config", "tokenizer", "preprocess", "prompt_template", "chunk_size", "max_context",
        "decode_quantization")


def resolve_options(precision=None, prefill=None, decode=None) -> tuple[str, str | None, str]:
    """-> (prefill, decode or None, precision label) with one-line errors for bad values."""
    precision = "w8a8-int4" if precision is None else str(precision).lower()
    if precision not in PRESETS:
        raise EdgemmError(f"native precision {precision!r} is not supported; choose one of {', '.join(PRESETS)}")
    p, d = PRESETS[precision]
    if prefill is not None:
        p = str(prefill).lower()
        if p not in PREFILL:
            raise EdgemmError(f"native prefill {prefill!r} must be one of {', '.join(PREFILL)}")
    if decode is not None:
        d = str(decode).lower()
        if d not in DECODE:
            raise EdgemmError(f"native decode {decode!r} must be one of {', '.join(DECODE)}")
        d = None if d == "none" else d
    label = next((k for k, v in PRESETS.items() if v == (p, d)), f"{p}+{d or 'none'}")
    return p, d, label


def write(bw, loaded, precision: str | None = None, prefill: str | None = None, decode: str | None = None,
          group_size: int = 32, decode_method: str = "rtn", chunk_size: int = 256, max_context: int | None = None,
          calib_n: int = 128, vision: str | None = None, float_type: str = "f32", **options) -> list[Artifact]:
    """Add the native model file (native/model.gguf) of `loaded` to the bundle writer `bw`."""
    if options:
        raise EdgemmError(f"native export: unknown option {sorted(options)[0]!r} (options: precision, prefill, decode, "
                          f"group_size, decode_method, chunk_size, max_context, calib_n, vision, float_type)")
    import gguf  # noqa: F401  (a clear error early if the package is missing)

    prefill, decode, label = resolve_options(precision, prefill, decode)
    cfg = loaded.config
    chunk_size = _positive_int(chunk_size, "chunk_size")
    max_context = cfg.text.max_position_embeddings if max_context is None else _positive_int(max_context, "max_context")
    if max_context > cfg.text.max_position_embeddings:
        raise EdgemmError(f"native max_context {max_context} exceeds the model's max_position_embeddings "
                          f"{cfg.text.max_position_embeddings}")
    calib_n = _positive_int(calib_n, "calib_n")
    if decode_method not in DECODE_METHODS:
        raise EdgemmError(f"native decode_method {decode_method!r} must be one of {', '.join(DECODE_METHODS)}")
    if float_type not in FLOAT_TYPES:
        raise EdgemmError(f"native float_type {float_type!r} must be one of {', '.join(FLOAT_TYPES)}")
    vision = vision or "checkpoint"
    if vision not in ("checkpoint", "float", "w8a8"):
        raise EdgemmError(f"native vision {vision!r} must be checkpoint, float or w8a8")

    sets = build_weight_sets(loaded, prefill, decode, group_size=group_size, decode_method=decode_method,
                             calib_n=calib_n, vision=vision, notes=bw.note)
    path = bw.path(FILE)
    info = write_model_file(path, loaded.processor, sets["config"], sets["tensors"], sets["decode_layers"],
                            chunk_size=chunk_size, max_context=max_context, float_type=float_type)
    verify_model_file(path, info)
    bw.extra["chunk_size"] = chunk_size
    bw.extra["max_context"] = max_context
    fmts = sorted({m["format"] for m in sets["config"]["extras"].get("quantization", {}).get("layers", {}).values()})
    if sets["compressed"]:  # name what the file holds, not the preset that did not apply
        label = "+".join(fmts) + (f"-{decode}" if sets["decode_layers"] else "")
    has_w8a8 = "w8a8" in fmts
    art = bw.add(Artifact(FILE, ROLE, "edgemm-native", label, lane="npu" if has_w8a8 else "cpu",
                          processor="cpu", runtime="native",
                          extra={"architecture": ARCH, "file_format": "gguf", "format_version": FORMAT_VERSION,
                                 "main_formats": fmts or ["fp32"], "decode": decode if sets["decode_layers"] else None,
                                 "decode_layers": len(sets["decode_layers"]),
                                 "group_size": group_size if decode == "int4" and sets["decode_layers"] else None,
                                 "tensor_types": info["type_counts"], "tensors": info["n_tensors"],
                                 "prefill_lane": "npu" if has_w8a8 else "cpu", "decode_lane": "cpu"}))
    return [art]


def _positive_int(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise EdgemmError(f"native {name} must be a positive integer, got {v!r}")
    return int(v)


# ------------------------------------------------------------------------------------------ weight sets


def _packed_formats(model) -> dict[str, str]:
    from edgemm.compress.modules import PackedLinear

    return {n: m.format for n, m in model.named_modules() if isinstance(m, PackedLinear)}


def build_weight_sets(loaded, prefill: str, decode: str | None, group_size: int = 32, decode_method: str = "rtn",
                      calib_n: int = 128, vision: str = "checkpoint", notes=lambda s: None) -> dict:
    """-> {"config": config dict, "tensors": {name: np.ndarray}, "decode_layers": {layer: metadata}}.

    The model in `loaded` is never modified: W8A8 calibration runs on a copy of the module tree that
    shares the (unchanged) float tensors, the decode set is quantized layer by layer from the float
    weights, and the float tensors of the result are views of the model's own (no copies)."""
    import torch
    from torch import nn

    from edgemm.compress import apply
    from edgemm.compress.config import W8A8Config
    from edgemm.models.checkpoint import state_dict_for_saving

    src = loaded.model
    fm = _packed_formats(src)  # the checkpoint's packed layers: name -> int4 | int8 | w8a8
    compressed = bool(fm)
    loop = None

    def calibration():
        nonlocal loop
        if loop is None:
            from edgemm.compress.calibration import shapes_forward_loop

            loop = _without_logits(shapes_forward_loop(loaded.processor, n=calib_n))
        return loop

    text_names = [n for n, m in src.named_modules()
                  if n.startswith("text.layers.") and (isinstance(m, nn.Linear) or n in fm)]
    text_float = [n for n in text_names if n not in fm]
    if compressed:
        notes(f"native: the checkpoint is already compressed ({', '.join(sorted(set(fm.values())))}); its packed "
              f"tensors are mapped verbatim" + (f", its {len(text_float)} float LLM layers get the {prefill} prefill "
                                                f"set" if text_float and prefill == "w8a8" else ""))
    main = src
    if prefill == "w8a8" and (text_float or vision == "w8a8"):
        include = list(text_float)
        if vision == "w8a8":
            include += [n for n, m in src.named_modules() if isinstance(m, nn.Linear) and n.startswith(("vision.", "projector."))]
        main = _sharing_copy(src)
        if include:
            w8a8 = W8A8Config(include=include, exclude=[])
            # the copy shares the source's tensors: W8A8 replaces modules and never writes to a weight, but
            # SmoothQuant folds its scales into the weights in place
            assert w8a8.smoothquant is None, "native: SmoothQuant would modify the shared float weights"
            with torch.no_grad():
                apply(main, w8a8, forward_loop=calibration())
    elif vision == "w8a8":
        raise EdgemmError("native: vision='w8a8' needs the w8a8 prefill set")

    # The decode set covers every LLM linear or none (the engine fuses q/k/v and gate/up): layers that
    # prefill in float or W8A8 are quantized to the decode format (from their float weights; W8A8 layers
    # of the checkpoint from their dequantized int8 weights); weight-only layers are copied as they are.
    # The LM head joins a decode set (RTN from its float weight, the embedding when tied) unless the
    # checkpoint already stores it weight-only.
    decode_layers: dict[str, dict] = {}
    decode_tensors: dict[str, np.ndarray] = {}
    main_fmt = _packed_formats(main)
    needs = [n for n in text_names if main_fmt.get(n) in (None, "w8a8")] if decode else []
    if needs:
        w8 = [n for n in needs if fm.get(n) == "w8a8"]
        if w8:
            notes(f"native: the {decode} decode set of {len(w8)} W8A8 layers is quantized from their int8 weights "
                  f"(dequantized), not from float weights")
        gs = group_size if decode == "int4" else 0
        bits = 4 if decode == "int4" else 8
        sparse = (main.config.extras.get("sparsity") or {}).get("layers", {})
        gptq = _gptq_decode(src, needs, w8, bits, gs, calibration, sparse) if decode_method == "gptq" else {}
        head = [HEAD] if main_fmt.get(HEAD) in (None, "w8a8") and _has_module(src, HEAD) else []
        for n in text_names + head:
            if n in gptq:
                meta, packed = gptq.pop(n)
            elif n in needs or n in head:
                mod = src.get_submodule(n)
                w = mod.dequantized_weight() if fm.get(n) == "w8a8" else mod.weight.detach()
                g = sparse_group(gs, sparse.get(n), int(w.shape[1]))
                meta, packed = rtn_decode_tensors(w, bits, g, n, bias=getattr(mod, "bias", None) is not None)
            else:  # weight-only in the checkpoint: its packed tensors serve both sets
                mod = src.get_submodule(n)
                meta = mod.metadata()
                packed = {k: t.detach().cpu().numpy() for k in ("qweight", "scales", "zeros")
                          if isinstance(t := getattr(mod, k, None), torch.Tensor)}
            if n in sparse and n in needs:
                _check_sparse_decode(n, packed, meta, sparse[n])
            decode_layers[n] = meta
            for k, a in packed.items():
                decode_tensors[f"{DECODE_PREFIX}{n}.{k}"] = a
    elif decode and compressed:
        notes("native: no decode set: the LLM's packed layers already are weight-only (decode uses the main set)")

    main.config.validate()
    cfg_dict = main.config.to_dict()
    tensors = {k: v.detach().cpu().numpy() for k, v in state_dict_for_saving(main).items()}
    if HEAD in decode_layers:  # the engine runs the decode set's head for every step: no float copy
        tensors.pop(f"{HEAD}.weight", None)
    tensors.update(decode_tensors)
    return {"config": cfg_dict, "tensors": tensors, "decode_layers": decode_layers, "compressed": compressed}


HEAD = "text.lm_head"
RTN_ROWS = 8192  # rows per block when quantizing one weight (bounds the temporaries of a 151936-row LM head)


def _has_module(model, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def sparse_group(group_size: int, sp: dict | None, k: int) -> int:
    """The int4 decode group of a layer: `group_size` input positions, or for an N:M-sparse layer
    group_size * M / N positions, so that every scale still covers `group_size` stored values (2:4 at
    group 32: one scale per 64 positions, 3.25 instead of 3.5 bits per position: the sparse GEMV reads
    1.38x fewer bytes than dense int4 g32, not 1.29x), as long as that divides k."""
    if not group_size or not sp:
        return group_size
    g = group_size * int(sp["m"]) // int(sp["n"])
    return g if k % g == 0 else group_size


def rtn_decode_tensors(w, bits: int, group_size: int, name: str, bias: bool = False) -> tuple[dict, dict]:
    """Symmetric RTN of one float weight [N, K] (edgemm.compress.rtn's numbers exactly), block of rows by
    block of rows -> (layer metadata as QuantLinear.metadata(), {"qweight", "scales"} numpy arrays)."""
    from edgemm.compress import qformat

    n, k = (int(x) for x in w.shape)
    g = qformat.resolve_group(k, group_size, name, bits)
    qweight = np.empty((n, k if bits == 8 else k // 2), np.int8 if bits == 8 else np.uint8)
    scales = np.empty((n, k // g), np.float16)
    for r in range(0, n, RTN_ROWS):
        u, s, z = qformat.rtn(w[r:r + RTN_ROWS], bits, g, True)
        st = qformat.to_storage(u, s, z, bits, True)
        qweight[r:r + RTN_ROWS] = st["qweight"].numpy()
        scales[r:r + RTN_ROWS] = st["scales"].numpy()
    meta = {"format": f"int{bits}", "bits": bits, "group_size": g, "symmetric": True, "method": "rtn",
            "in_features": k, "out_features": n, "bias": bool(bias)}
    return meta, {"qweight": qweight, "scales": scales}


def _gptq_decode(src, needs, w8, bits: int, group_size: int, calibration, sparse=None) -> dict[str, tuple[dict, dict]]:
    """GPTQ decode tensors of the LLM layers `needs` (sequential, on a copy of the module tree that shares
    the float tensors; the checkpoint's W8A8 layers `w8` enter as float layers with their dequantized
    weights; N:M layers at their `sparse_group`). -> {layer: (metadata, packed numpy tensors)}."""
    import torch
    from torch import nn

    from edgemm.compress import apply
    from edgemm.compress.common import NM_ATTR, set_module
    from edgemm.compress.config import GPTQConfig

    dq = _sharing_copy(src)
    for n in w8:
        m = dq.get_submodule(n)
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(m.dequantized_weight())
            if m.bias is not None:
                lin.bias.copy_(m.bias)
        if getattr(m, NM_ATTR, None) is not None:
            setattr(lin, NM_ATTR, dict(getattr(m, NM_ATTR)))
        set_module(dq, n, lin)
    by_group: dict[int, list[str]] = {}
    for n in needs:
        k = int(dq.get_submodule(n).in_features)
        by_group.setdefault(sparse_group(group_size, (sparse or {}).get(n), k), []).append(n)
    with torch.no_grad():
        for g, names in by_group.items():
            apply(dq, GPTQConfig(bits=bits, group_size=g, include=names, exclude=[]), forward_loop=calibration())
    out = {}
    for n in needs:
        mod = dq.get_submodule(n)
        out[n] = (mod.metadata(), {k: t.detach().numpy() for k in ("qweight", "scales", "zeros")
                                   if isinstance(t := getattr(mod, k, None), torch.Tensor)})
    return out


def _sharing_copy(model):
    """A copy of `model`'s module tree (own modules, hooks and config) holding the very same parameter and
    buffer tensors: nothing is copied. For methods that replace modules and never write into a tensor."""
    import itertools

    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def _without_logits(loop):
    """The calibration `loop` with the LM head cut off: what W8A8 and GPTQ observe lies before it, and
    full-vocabulary logits at every position of a calibration batch are large (8 x 600 x 151936 floats =
    2.9 GB at LLaVA-Qwen-1.8B shapes). The head is swapped for the call only."""
    from torch import nn

    class NoLogits(nn.Module):
        def forward(self, h):
            return h[..., :0]

    def run(model):
        text = getattr(model, "text", None)
        head = getattr(text, "lm_head", None)
        if head is None:
            return loop(model)
        text.lm_head = NoLogits()
        try:
            return loop(model)
        finally:
            text.lm_head = head

    run.loop = loop
    return run


def _check_sparse_decode(name: str, packed: dict, meta: dict, sp: dict) -> None:
    """N:M layers: the decode set must keep every zero of the main set's weights exactly."""
    import torch

    from edgemm.compress import qformat

    z = packed.get("zeros")
    w = qformat.dequantize_storage(torch.from_numpy(packed["qweight"]), torch.from_numpy(packed["scales"]),
                                   None if z is None else torch.from_numpy(z), int(meta["bits"]))
    m = int(sp["m"])
    nz = (w.reshape(w.shape[0], -1, m) != 0).sum(-1)
    if int(nz.max()) > int(sp["n"]):
        raise EdgemmError(f"native: the decode set of {name} lost its {sp['n']}:{m} sparsity (exporter bug)")


# ------------------------------------------------------------------------------------------- the file


def _gguf_tensor(name: str, a: np.ndarray, float_type: str):
    """-> (array to write, GGML type name) following the contract's dtype rules."""
    if a.dtype in (np.float32, np.float64, np.float16) or a.dtype.kind == "f":
        if name.endswith(".scales"):
            if a.dtype != np.float16:
                raise EdgemmError(f"native: {name} must be float16 (docs/formats.md), got {a.dtype}")
            return np.ascontiguousarray(a), "F16"
        if name.endswith(".input_scale"):
            return np.ascontiguousarray(a.astype(np.float32).reshape(1)), "F32"
        a32 = a.astype(np.float32, copy=False)  # the model's own memory when it already is float32
        if float_type == "f16" or (float_type == "auto" and _f16_exact(a32)):
            h = np.ascontiguousarray(a32.astype(np.float16))
            if not np.isfinite(h).all():
                raise EdgemmError(f"native: {name} overflows float16; export with float_type='f32'")
            return h, "F16"
        return np.ascontiguousarray(a32), "F32"
    if a.dtype == np.int8:
        return np.ascontiguousarray(a), "I8"
    if a.dtype == np.uint8:  # int4 qweight / zeros: raw bytes as I8
        return np.ascontiguousarray(a.view(np.int8)), "I8"
    if a.dtype == np.int32:
        return np.ascontiguousarray(a), "I32"
    if a.dtype == np.int64:
        raise EdgemmError(f"native: tensor {name} is int64; the format has no such type")
    raise EdgemmError(f"native: tensor {name} has dtype {a.dtype}, which the format cannot store")


def _f16_exact(a: np.ndarray, rows: int = 4096) -> bool:
    """Every value of float32 `a` survives float16 exactly (checked a block of rows at a time)."""
    a2 = a.reshape(a.shape[0], -1) if a.ndim > 1 else a.reshape(1, -1)
    return all(np.array_equal(b.astype(np.float16).astype(np.float32), b) for b in
               (a2[r:r + rows] for r in range(0, a2.shape[0], rows)))


def preprocess_json(cfg) -> str:
    v = cfg.vision
    return json.dumps({"image_size": v.image_size, "resize": v.image_resize, "mean": list(v.image_mean),
                       "std": list(v.image_std)})


def write_model_file(path, processor, config: dict, tensors: dict[str, np.ndarray], decode_layers: dict,
                     chunk_size: int, max_context: int, float_type: str = "f32") -> dict:
    """Write the GGUF model file at `path` (atomically). Returns what was written (for verification)."""
    import gguf

    from edgemm.models.config import VLMConfig

    cfg = VLMConfig.from_dict(config)
    kv = {
        "format_version": FORMAT_VERSION,
        "config": json.dumps(config),
        "tokenizer": processor.tokenizer.to_str(),
        "preprocess": preprocess_json(cfg),
        "prompt_template": cfg.prompt_template,
        "chunk_size": int(chunk_size),
        "max_context": int(max_context),
        "decode_quantization": json.dumps({"format_version": 1, "layers": decode_layers}) if decode_layers else "{}",
    }
    written: dict[str, tuple[np.ndarray, str]] = {}
    for name, a in tensors.items():
        if name.endswith(".outlier_channels") and a.size == 0:
            continue  # absent = no outlier channels (GGUF has no zero-size tensors)
        if a.size == 0:
            raise EdgemmError(f"native: tensor {name} is empty; the format cannot store it")
        written[name] = _gguf_tensor(name, a, float_type)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, ARCH)
        w.add_uint32(f"{ARCH}.format_version", kv["format_version"])
        for k in ("config", "tokenizer", "preprocess", "prompt_template"):
            w.add_string(f"{ARCH}.{k}", kv[k])
        w.add_uint32(f"{ARCH}.chunk_size", kv["chunk_size"])
        w.add_uint32(f"{ARCH}.max_context", kv["max_context"])
        w.add_string(f"{ARCH}.decode_quantization", kv["decode_quantization"])
        for name, (a, t) in written.items():
            w.add_tensor(name, a, raw_dtype=getattr(gguf.GGMLQuantizationType, t))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    from collections import Counter

    return {"kv": kv, "tensors": written, "type_counts": dict(sorted(Counter(t for _, t in written.values()).items())),
            "n_tensors": len(written)}


def verify_model_file(path, info: dict) -> None:
    """Read the file back with gguf-py's GGUFReader: every key and tensor must round-trip exactly."""
    reader = open_reader(path)
    kv = read_kv(reader)
    for k, v in info["kv"].items():
        if kv.get(k) != v:
            raise EdgemmError(f"native: key {ARCH}.{k} did not round-trip through the GGUF file (exporter bug)")
    got = {t.name: t for t in reader.tensors}
    if set(got) != set(info["tensors"]):
        extra = sorted(set(got) ^ set(info["tensors"]))
        raise EdgemmError(f"native: tensor set differs after writing ({extra[0]}) (exporter bug)")
    # the data is read back with plain reads, a block at a time (comparing through the reader's memory map
    # would make the whole file resident in this process next to the model)
    with open(path, "rb") as f:
        for name, (a, typ) in info["tensors"].items():
            t = got[name]
            if t.tensor_type.name != typ or list(reversed([int(x) for x in t.shape])) != list(a.shape) or \
                    int(t.n_bytes) != a.nbytes or not _file_holds(f, int(t.data_offset), a):
                raise EdgemmError(f"native: tensor {name} did not round-trip through the GGUF file (exporter bug)")


def _file_holds(f, offset: int, a: np.ndarray, block: int = 1 << 24) -> bool:
    """The bytes of the open file `f` at `offset` are exactly those of the contiguous array `a`."""
    flat = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    f.seek(offset)
    for i in range(0, flat.size, block):
        want = flat[i:i + block]
        got = f.read(want.size)
        if len(got) != want.size or not np.array_equal(np.frombuffer(got, np.uint8), want):
            return False
    return True


def open_reader(path):
    import gguf

    path = Path(path)
    if not path.is_file():
        raise EdgemmError(f"native model file not found: {path}")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # gguf-py raises ValueError / struct errors / IndexError on bad files
        raise EdgemmError(f"not a readable GGUF file: {path} ({type(e).__name__}: {str(e)[:120]})") from None


def read_kv(reader) -> dict:
    """The edgemm.* keys of a GGUFReader as Python values (prefix stripped)."""
    out = {}
    for name, field in reader.fields.items():
        if not name.startswith(ARCH + "."):
            continue
        v = field.contents()
        out[name[len(ARCH) + 1:]] = v
    return out


# ------------------------------------------------------------------------------- the torch reference


def read_model_file(path) -> tuple[dict, str, dict[str, np.ndarray], dict]:
    """-> (config dict, tokenizer json text, tensors {name: numpy array in checkpoint dtypes}, decode layers)."""
    reader = open_reader(path)
    kv = read_kv(reader)
    missing = [k for k in KEYS if k not in kv]
    if missing:
        raise EdgemmError(f"{path}: not an edgemm native model file (key {ARCH}.{missing[0]} missing)")
    if kv["format_version"] != FORMAT_VERSION:
        raise EdgemmError(f"{path}: format_version {kv['format_version']}; this edgemm reads {FORMAT_VERSION}")
    try:
        config = json.loads(kv["config"])
        dq = json.loads(kv["decode_quantization"])
    except json.JSONDecodeError as e:
        raise EdgemmError(f"{path}: a JSON key is malformed ({e})") from None
    qlayers = (config.get("extras", {}).get("quantization") or {}).get("layers", {})
    dlayers = dq.get("layers", {}) if dq else {}
    tensors = {}
    for t in reader.tensors:
        shape = tuple(reversed([int(x) for x in t.shape]))
        a = np.asarray(t.data).reshape(shape)
        layer, _, leaf = t.name.rpartition(".")
        meta = dlayers.get(layer[len(DECODE_PREFIX):]) if layer.startswith(DECODE_PREFIX) else qlayers.get(layer)
        if meta and meta.get("format") == "int4" and leaf in ("qweight", "zeros"):
            a = a.view(np.uint8)
        elif leaf == "input_scale":
            a = a.reshape(())
        tensors[t.name] = np.array(a)
    for layer, meta in qlayers.items():
        if meta.get("format") == "w8a8" and f"{layer}.outlier_channels" not in tensors:
            tensors[f"{layer}.outlier_channels"] = np.zeros(0, np.int32)
    return config, kv["tokenizer"], tensors, dlayers


def reference_model(path, act_quant: bool = True, kv_fp16: bool | None = None):
    """The torch EdgeVLM holding exactly the tensors of a native model file (or a bundle's), as a LoadedModel.

    `kv_fp16` rounds keys and values to fp16 as the engine's fp16 KV cache does; None follows the engine's
    default (load option attention "auto"): fp16 when the text linear layers are quantized.

    Linear layers with a decode set run their main (prefill) weights on multi-token inputs and the decode
    weights on single-token steps, as the native engine does. With `act_quant` (default) every weight-only
    int4/int8 layer (decode set, or a compressed checkpoint's main set) also quantizes its input as the
    engine's weight-only kernels do (int8 per block of 32/64/128 inputs, native/README.md "Numeric
    contracts"), so this is the matching-precision reference. W8A8 layers (W8A8Linear) already compute
    the engine's integer math."""
    import torch
    from tokenizers import Tokenizer

    from edgemm.compress.common import set_module
    from edgemm.compress.modules import restore_layer
    from edgemm.models.checkpoint import RESTORERS, LoadedModel, load_state
    from edgemm.models.config import VLMConfig
    from edgemm.models.modeling import EdgeVLM
    from edgemm.processor import Processor

    path = model_path(path)
    config, tok_json, tensors, dlayers = read_model_file(path)
    cfg = VLMConfig.from_dict(config)
    processor = Processor(Tokenizer.from_str(tok_json), cfg)
    with torch.device("meta"):
        model = EdgeVLM(cfg)
    model = model.to_empty(device="cpu")
    if "quantization" in cfg.extras or "sparsity" in cfg.extras:
        import edgemm.compress.restore  # noqa: F401
    for key, restore in RESTORERS.items():
        if key in cfg.extras:
            restore(model, cfg.extras[key])
    main = {k: torch.from_numpy(v.astype(np.float32) if v.dtype == np.float16 and not k.endswith(".scales") else v)
            for k, v in tensors.items() if not k.startswith(DECODE_PREFIX)}
    if HEAD in dlayers and not cfg.text.tie_word_embeddings:
        # the engine runs the decode set's head on every step; the file has no float copy (older files
        # do: it is ignored, as the engine ignores it)
        w = model.text.lm_head.weight
        main[f"{HEAD}.weight"] = torch.zeros((), dtype=w.dtype).expand(w.shape)
    load_state(model, main, str(path))
    from edgemm.compress.modules import QuantLinear

    pd_cls, woq_cls = _modules()

    def act(mod):
        return woq_cls(mod, woq_act_block(mod.group_size)) if act_quant and isinstance(mod, QuantLinear) else mod

    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantLinear):
            set_module(model, name, act(mod))
    for layer, meta in dlayers.items():
        dec = restore_layer(meta, layer)
        sd = {k[len(DECODE_PREFIX) + len(layer) + 1:]: torch.from_numpy(v) for k, v in tensors.items()
              if k.startswith(f"{DECODE_PREFIX}{layer}.")}
        main_mod = model.get_submodule(layer)
        if dec.bias is not None:
            sd["bias"] = main_mod.bias.detach().clone()
        dec.load_state_dict(sd, strict=True)
        set_module(model, layer, pd_cls(main_mod, act(dec)))
    if HEAD in dlayers:  # one head, the decode set's, for prompt and decode steps alike (as the engine)
        model.text.lm_head = model.text.lm_head.decode
    from edgemm.models.modeling import Attention

    attns = [m for m in model.modules() if isinstance(m, Attention)]
    if kv_fp16 is None:  # the engine: quantized text linears (the first layer's q projection is not float)
        kv_fp16 = bool(attns) and type(attns[0].q_proj) is not torch.nn.Linear
    for a in attns:
        a.kv_round = torch.float16 if kv_fp16 else None
    model.eval()
    return LoadedModel(model, processor, f"native-reference:{path}", Path(path).parent)


def model_path(path) -> Path:
    """A model file, or a bundle directory holding one (its `model` artifact for the native runtime)."""
    p = Path(path)
    if p.is_dir():
        from .bundle import read_manifest

        m = read_manifest(p, verify=False)
        arts = [a for a in m["artifacts"] if a.get("runtime") == "native"]
        if not arts:
            raise EdgemmError(f"bundle {p} has no native model file")
        return p / arts[0]["file"]
    if not p.is_file():
        raise EdgemmError(f"native model file not found: {p}")
    return p


def woq_act_block(group: int) -> int:
    """The engine's activation block for weight-only layers of group size G (native/README.md)."""
    return 128 if group % 128 == 0 else 64 if group % 64 == 0 else 32


def quantize_activations(x, block: int):
    """The native weight-only kernels' dynamic activation quantization, in float: per row and block of
    `block` inputs d = amax / 127, q = round_half_even(x * (127 / amax)); -> q * d (zero blocks stay 0)."""
    import torch

    shape = x.shape
    xb = x.float().reshape(-1, shape[-1] // block, block)
    amax = xb.abs().amax(-1, keepdim=True)
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    q = torch.round(xb * (127.0 / safe))
    return torch.where(amax > 0, q * (safe / 127.0), torch.zeros_like(xb)).reshape(shape).to(x.dtype)


@functools.lru_cache(maxsize=None)
def _modules():
    from torch import nn

    class PrefillDecodeLinear(nn.Module):
        """Runs `prefill` on inputs of several tokens and `decode` on one-token inputs ([B, 1, K])."""

        def __init__(self, prefill, decode):
            super().__init__()
            self.prefill, self.decode = prefill, decode
            self.in_features, self.out_features = prefill.in_features, prefill.out_features

        def forward(self, x):
            return (self.decode if x.dim() >= 2 and x.shape[-2] == 1 else self.prefill)(x)

    class WoqActLinear(nn.Module):
        """A weight-only layer (QuantLinear) fed activations quantized as the engine's weight-only kernels
        quantize them (int8 per block of `block` inputs, dynamic scale): W4A8 / W8A8-dynamic numbers."""

        def __init__(self, inner, block: int):
            super().__init__()
            self.inner, self.block = inner, block
            self.in_features, self.out_features = inner.in_features, inner.out_features

        def dequantized_weight(self):
            return self.inner.dequantized_weight()

        def forward(self, x):
            return self.inner(quantize_activations(x, self.block))

    return PrefillDecodeLinear, WoqActLinear


def __getattr__(name):  # torch stays unimported until the reference is needed
    if name in ("PrefillDecodeLinear", "WoqActLinear"):
        return dict(zip(("PrefillDecodeLinear", "WoqActLinear"), _modules()))[name]
    raise AttributeError(name)


# ----------------------------------------------------------------------------------------- agreement


def agreement(bundle, data: str | None = None, threads: int = 2, limit: int | None = None, out_dir=None,
              batch_size: int = 64, quiet: bool = False) -> dict:
    """Greedy answers of the native engine vs the torch reference holding the same tensors
    (reference_model) on `data` (default: the agreement split shapes:200:778).

    Both sides go through edgemm.eval.evaluate (what `edgemm eval --predictions` runs); with `out_dir` the
    two predictions files are kept there (native.jsonl, torch.jsonl). -> report with both accuracies, the
    agreement (fraction of identical normalized answers) and the first disagreements."""
    import tempfile as _tempfile

    from edgemm.data import AGREEMENT, load_dataset
    from edgemm.eval import evaluate, normalize
    from edgemm.runtimes import load
    from edgemm.runtimes.torch_runtime import TorchSession

    data = data or AGREEMENT
    ds = load_dataset(data, limit)
    bundle = Path(bundle)
    with _tempfile.TemporaryDirectory() as tmp:
        where = Path(out_dir) if out_dir else Path(tmp)
        where.mkdir(parents=True, exist_ok=True)
        nat = load(bundle, runtime="native", threads=threads)
        rep_n = evaluate(nat, ds, f"{bundle.name} (native)", batch_size=batch_size, quiet=quiet,
                         predictions=where / "native.jsonl")
        nat.close()
        ref = TorchSession(reference_model(bundle), threads=threads)
        rep_t = evaluate(ref, ds, f"{bundle.name} (torch reference)", batch_size=batch_size, quiet=quiet,
                         predictions=where / "torch.jsonl")
        pn = [json.loads(x) for x in (where / "native.jsonl").read_text().splitlines()]
        pt = [json.loads(x) for x in (where / "torch.jsonl").read_text().splitlines()]
    same = [normalize(a["prediction"]) == normalize(b["prediction"]) for a, b in zip(pn, pt)]
    diffs = [{"question": a["question"], "answer": a["answer"], "native": a["prediction"], "torch": b["prediction"]}
             for a, b, s in zip(pn, pt, same) if not s]
    man = json.loads((bundle / "manifest.json").read_text())
    art = next(a for a in man["artifacts"] if a.get("runtime") == "native")
    return {"bundle": str(bundle), "precision": art["precision"], "data": ds.name, "n": len(same),
            "agreement": sum(same) / len(same), "native_accuracy": rep_n["accuracy"],
            "torch_accuracy": rep_t["accuracy"], "native_questions_per_s": rep_n["questions_per_s"],
            "torch_questions_per_s": rep_t["questions_per_s"], "disagreements": diffs[:10],
            "n_disagreements": len(diffs)}


def _main(argv=None) -> int:
    """python -m edgemm.export.native agree BUNDLE [--data SPEC] [--limit N] [--threads T] [--out DIR] [--json]"""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m edgemm.export.native",
                                 description="native engine vs the torch reference with the same tensors")
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("agree", help="greedy-answer agreement and accuracies")
    a.add_argument("bundle")
    a.add_argument("--data", default=None, help="dataset (default shapes:200:778, the agreement split)")
    a.add_argument("--limit", type=int, default=None)
    a.add_argument("--threads", type=int, default=2)
    a.add_argument("--out", default=None, help="keep native.jsonl / torch.jsonl here")
    a.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        rep = agreement(args.bundle, args.data, args.threads, args.limit, args.out, quiet=args.json)
    except EdgemmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        print(f"{rep['bundle']} ({rep['precision']}) on {rep['data']}: agreement {100 * rep['agreement']:.2f}% "
              f"({rep['n'] - rep['n_disagreements']}/{rep['n']}), native accuracy {100 * rep['native_accuracy']:.2f}%, "
              f"torch reference accuracy {100 * rep['torch_accuracy']:.2f}%")
        for d in rep["disagreements"]:
            print(f"  {d['question']!r}: native {d['native']!r}, torch {d['torch']!r} (answer {d['answer']!r})")
    return 0


__all__ = ["write", "write_model_file", "verify_model_file", "read_model_file", "reference_model", "model_path",
           "agreement", "PRESETS", "FILE"]


if __name__ == "__main__":
    raise SystemExit(_main())
