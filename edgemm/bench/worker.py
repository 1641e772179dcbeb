"""One benchmark job in its own process (clean peak RSS, its own thread pools).

    python -m edgemm.bench.worker '<job json>'

A job is {"mode": "export" | "run", ...} (see edgemm.bench.core). The result is printed as one line
`EDGEMM_BENCH_RESULT {json}` on stdout (libraries may print other things); errors come back as
{"error": "..."} in that line.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path

from edgemm.errors import EdgemmError

MARKER = "EDGEMM_BENCH_RESULT "
QUESTION = "what color is the shape in the top left corner of the image?"


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)  # ru_maxrss is KiB on Linux


def median(xs):
    return statistics.median(xs) if xs else None


def random_image(size: int, seed: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def random_ids(n: int, vocab: int, seed: int) -> list[int]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [int(x) for x in rng.integers(4, vocab, n)]  # no special tokens (0..3: pad, bos, eos, image)


# --------------------------------------------------------------------------------------- runners


class Runner:
    """What each runtime implements: prefill a list of ids from an empty cache (returns the next token),
    decode step by step, and answer an image+prompt question to its first token."""

    config = None

    def prefill(self, ids: list[int]) -> int:
        raise NotImplementedError

    def decode(self, tok: int, pos: int) -> int:
        raise NotImplementedError

    def ttft(self, image, pruned: bool) -> dict:
        """-> {"image_encode_ms", "ttft_ms", "visual_tokens"} for one image+prompt question."""
        raise NotImplementedError

    def has_pruned(self) -> bool:
        return True


class TorchRunner(Runner):
    def __init__(self, job: dict):
        import torch

        from .presets import build_model, preset_config

        torch.set_num_threads(job["threads"])
        self.torch = torch
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(job["precision"])
        if self.dtype is None:
            raise EdgemmError(f"torch precision {job['precision']!r} is not one of fp32, bf16")
        cfg = preset_config(job["preset"], text_layers=job.get("text_layers"))
        self.loaded = build_model(cfg, seed=job.get("seed", 0), dtype=self.dtype)
        self.model = self.loaded.model
        self.config = cfg
        self.cache = None
        self.vt = job.get("token_compression")

    def _logits_next(self, embeds, start: int):
        from edgemm.models.modeling import KVCache

        torch = self.torch
        if start == 0:
            self.cache = KVCache(self.config.text.num_layers)
        pos = torch.arange(start, start + embeds.shape[1])[None]
        logits = self.model.text(embeds, pos, None, self.cache, logits_to_keep=1)
        return int(logits[0, -1].float().argmax())

    def prefill(self, ids):
        with self.torch.inference_mode():
            emb = self.model.text.embed_tokens(self.torch.tensor([ids]))
            return self._logits_next(emb, 0)

    def decode(self, tok, pos):
        with self.torch.inference_mode():
            return self._logits_next(self.model.text.embed_tokens(self.torch.tensor([[tok]])), pos)

    def ttft(self, image, pruned):
        from edgemm.tokens import set_visual_tokens

        torch = self.torch
        set_visual_tokens(self.model, self.vt if pruned else None)
        proc = self.loaded.processor
        with torch.inference_mode():
            t0 = time.perf_counter()
            px = torch.from_numpy(proc.images([image])).to(self.dtype)
            ids = torch.tensor([proc.encode_prompt(QUESTION, with_image=True)])
            feats = self.model.encode_image(px).embeds
            t1 = time.perf_counter()
            emb = self.model.merge_image(ids, feats)
            self._logits_next(emb, 0)
            t2 = time.perf_counter()
        set_visual_tokens(self.model, None)
        return {"image_encode_ms": (t1 - t0) * 1e3, "ttft_ms": (t2 - t0) * 1e3, "visual_tokens": int(feats.shape[1])}


class OnnxRunner(Runner):
    def __init__(self, job: dict):
        import numpy as np

        from edgemm import runtimes

        self.np = np
        self.sess = runtimes.load(job["bundle"], runtime="onnxruntime", threads=job["threads"], precision=job["precision"])
        self.config = self.sess.config
        self.full_vision = self.sess.vision
        self.pruned_vision = None
        pv = job.get("pruned_artifact")
        if pv:
            from edgemm.runtimes.onnxruntime_runtime import make_session

            self.pruned_vision = make_session(Path(pv), job["threads"])
        self.past = None
        self.mask = None

    def _next(self, logits):
        return int(logits[0].argmax())

    def prefill(self, ids):
        np = self.np
        emb = self.sess.embed_ids(np.array([ids], np.int64))
        self.mask = np.ones((1, len(ids)), np.int64)
        logits, self.past, _ = self.sess.prefill(emb, self.mask)
        return self._next(logits)

    def decode(self, tok, pos):
        np = self.np
        self.mask = np.ones((1, pos + 1), np.int64)
        logits, self.past = self.sess.decode_step(self.sess.embed_ids(np.array([[tok]], np.int64)), self.mask,
                                                  np.array([[pos]], np.int64), self.past)
        return self._next(logits)

    def has_pruned(self):
        return self.pruned_vision is not None

    def ttft(self, image, pruned):
        self.sess.vision = self.pruned_vision if pruned else self.full_vision
        self.sess.generate(image, QUESTION, max_new_tokens=1)
        s = self.sess.stats
        n_text = len(self.sess.processor.encode_prompt(QUESTION)) - 1
        return {"image_encode_ms": s["image_encode_ms"], "ttft_ms": s["ttft_ms"], "visual_tokens": s["prefill_tokens"] - n_text}


class ExecuTorchRunner(Runner):
    def __init__(self, job: dict):
        from edgemm import runtimes

        self.sess = runtimes.load(job["bundle"], runtime="executorch", threads=job["threads"])
        self.config = self.sess.config
        self.full = (self.sess.methods["vision_encoder"], self.sess.num_visual_tokens)
        self.pruned = None
        pv = job.get("pruned_artifact")
        if pv:
            from edgemm.runtimes.executorch_runtime import _runtime

            prog = _runtime().load_program(Path(pv))
            self.pruned = (prog.load_method("vision_encoder"), int(job["pruned_tokens"]))
            self._prog = prog

    def prefill(self, ids):
        return int(self.sess.decode(self.sess.embed(ids), 0)[0].argmax())

    def decode(self, tok, pos):
        return int(self.sess.decode(self.sess.embed([tok]), pos)[0].argmax())

    def has_pruned(self):
        return self.pruned is not None

    def ttft(self, image, pruned):
        method, k = self.pruned if pruned else self.full
        self.sess.methods["vision_encoder"], self.sess.num_visual_tokens = method, k
        self.sess.generate(image, QUESTION, max_new_tokens=1)
        s = self.sess.stats
        return {"image_encode_ms": s["image_encode_ms"], "ttft_ms": s["ttft_ms"], "visual_tokens": k}


class LlamaCppRunner(Runner):
    # llama.cpp's mtmd exposes no [CLS] attention, so fastervlm cannot run there; the pruned TTFT keeps
    # the same number of tokens with the adapter's `random` selection (its cost is nil, as fastervlm's is
    # once the ViT has run).
    PRUNED_METHOD = "random"

    def __init__(self, job: dict):
        from edgemm import runtimes

        self.sess = runtimes.load(job["bundle"], runtime="llamacpp", threads=job["threads"], precision=job["precision"])
        self.config = self.sess.config
        self.vt = job.get("token_compression")
        self.llama = self.sess.llama

    def _logits_argmax(self):
        import numpy as np

        ptr = self.llama.llama_get_logits_ith(self.sess.ctx, -1)
        return int(np.ctypeslib.as_array(ptr, shape=(self.sess.n_vocab,)).argmax())

    def prefill(self, ids):
        ll = self.llama
        ll.llama_memory_clear(ll.llama_get_memory(self.sess.ctx), True)
        self.sess._decode_tokens(ids, 0, True)
        return self._logits_argmax()

    def decode(self, tok, pos):
        self.sess._decode_tokens([tok], pos, True)
        return self._logits_argmax()

    def ttft(self, image, pruned):
        from edgemm.tokens import parse

        setting = None
        if pruned and self.vt:
            s = parse(self.vt)
            setting = parse(f"{self.PRUNED_METHOD}:{s.keep}").validate_for(self.config)
        self.sess.token_setting = setting
        self.sess.generate(image, QUESTION, max_new_tokens=1)
        s = self.sess.stats
        k = setting.visual_tokens(self.config) if setting else self.config.num_visual_tokens
        return {"image_encode_ms": s["image_encode_ms"], "ttft_ms": s["ttft_ms"], "visual_tokens": k}


class NativeRunner(Runner):
    """edgemm's own engine through edgemm.runtimes (native_runtime) and its stepping API (_native.Session.eval)."""

    def __init__(self, job: dict):
        from edgemm import runtimes

        self.full = runtimes.load(job["bundle"], runtime="native", threads=job["threads"])
        self.sess = self.full
        self.config = self.full.config
        self.pruned = None
        if job.get("pruned_artifact"):
            self.pruned = runtimes.load(job["pruned_artifact"], runtime="native", threads=job["threads"])

    def _argmax(self, logits) -> int:
        return int(logits.argmax())

    def prefill(self, ids):
        s = self.full.session
        s.reset()
        return self._argmax(s.eval(ids))

    def decode(self, tok, pos):
        return self._argmax(self.full.session.eval([tok]))

    def has_pruned(self):
        return self.pruned is not None

    def decode_weight_bytes(self) -> int:
        """The engine's count of the packed weights one decode step reads (2:4 layers at their packed size)."""
        return int(self.full.model.info()["decode_weight_bytes"])

    def kv_bytes_per_element(self) -> int:
        """2 with the engine's fp16 KV cache, 4 with fp32 (`info()["kv_cache"]`)."""
        return 2 if self.full.model.info().get("kv_cache") == "fp16" else 4

    def ttft(self, image, pruned):
        sess = self.pruned if pruned else self.full
        sess.generate(image, QUESTION, max_new_tokens=1)
        s = sess.stats
        k = s.get("visual_tokens") or (sess.manifest.get("num_visual_tokens") or self.config.num_visual_tokens)
        return {"image_encode_ms": s["image_encode_ms"], "ttft_ms": s["ttft_ms"], "visual_tokens": int(k),
                "prompt_tokens": int(s["prefill_tokens"])}


