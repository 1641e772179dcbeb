"""onnxruntime adapter: runs a bundle's ONNX graphs (numpy only; no torch import).

Two kinds of bundle:
- the ONNX layout (`edgemm export --target onnx|laptop|...`): vision_encoder, embed_tokens and
  decoder_model_merged with an explicit KV cache; prefill runs the whole prompt through the decoder
  in one call (batched, left padded), decode one token per call.
- the android-npu layout (`--target android-npu`): the prompt goes through the static prefill graphs
  chunk by chunk (W8A8 QDQ "NPU lane" graphs, the float attention and shadow-outlier graphs on the CPU
  lane; see export/npu.py for the chunk contract), then the CPU decode graph continues from the
  static KV cache. Here every graph runs on onnxruntime's CPU provider; on a phone the NPU-lane graphs
  take the QNN execution provider (docs/export-onnx.md).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from edgemm.errors import EdgemmError

from .base import GenerateOptions, Session, bundle_processor


def _ort():
    import onnxruntime as ort

    return ort


def make_session(path: Path, threads: int | None, providers=None):
    ort = _ort()
    so = ort.SessionOptions()
    n = threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if n:
        so.intra_op_num_threads = n
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    # No spin-waiting: on a shared 2-core machine (and with the many small graphs of the android-npu
    # set, each with its own pool) spinning worker threads stall everything else.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), so, providers=providers or ["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph errors
        raise EdgemmError(f"onnxruntime cannot load {path.name}: {str(e).splitlines()[0][:200]}") from None


def _pick(manifest: dict, role: str, precision: str | None = None, required: bool = True):
    cands = [a for a in manifest["artifacts"] if a.get("role") == role and a.get("runtime") == "onnxruntime"]
    if precision:
        cands = [a for a in cands if a.get("precision") == precision] or (cands if role == "embed_tokens" else [])
    if not cands:
        if required:
            what = f"{role} ({precision})" if precision else role
            have = sorted({a["precision"] for a in manifest["artifacts"] if a.get("role") == role})
            raise EdgemmError(f"the bundle has no ONNX {what} graph" + (f" (it has: {', '.join(have)})" if have else ""))
        return None
    return cands[0]


class SamplingRNG:
    """Greedy / temperature / top-k / top-p sampling over numpy logits (torch's sample_next rules)."""

    def __init__(self, opts: GenerateOptions):
        self.opts = opts
        self.rng = np.random.default_rng(opts.seed)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        o = self.opts
        if o.temperature == 0:
            return logits.argmax(-1)
        x = logits.astype(np.float64) / o.temperature
        if o.top_k:
            kth = np.sort(x, -1)[:, -min(o.top_k, x.shape[-1])][:, None]
            x = np.where(x < kth, -np.inf, x)
        if o.top_p < 1.0:
            order = np.argsort(-x, -1, kind="stable")
            sx = np.take_along_axis(x, order, -1)
            p = np.exp(sx - sx[:, :1])
            p /= p.sum(-1, keepdims=True)
            drop = (np.cumsum(p, -1) - p) >= o.top_p
            sx = np.where(drop, -np.inf, sx)
            x = np.full_like(x, -np.inf)
            np.put_along_axis(x, order, sx, -1)
        p = np.exp(x - x.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        return np.array([self.rng.choice(p.shape[-1], p=row) for row in p], dtype=np.int64)


class OnnxSession(Session):
    """ONNX layout: vision_encoder + embed_tokens + decoder_model_merged (explicit KV cache)."""

    runtime = "onnxruntime"

    def __init__(self, bundle: Path, manifest: dict, threads: int | None = None, precision: str | None = None,
                 providers=None):
        super().__init__()
        self.bundle, self.manifest = Path(bundle), manifest
        self.processor = bundle_processor(bundle, manifest)
        self.config = self.processor.config
        dec = _pick(manifest, "decoder", precision)
        self.precision = dec["precision"]
        vis = _pick(manifest, "vision_encoder", None if precision is None else self.precision, required=False) \
            or _pick(manifest, "vision_encoder")
        if precision and self.precision in ("int4",):  # the q4 set pairs the q4 decoder with the int8 vision encoder
            vis = _pick(manifest, "vision_encoder", "int8", required=False) or vis
        emb = _pick(manifest, "embed_tokens")
        self.threads, self.providers = threads, providers
        self.vision = make_session(self.bundle / vis["file"], threads, providers)
        self.embed = make_session(self.bundle / emb["file"], threads, providers)
        self.decoder = make_session(self.bundle / dec["file"], threads, providers)
        tc = self.config.text
        self.n_layers, self.kv_heads, self.head_dim = tc.num_layers, tc.num_kv_heads, tc.head_dim
        self.max_context = int(manifest.get("max_context") or tc.max_position_embeddings)
        self.kv_in = [f"past_key_values.{i}.{kv}" for i in range(self.n_layers) for kv in ("key", "value")]
        self.dec_outputs = [o.name for o in self.decoder.get_outputs()]

    # ------------------------------------------------------------------ pieces
    def encode_images(self, px: np.ndarray) -> np.ndarray:
        return self.vision.run(["image_features"], {"pixel_values": px.astype(np.float32)})[0]

    def embed_ids(self, ids: np.ndarray) -> np.ndarray:
        return self.embed.run(None, {"input_ids": ids.astype(np.int64)})[0]

    def merge(self, ids: np.ndarray, mask: np.ndarray, feats: np.ndarray | None):
        """Embed ids and splice each row's visual tokens in place of its image token; expand the mask."""
        emb = self.embed_ids(ids)
        img = ids == self.config.image_token_id
        if feats is None:
            if img.any():
                raise EdgemmError("the prompt has an <image> token but no image was given")
            return emb, mask
        if not (img.sum(1) == 1).all():
            raise EdgemmError("each prompt must contain exactly one <image> token when an image is given")
        rows, mrows = [], []
        for b in range(ids.shape[0]):
            p = int(img[b].argmax())
            rows.append(np.concatenate([emb[b, :p], feats[b].astype(emb.dtype), emb[b, p + 1:]]))
            mrows.append(np.concatenate([mask[b, :p], np.repeat(mask[b, p:p + 1], feats.shape[1]), mask[b, p + 1:]]))
        return np.stack(rows), np.stack(mrows).astype(np.int64)

    def empty_past(self, b: int) -> dict:
        z = np.zeros((b, self.kv_heads, 0, self.head_dim), np.float32)
        return {n: z for n in self.kv_in}

    def run_decoder(self, embeds, mask, pos, past: dict):
        out = self.decoder.run(None, {"inputs_embeds": embeds.astype(np.float32), "attention_mask": mask,
                                      "position_ids": pos, **past})
        new_past = {}
        for name, arr in zip(self.dec_outputs[1:], out[1:]):
            i, kv = name.split(".")[1:3]
            new_past[f"past_key_values.{i}.{kv}"] = arr
        return out[0], new_past

    def prefill(self, embeds: np.ndarray, mask: np.ndarray):
        """-> (last-token logits [B, V], past dict, positions [B, T])."""
        pos = np.clip(np.cumsum(mask, -1) - 1, 0, None).astype(np.int64)
        logits, past = self.run_decoder(embeds, mask, pos, self.empty_past(embeds.shape[0]))
        return logits[:, -1], past, pos

    # ------------------------------------------------------------------ generation
    def iter_tokens(self, ids: np.ndarray, mask: np.ndarray, px: np.ndarray | None, opts: GenerateOptions,
                    stats: dict) -> Iterator[np.ndarray]:
        """Yield the next token of every row [B] step by step (rows that hit EOS keep yielding EOS)."""
        sample = SamplingRNG(opts)
        eos = self.config.eos_token_id
        t0 = time.perf_counter()
        feats = self.encode_images(px) if px is not None else None
        t1 = time.perf_counter()
        embeds, mask = self.merge(ids, mask, feats)
        if embeds.shape[1] + opts.max_new_tokens > self.max_context:
            raise EdgemmError(f"prompt of {embeds.shape[1]} tokens + {opts.max_new_tokens} new tokens exceeds the context of {self.max_context}")
        self.prefill_info = {}
        last, past, pos = self.prefill(embeds, mask)
        nxt = sample(last)
        t2 = time.perf_counter()
        stats.update(image_encode_ms=(t1 - t0) * 1e3, prefill_ms=(t2 - t1) * 1e3, prefill_tokens=int(embeds.shape[1]),
                     ttft_ms=(t2 - t0) * 1e3, decode_ms=0.0, decode_tokens=0, **self.prefill_info)
        done = nxt == eos
        yield nxt
        last_pos = pos[:, -1:]
        steps = 1
        while steps < opts.max_new_tokens and not done.all():
            t3 = time.perf_counter()
            mask = np.concatenate([mask, np.ones_like(mask[:, :1])], 1)
            last_pos = last_pos + 1
            logits, past = self.decode_step(self.embed_ids(nxt[:, None]), mask, last_pos, past)
            nxt = np.where(done, eos, sample(logits))
            stats["decode_ms"] += (time.perf_counter() - t3) * 1e3
            stats["decode_tokens"] += 1
            done = done | (nxt == eos)
            steps += 1
            yield nxt

    def decode_step(self, emb, mask, pos, past):
        logits, past = self.run_decoder(emb, mask, pos.astype(np.int64), past)
        return logits[:, -1], past

    def _inputs(self, images, prompts):
        with_image = images is not None and all(im is not None for im in images)
        ids, mask = self.processor.batch(prompts, with_image=with_image)
        px = self.processor.images(images) if with_image else None
        return ids, mask, px

    def stream(self, image, prompt: str, options: GenerateOptions) -> Iterator[str]:
        ids, mask, px = self._inputs(None if image is None else [image], [prompt])
        stats: dict = {}
        eos = self.config.eos_token_id
        toks: list[int] = []
        text_so_far = ""
        for step in self.iter_tokens(ids, mask, px, options, stats):
            tok = int(step[0])
            if tok == eos:
                break
            toks.append(tok)
            text = self.processor.decode(toks)
            if len(text) > len(text_so_far) and not text.endswith("\ufffd"):
                yield text[len(text_so_far):] if text_so_far else text
                text_so_far = text
        self.stats = _finish(stats)

    def generate_batch(self, images, prompts, batch_size: int = 32, **options) -> list[str]:
        opts = GenerateOptions(**options).validate()
        eos = self.config.eos_token_id
        out: list[str] = []
        total = {k: 0.0 for k in ("image_encode_ms", "prefill_ms", "decode_ms", "ttft_ms", "prefill_tokens", "decode_tokens")}
        for i in range(0, len(prompts), batch_size):
            ims = None if images is None else images[i:i + batch_size]
            ids, mask, px = self._inputs(ims, prompts[i:i + batch_size])
            stats: dict = {}
            toks = [[] for _ in range(ids.shape[0])]
            fin = [False] * ids.shape[0]
            for step in self.iter_tokens(ids, mask, px, opts, stats):
                for r, t in enumerate(step.tolist()):
                    if fin[r] or t == eos:
                        fin[r] = True
                        continue
                    toks[r].append(t)
            out += [self.processor.decode(t) for t in toks]
            for k in ("image_encode_ms", "prefill_ms", "decode_ms", "ttft_ms"):
                total[k] += stats[k]
            for k, v in stats.items():
                if k.startswith(("npu_", "shadow_")):
                    total[k] = total.get(k, 0) + v
            total["prefill_tokens"] += stats["prefill_tokens"] * ids.shape[0]
            total["decode_tokens"] += stats["decode_tokens"] * ids.shape[0]
        self.stats = _finish(total)
        return out


class NpuSession(OnnxSession):
    """android-npu layout: chunked static prefill (NPU-lane W8A8 graphs + CPU-lane attention and shadow
    graphs), then CPU decode with the dynamic decoder from the static cache. Batch 1, as on a phone.

    `npu_providers` sets the execution providers of the NPU-lane graphs (e.g. QNN on a device);
    here they run on onnxruntime's CPU provider."""

    def __init__(self, bundle: Path, manifest: dict, threads: int | None = None, providers=None, npu_providers=None):
        Session.__init__(self)
        self.bundle, self.manifest = Path(bundle), manifest
        self.processor = bundle_processor(bundle, manifest)
        self.config = self.processor.config
        tc = self.config.text
        self.n_layers, self.kv_heads, self.head_dim = tc.num_layers, tc.num_kv_heads, tc.head_dim
        self.chunk = int(manifest["chunk_size"])
        self.max_context = int(manifest["max_context"])
        self.kv_in = [f"past_key_values.{i}.{kv}" for i in range(self.n_layers) for kv in ("key", "value")]
        arts = [a for a in manifest["artifacts"] if a.get("runtime") == "onnxruntime"]

        def load(a):
            prov = npu_providers if a["lane"] == "npu" and npu_providers else providers
            return make_session(self.bundle / a["file"], threads, prov)

        def one(role):
            a = [x for x in arts if x["role"] == role]
            if not a:
                raise EdgemmError(f"the android-npu bundle has no {role} graph")
            return load(a[0])

        self.vision, self.embed_chunk, self.attention = one("vision_encoder"), one("embed_chunk"), one("prefill_attention")
        self.lm_head, self.embed, self.decoder = one("lm_head"), one("embed_tokens"), one("decoder")
        self.precision = next(a["precision"] for a in arts if a["role"] == "decoder")
        self.dec_outputs = [o.name for o in self.decoder.get_outputs()]
        self.layers = [{} for _ in range(self.n_layers)]
        for a in arts:
            if a["role"] in ("prefill_layer", "shadow"):
                key = a["extra"]["stage"] if a["role"] == "prefill_layer" else "shadow_" + a["extra"]["stage"]
                self.layers[a["extra"]["layer"]][key] = load(a)
        for i, d in enumerate(self.layers):
            missing = {"qkv", "o", "mlp", "shadow_qkv", "shadow_o", "shadow_mlp", "shadow_down"} - set(d)
            if missing:
                raise EdgemmError(f"the android-npu bundle lacks layer {i}'s {sorted(missing)[0]} graph")

    def encode_images(self, px: np.ndarray) -> np.ndarray:
        return np.concatenate([self.vision.run(["image_features"], {"pixel_values": px[i:i + 1].astype(np.float32)})[0]
                               for i in range(px.shape[0])])

    def embed_ids(self, ids: np.ndarray) -> np.ndarray:
        """Text embeddings through the static int32 chunk graph (ids padded to whole chunks)."""
        if ids.shape[0] != 1:
            return super().embed_ids(ids)
        n, c = ids.shape[1], self.chunk
        padded = np.zeros((1, -(-n // c) * c), np.int32)
        padded[0, :n] = ids[0]
        parts = [self.embed_chunk.run(None, {"input_ids": padded[:, s:s + c]})[0] for s in range(0, padded.shape[1], c)]
        return np.concatenate(parts, 1)[:, :n]

    def prefill(self, embeds: np.ndarray, mask: np.ndarray):
        if embeds.shape[0] != 1:
            raise EdgemmError("android-npu prefill runs one prompt at a time")
        if not mask.all():
            raise EdgemmError("android-npu prefill takes an unpadded prompt")
        n_tok, c, m = embeds.shape[1], self.chunk, self.max_context
        if n_tok > m:
            raise EdgemmError(f"prompt of {n_tok} tokens exceeds the static context of {m}")
        shape = (1, self.kv_heads, m, self.head_dim)
        keys = [np.zeros(shape, np.float32) for _ in range(self.n_layers)]
        vals = [np.zeros(shape, np.float32) for _ in range(self.n_layers)]
        n_chunks = -(-n_tok // c)
        xs = np.zeros((1, n_chunks * c, embeds.shape[2]), np.float32)
        xs[:, :n_tok] = embeds
        unhandled = 0.0
        last = None
        for start in range(0, n_tok, c):
            n = min(c, n_tok - start)
            x = xs[:, start:start + c]
            pos = (start + np.arange(c, dtype=np.int32))[None]
            plen = np.array([start], np.int32)
            for i, g in enumerate(self.layers):
                q, k, v = g["qkv"].run(None, {"x": x})
                q, k, v, c1 = g["shadow_qkv"].run(None, {"x": x, "q": q, "k": k, "v": v})
                attn, kn, vn = self.attention.run(None, {"q": q, "k": k, "v": v, "past_key": keys[i], "past_value": vals[i],
                                                         "position_ids": pos, "past_len": plen})
                keys[i][:, :, start:start + n] = kn[:, :, :n]
                vals[i][:, :, start:start + n] = vn[:, :, :n]
                o_sh, c2 = g["shadow_o"].run(None, {"attn": attn})
                (x_mid,) = g["o"].run(None, {"x": x, "attn": attn, "o_shadow": o_sh})
                gs, us, c3 = g["shadow_mlp"].run(None, {"x_mid": x_mid})
                x_out, act = g["mlp"].run(None, {"x_mid": x_mid, "gate_shadow": gs, "up_shadow": us})
                x, c4 = g["shadow_down"].run(None, {"act": act, "x_out": x_out})
                unhandled += float(c1 + c2 + c3 + c4)
            last = x[:, n - 1:n]
        logits = self.lm_head.run(None, {"hidden": last})[0][:, -1]
        past = {}
        for i in range(self.n_layers):
            past[f"past_key_values.{i}.key"] = np.ascontiguousarray(keys[i][:, :, :n_tok])
            past[f"past_key_values.{i}.value"] = np.ascontiguousarray(vals[i][:, :, :n_tok])
        self.prefill_info = {"npu_chunks": n_chunks, "shadow_unhandled": int(unhandled)}
        return logits, past, np.arange(n_tok, dtype=np.int64)[None]

    def generate_batch(self, images, prompts, batch_size: int = 1, **options) -> list[str]:
        return super().generate_batch(images, prompts, batch_size=1, **options)


def _finish(s: dict) -> dict:
    pm, dm = s.get("prefill_ms", 0.0), s.get("decode_ms", 0.0)
    return {
        "image_encode_ms": round(s.get("image_encode_ms", 0.0), 3),
        "prefill_ms": round(pm, 3),
        "prefill_tokens": int(s.get("prefill_tokens", 0)),
        "prefill_tok_s": round(s.get("prefill_tokens", 0) / (pm / 1e3), 1) if pm else 0.0,
        "decode_ms": round(dm, 3),
        "decode_tokens": int(s.get("decode_tokens", 0)),
        "decode_tok_s": round(s.get("decode_tokens", 0) / (dm / 1e3), 1) if dm else 0.0,
        "ttft_ms": round(s.get("ttft_ms", 0.0), 3),
        **{k: v for k, v in s.items() if k.startswith("npu_") or k.startswith("shadow_")},
    }


def open_bundle(path, manifest: dict, threads: int | None = None, precision: str | None = None, **options) -> Session:
    """Open a bundle's ONNX graphs. `precision` picks among several decoder precisions (fp32, int8, int4);
    an android-npu bundle (prefill chunk graphs) opens as a chunked-prefill session."""
    if any(a.get("role") == "prefill_layer" for a in manifest["artifacts"]):
        unknown = set(options) - {"providers", "npu_providers"}
        if unknown:
            raise EdgemmError(f"unknown onnxruntime option {sorted(unknown)[0]!r}")
        return NpuSession(Path(path), manifest, threads=threads, **options)
    unknown = set(options) - {"providers"}
    if unknown:
        raise EdgemmError(f"unknown onnxruntime option {sorted(unknown)[0]!r}")
    return OnnxSession(Path(path), manifest, threads=threads, precision=precision, providers=options.get("providers"))
