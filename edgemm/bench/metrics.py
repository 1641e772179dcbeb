"""Work and bytes models for the roofline fractions the bench reports.

- Prefill: useful multiply-accumulates of a text-only prompt of N tokens = N x (every decoder linear layer)
  + causal attention (QK^T and PV over the keys each query sees) + the lm_head for the last token only.
  `int8_peak_fraction` = those MACs per second / the int8 peak of the cores used (at most 2): the AMX-INT8
  tile peak (3375 GMAC/s per core, `edgemm_kernel_bench` tdpbssd_tile_loop) on CPUs with AMX, else the
  AVX-512 VNNI peak (470 GMAC/s per core, vpdpbusd_zmm_loop: two VNNI ports; issue 6 quoted 230, one
  port). `vnni_peak_fraction` is the same rate over the VNNI peak.
- Decode: bytes read per generated token = every decoder linear weight and the lm_head at the storage
  type of the runtime/precision (scales included) + the KV cache read at the current context.
  `bandwidth_fraction` = bytes per token x tokens/s / 29 GB/s (this machine's measured read bandwidth).
A runtime that does more work than needed (e.g. logits for every prompt position) gets no credit for it.
"""

from __future__ import annotations

# int8 peaks per core, measured by native/build/bench/edgemm_kernel_bench --filter peak on the two machines
# this project has run on: Zen 4 runs a 512-bit vpdpbusd as two 256-bit halves (one per cycle), Intel
# cores with two FMA ports two per cycle
VNNI_GMACS_PER_CORE = 470.0  # AVX-512 VNNI, Intel (Sapphire Rapids, 2 ports)
VNNI_ZEN4_GMACS_PER_CORE = 233.4  # AVX-512 VNNI, AMD Zen 4 (the "~230 GMAC/s per core")
AMX_INT8_GMACS_PER_CORE = 3375.0  # AMX-INT8 (tdpbssd, 16x16x64 per op), Sapphire Rapids
MAX_CORES = 2
READ_BANDWIDTH_GBS = 29.0  # measured read bandwidth of this machine (issue 6)

# bytes per weight of the decoder's matmul weights, and of the lm_head, per (runtime, precision);
# bytes per KV-cache element.
WEIGHT_BYTES = {
    ("torch", "fp32"): (4.0, 4.0, 4),
    ("torch", "bf16"): (2.0, 2.0, 2),
    ("onnxruntime", "fp32"): (4.0, 4.0, 4),
    ("onnxruntime", "int8"): (1.0, 1.0, 4),  # quantize_dynamic, per-channel scales (negligible)
    ("onnxruntime", "int4"): (0.5 + 4 / 32, 0.5 + 4 / 32, 4),  # MatMulNBits block 32, fp32 scales
    ("executorch", "fp32"): (4.0, 4.0, 4),
    ("executorch", "8da8w"): (1.0, 1.0, 4),
    ("executorch", "8da4w"): (0.5 + 2 / 32, 0.5 + 2 / 32, 4),  # group 32, bf16 scales
    ("llamacpp", "f16"): (2.0, 2.0, 2),
    ("llamacpp", "q8_0"): (34 / 32, 34 / 32, 2),  # KV cache f16 (llama.cpp's default)
    ("llamacpp", "q4_0"): (18 / 32, 34 / 32, 2),  # the exporter keeps the output matrix at Q8_0
}
# native: the weights and the KV element size come from the engine (decode_weight_bytes, kv_cache: fp16
# under attention "auto" for quantized models, else fp32)


def linear_macs_per_token(t) -> int:
    """MACs of one token through every decoder layer's linear layers (`t` a TextConfig)."""
    d, h, kv, hd, f = t.hidden_size, t.num_heads, t.num_kv_heads, t.head_dim, t.intermediate_size
    per_layer = d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * f
    return t.num_layers * per_layer