RUNNERS = {"torch": TorchRunner, "onnxruntime": OnnxRunner, "executorch": ExecuTorchRunner, "llamacpp": LlamaCppRunner,
           "native": NativeRunner}

# ------------------------------------------------------------------------------------ measuring


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(job: dict) -> dict:
    t0 = time.perf_counter()
    c0 = cpu_seconds()
    runner = RUNNERS[job["runtime"]](job)
    load_s = time.perf_counter() - t0
    cfg = runner.config
    vocab = cfg.text.vocab_size
    reps = int(job["repeats"])
    seed = int(job.get("seed", 0))
    res: dict = {"load_s": round(load_s, 3), "repeats": reps}
    # warm-up: a short prefill, a few decode steps, one image question (first-call allocations, graph setup)
    tok = runner.prefill(random_ids(16, vocab, seed))
    for i in range(3):
        tok = runner.decode(tok, 16 + i)
    if job.get("ttft", True):
        runner.ttft(random_image(cfg.vision.image_size, seed), False)

    prefill = {}
    for n in job["prompt_tokens"]:
        times = []
        for r in range(reps):
            ids = random_ids(n, vocab, seed + 1000 * n + r)
            t = time.perf_counter()
            runner.prefill(ids)
            times.append(time.perf_counter() - t)
        prefill[str(n)] = {"median_s": median(times), "runs_s": [round(x, 4) for x in times]}
    res["prefill_tok_s"] = {n: round(int(n) / v["median_s"], 2) for n, v in prefill.items()}
    res["prefill_s"] = prefill

    ctx, steps = int(job["decode_context"]), int(job["decode_tokens"])
    rates = []
    for r in range(reps):
        tok = runner.prefill(random_ids(ctx, vocab, seed + 7 + r))
        t = time.perf_counter()
        for i in range(steps):
            tok = runner.decode(tok, ctx + i)
        rates.append(steps / (time.perf_counter() - t))
    res["decode_tok_s"] = round(median(rates), 2)
    res["decode_runs_tok_s"] = [round(x, 2) for x in rates]
    res["decode_context_avg"] = ctx + (steps - 1) / 2

    if job.get("ttft", True):
        img = random_image(cfg.vision.image_size, seed + 1)
        tt = {}
        for key, pruned in (("full", False), ("pruned", True)):
            if pruned and (not job.get("token_compression") or not runner.has_pruned()):
                continue
            runs = [runner.ttft(img, pruned) for _ in range(reps)]
            tt[key] = {"ttft_ms": round(median([x["ttft_ms"] for x in runs]), 2),
                       "image_encode_ms": round(median([x["image_encode_ms"] for x in runs]), 2),
                       "visual_tokens": runs[0]["visual_tokens"],
                       "runs_ttft_ms": [round(x["ttft_ms"], 2) for x in runs]}
            if runs[0].get("prompt_tokens"):
                tt[key]["prompt_tokens"] = runs[0]["prompt_tokens"]
        res["ttft"] = tt
        res["image_encode_ms"] = tt["full"]["image_encode_ms"]
        res["ttft_ms"] = {k: v["ttft_ms"] for k, v in tt.items()}
    if hasattr(runner, "decode_weight_bytes"):
        res["decode_weight_bytes"] = runner.decode_weight_bytes()
    if hasattr(runner, "kv_bytes_per_element"):
        res["kv_bytes_per_element"] = runner.kv_bytes_per_element()
    res["peak_rss_mb"] = peak_rss_mb()
    # how much of its threads' time the process actually got: near 1 on a quiet machine; far below 1 means
    # the machine was shared and every rate above is proportionally low
    wall = time.perf_counter() - t0
    res["cpu_utilization"] = round((cpu_seconds() - c0) / (wall * int(job["threads"])), 3) if wall > 0 else None
    return res


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        job = json.loads(argv[0])
        if job["mode"] == "export":
            from .exporting import export_job

            res = export_job(job)
        else:
            res = measure(job)
    except EdgemmError as e:
        res = {"error": str(e)}
    except Exception as e:  # reported to the parent as one line; the traceback goes to stderr
        traceback.print_exc(file=sys.stderr)
        res = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    sys.stdout.write("\n" + MARKER + json.dumps(res) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