def prefill_macs(t, n: int) -> int:
    """Useful MACs of a text-only prefill of n tokens (last-token logits only)."""
    attn = t.num_layers * 2 * t.num_heads * t.head_dim * (n * (n + 1) // 2)
    return n * linear_macs_per_token(t) + attn + t.hidden_size * t.vocab_size


def vision_macs(cfg, early_block: int | None = None, kept: int | None = None) -> int:
    """MACs of one image through the vision encoder (the blocks that run: up to the feature layer): patch
    embedding, each block's linears over the [CLS] + patch tokens, and its (non-causal) attention. With an
    early selection (fastervlm early=true) the blocks after `early_block` run on [CLS] + `kept` patches."""
    v = cfg.vision
    d, f = v.hidden_size, v.intermediate_size

    def block(s):
        return s * (4 * d * d + 2 * d * f) + 2 * s * s * d

    run, s = cfg.feature_layer_index, v.num_patches + 1
    late = 0 if early_block is None else run - 1 - early_block
    return v.num_patches * v.num_channels * v.patch_size ** 2 * d + (run - late) * block(s) + late * block((kept or 0) + 1)


def ttft_macs(cfg, text_tokens: int, visual_tokens: int, early_block: int | None = None) -> int:
    """Useful MACs to the first token of an image question: the vision encoder (all of it, whatever a
    post-encoder compression keeps; fewer blocks' worth after an early selection), the projector on the
    kept tokens, the prefill of text + kept visual tokens."""
    dv, dt = cfg.vision.hidden_size, cfg.text.hidden_size
    kept = visual_tokens - (1 if cfg.vision_feature_select == "full" else 0)
    return (vision_macs(cfg, early_block, kept) + visual_tokens * (dv * dt + dt * dt)
            + prefill_macs(cfg.text, text_tokens + visual_tokens))


def ttft_work_ratio(cfg, text_tokens: int, full_tokens: int, pruned_tokens: int, early_block: int | None = None) -> float:
    """The pruned TTFT speed-up an engine running every part at the same efficiency would show: the ratio
    of useful work. Token compression after the vision encoder cannot beat it (the encoder is paid in
    both); more needs a selection inside the encoder (`early_block`) or an encoder relatively faster than
    the LLM prefill."""
    return ttft_macs(cfg, text_tokens, full_tokens) / ttft_macs(cfg, text_tokens, pruned_tokens, early_block)


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def vnni_gmacs_per_core(vendor: str | None = None) -> float:
    return VNNI_ZEN4_GMACS_PER_CORE if (cpu_vendor() if vendor is None else vendor) == "AuthenticAMD" else VNNI_GMACS_PER_CORE


def int8_gmacs_per_core(flags: set[str] | None = None, vendor: str | None = None) -> float:
    """This CPU's int8 peak per core: AMX-INT8 when present, else AVX-512 VNNI (Intel or Zen 4 rate)."""
    flags = cpu_flags() if flags is None else flags
    return AMX_INT8_GMACS_PER_CORE if "amx_int8" in flags else vnni_gmacs_per_core(vendor)


def int8_peak_gmacs(threads: int, per_core: float | None = None) -> float:
    return (int8_gmacs_per_core() if per_core is None else per_core) * max(1, min(threads, MAX_CORES))


def decode_bytes_per_token(t, runtime: str, precision: str, context: float, weight_bytes: float | None = None,
                           kv_bytes: int | None = None) -> float | None:
    """Bytes read per decoded token at an average KV context; None for an unknown storage type.
    `weight_bytes` (measured from the exported file) replaces the table's weights when given, `kv_bytes`
    (bytes per KV-cache element, as the runtime reports it) the table's KV element size."""
    key = (runtime, precision)
    if key not in WEIGHT_BYTES and weight_bytes is None:
        return None
    wb, hb, kvb = WEIGHT_BYTES.get(key, (None, None, 4))
    kvb = kv_bytes or kvb
    d = t.hidden_size
    per_layer = d * t.num_heads * t.head_dim + 2 * d * t.num_kv_heads * t.head_dim + t.num_heads * t.head_dim * d \
        + 3 * d * t.intermediate_size
    weights = weight_bytes if weight_bytes is not None else t.num_layers * per_layer * wb + d * t.vocab_size * hb
    kv = context * t.num_layers * 2 * t.num_kv_heads * t.head_dim * kvb
    return weights + kv


def fractions(result: dict, cfg, threads: int, runtime: str, precision: str, weight_bytes: float | None = None) -> dict:
    """int8_peak_fraction per prompt length and bandwidth_fraction, from a run's measured rates."""
    t = cfg.text
    out: dict = {"int8_peak_fraction": {}, "vnni_peak_fraction": {}, "bandwidth_fraction": None}
    peak = int8_peak_gmacs(threads) * 1e9
    vnni = int8_peak_gmacs(threads, vnni_gmacs_per_core()) * 1e9
    for n, tok_s in (result.get("prefill_tok_s") or {}).items():
        if tok_s:
            macs = prefill_macs(t, int(n))
            out["int8_peak_fraction"][n] = round(macs / int(n) * tok_s / peak, 6)
            out["vnni_peak_fraction"][n] = round(macs / int(n) * tok_s / vnni, 6)
    dec = result.get("decode_tok_s")
    ctx = result.get("decode_context_avg")
    if dec and ctx is not None:
        b = decode_bytes_per_token(t, runtime, precision, ctx, weight_bytes, result.get("kv_bytes_per_element"))
        if b is not None:
            out["bandwidth_fraction"] = round(b * dec / (READ_BANDWIDTH_GBS * 1e9), 4)
            out["decode_bytes_per_token"] = int(b)
    out["prefill_gmacs_per_token"] = {n: round(prefill_macs(t, int(n)) / int(n) / 1e9, 4) for n in (result.get("prefill_tok_s") or {})}
    return out
