"""The native engine through its Python binding (edgemm._native) and runtime adapter
(runtimes/native_runtime.py), checked against the torch reference: tokenizer parity, per-layer and
logits tolerances, equal greedy answers, streaming, sampling, stats, error paths, no torch import.

The engine library must be available (pip install -e . builds it; otherwise the `native_lib` fixture
builds native/ with cmake): without it these tests FAIL, they do not skip.
"""

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import random_model
from edgemm import _native, runtimes
from edgemm.data import AGREEMENT, load_dataset
from edgemm.errors import EdgemmError
from edgemm.export import export
from edgemm.export import native as nx
from edgemm.models.checkpoint import LoadedModel
from edgemm.models.config import TextConfig, VisionConfig, VLMConfig
from edgemm.processor import Processor, preprocess_image

REPO = Path(__file__).resolve().parent.parent
THREADS = 2


def ensure_library() -> Path:
    """The engine library: the installed / built one, else a cmake build of native/ (cached in build/)."""
    try:
        return _native.find_library()
    except EdgemmError:
        pass
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.fail("the native engine library is not built and cmake is missing")
    bdir = REPO / "build" / "native-pytest"
    cfg = [cmake, "-S", str(REPO / "native"), "-B", str(bdir), "-DCMAKE_BUILD_TYPE=Release",
           "-DEDGEMM_BUILD_TESTS=OFF", "-DEDGEMM_BUILD_BENCH=OFF"]
    for cmd in (cfg, [cmake, "--build", str(bdir), "--target", "edgemm_shared", "-j", "2"]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        if r.returncode:
            pytest.fail(f"building the native engine failed: {' '.join(cmd[:3])}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    libs = [p for p in bdir.rglob("libedgemm.*") if p.suffix in (".so", ".dylib")]
    if not libs:
        pytest.fail(f"the cmake build produced no libedgemm in {bdir}")
    os.environ["EDGEMM_NATIVE_LIB"] = str(libs[0])
    return libs[0]


@pytest.fixture(scope="session")
def native_lib():
    p = ensure_library()
    _native.library()
    return p


def cfg32(tok, **over):
    vision = VisionConfig(image_size=32, patch_size=8, hidden_size=64, num_layers=3, num_heads=4, intermediate_size=128)
    text = TextConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=16, intermediate_size=128, max_position_embeddings=160)
    cfg = VLMConfig(vision=vision, text=text)
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg.validate()


@pytest.fixture(scope="module")
def tiny(demo_tokenizer):
    m = random_model(cfg32(demo_tokenizer), seed=11)
    return LoadedModel(m, Processor(demo_tokenizer, m.config), "tiny32")


@pytest.fixture(scope="module")
def bundles(tiny, tmp_path_factory, native_lib):
    root = tmp_path_factory.mktemp("native-rt")
    out = {}
    for p in nx.PRESETS:
        export(tiny, "native", root / p, precision=p, calib_n=16)
        out[p] = root / p
    return out


@pytest.fixture(scope="module")
def questions():
    ds = load_dataset(AGREEMENT, 12)
    ims = [np.asarray(ds.image(r).resize((32, 32))) for r in ds.records]
    return ims, [r.question for r in ds.records]


def open_native(bundle, **kw):
    return runtimes.load(bundle, runtime="native", threads=THREADS, **kw)


def torch_inputs(lm, image, question):
    ids = torch.tensor([lm.processor.encode_prompt(question)])
    px = torch.from_numpy(preprocess_image(image, lm.config.vision))[None]
    return ids, px


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6))


# --------------------------------------------------------------------------------------------- basics


def test_library_version_and_model_info(bundles):
    assert _native.version()
    m = _native.Model(bundles["w8a8-int4"] / nx.FILE, n_threads=THREADS)
    info = m.info()
    assert info["vocab_size"] > 0 and info["chunk_size"] == 256 and info["num_layers"] == 2
    assert "w8a8" in info["prefill_weights"] and "int4" in info["decode_weights"]
    m.close()
    with pytest.raises(EdgemmError, match="closed"):
        m.info() if m._info is None else m.tokenize("x")


def test_tokenizer_matches_the_processor(bundles, tiny):
    m = _native.Model(bundles["fp32"], n_threads=1)  # a bundle directory loads too
    tok = tiny.processor.tokenizer
    ds = load_dataset("shapes:60:5")
    qs = [r.question for r in ds.records] + ["What's  the  colour?", "naïve café ✓ 😀", "a\tb\nc", "x" * 300, "  lead"]
    for q in qs:
        assert m.encode_prompt(q) == tiny.processor.encode_prompt(q), q
        assert m.encode_prompt(q, with_image=False) == tiny.processor.encode_prompt(q, with_image=False), q
        ids = tok.encode(q, add_special_tokens=False).ids
        assert m.tokenize(q) == ids, q
        assert m.detokenize(ids) == tok.decode(ids, skip_special_tokens=True), q
    assert m.tokenize("<image> red") == tok.encode("<image> red", add_special_tokens=False).ids
    assert m.detokenize([1, 2]) == ""


# ------------------------------------------------------------------------------------- fp32 exactness


def test_fp32_per_layer_tensors_and_logits_match_torch(bundles, tiny, questions):
    """Debug capture of every ViT block, the projected tokens, every decoder layer and the logits."""
    ims, qs = questions
    model = tiny.model
    m = _native.Model(bundles["fp32"] / nx.FILE, n_threads=THREADS)
    s = _native.Session(m)
    s.set_debug(1)
    for im, q in zip(ims[:3], qs[:3]):
        ids, px = torch_inputs(tiny, im, q)
        s.reset()
        s.set_image_pixels(px[0].numpy())
        s.eval(ids[0].numpy())
        outs = {}
        hooks = [layer.register_forward_hook(lambda mod, i, o, k=k: outs.__setitem__(k, o))
                 for k, layer in [(f"text.layer.{j}", l) for j, l in enumerate(model.text.layers)]]
        with torch.no_grad():
            hs, _ = model.vision(px, model.config.feature_layer_index)
            logits = model(ids, px)[0]
            emb = model.encode_image(px).embeds[0]
        for h in hooks:
            h.remove()
        with torch.no_grad():
            x = model.vision.embed(px)
            for i in range(model.config.feature_layer_index):
                x = model.vision.layers[i](x)[0]
                assert rel_err(s.get_tensor(f"vision.layer.{i}"), x[0]) < 1e-4, i
        assert rel_err(s.get_tensor("vision.features"), hs[0, 1:]) < 1e-4
        assert rel_err(s.get_tensor("image.embeds"), emb) < 1e-4
        for k, v in outs.items():
            assert rel_err(s.get_tensor(k), v[0]) < 1e-4, k
        got = s.get_tensor("logits")
        assert got.shape == tuple(logits.shape)
        assert rel_err(got, logits) < 1e-4
        assert rel_err(s.eval([5], logits=True), _next_logits(model, ids, px, [5])) < 1e-4  # one decode step
        assert s.n_past() == logits.shape[0] + 1


def _next_logits(model, ids, px, extra):
    with torch.no_grad():
        full = torch.cat([ids, torch.tensor([extra])], 1)
        return model(full, px)[0, -1]


def test_fp32_greedy_answers_equal_torch(bundles, tiny, questions):
    ims, qs = questions
    want = runtimes.load(tiny).generate_batch(ims, qs, max_new_tokens=8)
    sess = open_native(bundles["fp32"])
    assert sess.generate_batch(ims, qs, max_new_tokens=8) == want
    assert sess.generate(ims[0], qs[0], max_new_tokens=8) == want[0]
    # the engine's own preprocessing of raw RGB bytes (same size: no resize) gives the same answers
    eng = open_native(bundles["fp32"], preprocess="engine")
    assert eng.generate_batch(ims, qs, max_new_tokens=8) == want
    assert open_native(bundles["fp32"]).generate(None, qs[0], max_new_tokens=6) == \
        runtimes.load(tiny).generate(None, qs[0], max_new_tokens=6)


def test_engine_resize_is_close_to_pil(bundles, tiny, questions):
    """Other image sizes: the engine's pad + bicubic resize vs edgemm.processor (PIL)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    im = (rng.random((45, 70, 3)) * 255).astype(np.uint8)
    m = _native.Model(bundles["fp32"] / nx.FILE, n_threads=THREADS)
    a, b = _native.Session(m), _native.Session(m)
    for s in (a, b):
        s.set_debug(1)
    a.set_image_rgb8(im)
    b.set_image_pixels(preprocess_image(Image.fromarray(im), tiny.config.vision))
    ids = tiny.processor.encode_prompt("what color is the shape?")
    a.eval(ids)
    b.eval(ids)
    assert rel_err(a.get_tensor("image.embeds"), b.get_tensor("image.embeds")) < 0.02


# -------------------------------------------------------------------------------- quantized precisions


@pytest.mark.parametrize("preset", ["int8", "w8a8-int4"])
def test_quantized_prefill_and_decode_logits_match_the_reference(bundles, questions, preset):
    """W8A8 prefill (main set) and int8/int4 decode (decode set) vs the torch model with the same tensors.
    fp32 attention and KV cache on both sides: these are the linear layers' contracts. (With the default
    fp16 KV cache the reference rounds keys and values too, but a last-bit difference before the rounding
    flips an fp16 value, and that can flip static W8A8 codes downstream: the greedy-answer tests cover
    the default.)"""
    ims, qs = questions
    ref = nx.reference_model(bundles[preset], kv_fp16=False)
    m = _native.Model(bundles[preset] / nx.FILE, n_threads=THREADS, attention="fp32")
    s = _native.Session(m)
    s.set_debug(1)
    worst_p = worst_d = 0.0
    for im, q in zip(ims[:4], qs[:4]):
        ids, px = torch_inputs(ref, im, q)
        s.reset()
        s.set_image_pixels(px[0].numpy())
        s.eval(ids[0].numpy())
        with torch.no_grad():
            want = ref.model(ids, px)[0]
        worst_p = max(worst_p, rel_err(s.get_tensor("logits"), want))
        # decode: the torch reference runs one-token steps through the decode set too
        with torch.no_grad():
            from edgemm.models.generation import SamplingConfig, iter_generate

            steps = [int(t[0]) for _, t in zip(range(3), iter_generate(ref.model, ids, px, None, SamplingConfig()))]
        got_first = None
        for j, t in enumerate(steps[:-1]):
            lg = s.eval([t])
            got_first = lg if got_first is None else got_first
            worst_d = max(worst_d, rel_err(lg, _step_logits(ref.model, ids, px, steps[: j + 1])))
    assert worst_p < 0.02, worst_p
    assert worst_d < 0.02, worst_d


def _step_logits(model, ids, px, toks):
    """Logits after prefilling ids then feeding toks one at a time (the decode set on single tokens)."""
    from edgemm.models.modeling import KVCache  # noqa: F401

    with torch.no_grad():
        feats = model.encode_image(px).embeds
        x = model.merge_image(ids, feats)
        cache = KVCache(model.config.text.num_layers)
        t = x.shape[1]
        logits = model.text(x, torch.arange(t)[None], None, cache)
        for i, tok in enumerate(toks):
            e = model.text.embed_tokens(torch.tensor([[tok]]))
            logits = model.text(e, torch.tensor([[t + i]]), None, cache)
        return logits[0, -1]


@pytest.mark.parametrize("preset", ["int8", "w8a8-int4"])
def test_quantized_greedy_answers_equal_the_reference(bundles, questions, preset):
    ims, qs = questions
    want = runtimes.load(nx.reference_model(bundles[preset])).generate_batch(ims, qs, max_new_tokens=8)
    got = open_native(bundles[preset]).generate_batch(ims, qs, max_new_tokens=8)
    same = sum(a == b for a, b in zip(got, want))
    assert same >= len(qs) - 1, list(zip(got, want))  # random weights: near-ties may flip one answer


# ---------------------------------------------------------------------------- streaming, sampling, stats


def test_streaming_sampling_and_stats(bundles, tiny, questions):
    ims, qs = questions
    sess = open_native(bundles["w8a8-int4"], npu_lane=True)
    full = sess.generate(ims[1], qs[1], max_new_tokens=10)
    pieces = list(sess.generate(ims[1], qs[1], stream=True, max_new_tokens=10))
    assert "".join(pieces).strip() == full
    st = sess.stats
    for k in ("image_encode_ms", "prefill_ms", "prefill_tokens", "prefill_tok_s", "decode_ms", "decode_tokens",
              "decode_tok_s", "ttft_ms", "npu_lane_busy", "cpu_lane_busy", "visual_tokens"):
        assert k in st, k
    assert st["visual_tokens"] == tiny.config.num_visual_tokens
    assert st["prefill_tokens"] == len(tiny.processor.encode_prompt(qs[1])) - 1 + st["visual_tokens"]
    assert 0 < st["npu_lane_busy"] <= 1 and 0 < st["cpu_lane_busy"] <= 1
    assert st["ttft_ms"] >= st["prefill_ms"] > 0
    greedy = sess.generate(ims[0], qs[0], max_new_tokens=6)
    assert sess.generate(ims[0], qs[0], max_new_tokens=6, temperature=0.8, top_k=1, seed=3) == greedy
    a = sess.generate(ims[0], qs[0], max_new_tokens=6, temperature=1.5, top_p=0.9, seed=7)
    assert a == sess.generate(ims[0], qs[0], max_new_tokens=6, temperature=1.5, top_p=0.9, seed=7)
    # the callback can stop generation after the first token
    s = _native.Session(_native.Model(bundles["fp32"] / nx.FILE, n_threads=THREADS))
    s.set_image_pixels(preprocess_image(ims[0], tiny.config.vision))
    toks, _ = s.generate(qs[0], max_new_tokens=10, on_token=lambda piece, tok: True)
    assert len(toks) == 1
    with pytest.raises(ZeroDivisionError):  # a Python error in the callback comes back, not a crash
        s.generate(qs[0], max_new_tokens=10, on_token=lambda piece, tok: 1 / 0)
    lane_off = open_native(bundles["w8a8-int4"])  # the default: one lane, in order
    assert lane_off.generate(ims[0], qs[0], max_new_tokens=6) == greedy
    assert lane_off.stats["npu_lane_busy"] == 0


# --------------------------------------------------------------------------------------------- errors


def test_errors_are_edgemm_errors_not_crashes(bundles, tmp_path, questions):
    ims, qs = questions
    with pytest.raises(EdgemmError, match="not found"):
        _native.Model(tmp_path / "missing.gguf")
    data = (bundles["fp32"] / nx.FILE).read_bytes()
    for cut in (8, 200, len(data) // 2, len(data) - 1):
        p = tmp_path / f"trunc{cut}.gguf"
        p.write_bytes(data[:cut])
        with pytest.raises(_native.NativeError) as e:
            _native.Model(p)
        assert e.value.status_name in ("EDGEMM_ERR_FORMAT", "EDGEMM_ERR_IO") and len(str(e.value).splitlines()) == 1
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model file at all" * 10)
    with pytest.raises(_native.NativeError, match="native engine"):
        _native.Model(junk)
    sess = open_native(bundles["fp32"], max_context=40)
    with pytest.raises(_native.NativeError) as e:
        sess.generate(ims[0], qs[0], max_new_tokens=30)
    assert e.value.status_name == "EDGEMM_ERR_CONTEXT_FULL"
    ok = open_native(bundles["fp32"])
    with pytest.raises(EdgemmError, match="empty"):
        ok.generate(ims[0], "  ")
    with pytest.raises(EdgemmError, match="<image>"):
        ok.generate(ims[0], "look <image> here")
    with pytest.raises(EdgemmError, match="unknown native option"):
        open_native(bundles["fp32"], bogus=1)
    s = _native.Session(_native.Model(bundles["fp32"] / nx.FILE))
    with pytest.raises(_native.NativeError):
        s.set_image_pixels(np.zeros((3, 16, 16), np.float32))  # wrong size
    with pytest.raises(EdgemmError, match="no artifact for runtime"):
        runtimes.load(bundles["fp32"], runtime="onnxruntime")


def test_missing_library_is_a_clear_error(tmp_path):
    code = ("import os, sys; os.environ['EDGEMM_NATIVE_LIB'] = sys.argv[1]\n"
            "from edgemm import _native\n"
            "from edgemm.errors import EdgemmError\n"
            "try:\n    _native.library()\nexcept EdgemmError as e:\n    print('ERR', e)\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "nolib.so")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "ERR EDGEMM_NATIVE_LIB points to" in r.stdout, r.stdout + r.stderr


def test_running_a_bundle_needs_no_torch(bundles):
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'torch' or name.startswith('torch.'):\n"
            "            raise ImportError('torch is blocked in this test')\n"
            "sys.meta_path.insert(0, Block())\n"
            "import numpy as np\n"
            "from edgemm import runtimes\n"
            "s = runtimes.load(sys.argv[1], runtime='native', threads=2)\n"
            "im = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype('uint8')\n"
            "print(repr(s.generate(im, 'what color is the shape?', max_new_tokens=3)))\n"
            "print(s.stats['prefill_tokens'])\n"
            "assert 'torch' not in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code, str(bundles["w8a8-int4"])], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_cli_run_and_eval_with_the_native_runtime(bundles, tmp_path, questions):
    from PIL import Image

    ims, qs = questions
    Image.fromarray(ims[0]).save(tmp_path / "im.png")
    r = subprocess.run([sys.executable, "-m", "edgemm", "run", str(bundles["w8a8-int4"]), "--runtime", "native",
                        "--image", str(tmp_path / "im.png"), "--prompt", qs[0], "--max-new-tokens", "4", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["runtime"] == "native" and "npu_lane_busy" in out["timings"]
    pred = tmp_path / "pred.jsonl"
    r = subprocess.run([sys.executable, "-m", "edgemm", "eval", str(bundles["fp32"]), "--runtime", "native",
                        "--data", "shapes:6:1", "--predictions", str(pred), "--json"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["n"] == 6 and len(pred.read_text().splitlines()) == 6


# ---------------------------------------------------------------------------------- visual tokens


@pytest.mark.parametrize("spec", ["fastervlm:0.25", "fastervlm:0.25:layer=0,early=true", "pool:4", "divprune:5"])
def test_visual_token_compression_matches_torch(tiny, tmp_path, native_lib, questions, spec):
    from edgemm.tokens import set_visual_tokens

    ims, qs = questions
    lm = LoadedModel(copy.deepcopy(tiny.model), tiny.processor, "tiny-vt")
    set_visual_tokens(lm, spec)
    export(lm, "native", tmp_path / "b", precision="fp32")
    m = _native.Model(tmp_path / "b" / nx.FILE, n_threads=THREADS)
    s = _native.Session(m)
    s.set_debug(1)
    for im, q in zip(ims[:3], qs[:3]):
        ids, px = torch_inputs(lm, im, q)
        s.reset()
        s.set_image_pixels(px[0].numpy())
        s.eval(ids[0].numpy())
        with torch.no_grad():
            f = lm.model.encode_image(px)
            logits = lm.model(ids, px)[0]
        assert np.array_equal(s.get_tensor("image.token_index").astype(np.int64), f.token_index[0].numpy())
        assert rel_err(s.get_tensor("image.embeds"), f.embeds[0]) < 1e-4
        assert rel_err(s.get_tensor("logits"), logits) < 1e-4


# ------------------------------------------------------------------------------------ the demo model


@pytest.fixture(scope="module")
def demo_bundles(tmp_path_factory, native_lib):
    from edgemm.models import load_model

    lm = load_model("demo")
    root = tmp_path_factory.mktemp("native-demo")
    export(lm, "native", root / "fp32", precision="fp32")
    export(lm, "native", root / "w8a8-int4", precision="w8a8-int4", calib_n=32)
    return lm, root


def test_demo_greedy_answers_equal_torch_at_fp32_and_matching_precision(demo_bundles):
    lm, root = demo_bundles
    ds = load_dataset(AGREEMENT, 24)
    ims, qs = [ds.image(r) for r in ds.records], [r.question for r in ds.records]
    want = runtimes.load(lm).generate_batch(ims, qs, max_new_tokens=8)
    assert open_native(root / "fp32").generate_batch(ims, qs, max_new_tokens=8) == want
    ref = runtimes.load(nx.reference_model(root / "w8a8-int4")).generate_batch(ims, qs, max_new_tokens=8)
    assert open_native(root / "w8a8-int4").generate_batch(ims, qs, max_new_tokens=8) == ref


# ------------------------------------------------------------------- other weight layouts in the engine


def _logit_errs(bundle, ref, ims, qs, n=4, steps=2):
    """Relative logit errors, engine vs torch reference: the prefill and `steps` decode steps per question."""
    from edgemm.models.generation import SamplingConfig, iter_generate

    s = _native.Session(_native.Model(bundle / nx.FILE, n_threads=THREADS))
    s.set_debug(1)
    errs = []
    for im, q in zip(ims[:n], qs[:n]):
        ids, px = torch_inputs(ref, im, q)
        s.reset()
        s.set_image_pixels(px[0].numpy())
        s.eval(ids[0].numpy())
        with torch.no_grad():
            errs.append(rel_err(s.get_tensor("logits"), ref.model(ids, px)[0]))
            toks = [int(t[0]) for _, t in zip(range(steps + 1), iter_generate(ref.model, ids, px, None, SamplingConfig()))]
        for j in range(steps):
            errs.append(rel_err(s.eval([toks[j]]), _step_logits(ref.model, ids, px, toks[: j + 1])))
    return sorted(errs)


def _check_errs(errs, exact=1e-4, worst=0.05):
    """Most cases equal to float rounding (the same integer math); a rare activation code that rounds the
    other way (a value within float rounding of a .5 step) moves the logits by a few percent at most."""
    assert errs[len(errs) // 2] < exact and errs[-1] < worst, errs


def test_sparse_24_decode_set_runs_sparse_and_matches(tiny, tmp_path, native_lib, questions):
    from edgemm.compress import apply
    from edgemm.compress.config import MagnitudeConfig

    ims, qs = questions
    m = copy.deepcopy(tiny.model)
    apply(m, MagnitudeConfig(pattern="2:4", include=["text.layers.*"]))
    export(LoadedModel(m, tiny.processor, "s24"), "native", tmp_path / "b", precision="w8a8-int4", calib_n=8)
    info = _native.Model(tmp_path / "b", n_threads=1).info()
    assert "2:4" in info["decode_weights"] and "int4" in info["decode_weights"], info["decode_weights"]
    ref = nx.reference_model(tmp_path / "b")
    _check_errs(_logit_errs(tmp_path / "b", ref, ims, qs), exact=5e-3)
    got = open_native(tmp_path / "b").generate_batch(ims, qs, max_new_tokens=6)
    want = runtimes.load(ref).generate_batch(ims, qs, max_new_tokens=6)
    assert sum(a == b for a, b in zip(got, want)) >= len(qs) - 1


@pytest.mark.parametrize("preset", ["w8a8-int4", "int8"])
def test_tied_lm_head_decode_set_matches_the_reference(demo_tokenizer, tmp_path, native_lib, questions, preset):
    """Tied embeddings: the main set has no lm_head tensor, the decode set its own quantized head, which the
    engine runs on every step; the engine agrees with the reference."""
    ims, qs = questions
    cfg = cfg32(demo_tokenizer)
    cfg.text.tie_word_embeddings = True
    m = random_model(cfg.validate(), seed=4)
    lm = LoadedModel(m, Processor(demo_tokenizer, m.config), "tied")
    export(lm, "native", tmp_path / "b", precision=preset, calib_n=8)
    dq = json.loads(nx.read_kv(__import__("gguf").GGUFReader(str(tmp_path / "b" / nx.FILE)))["decode_quantization"])["layers"]
    assert dq["text.lm_head"]["format"] == ("int4" if preset == "w8a8-int4" else "int8")
    ref = nx.reference_model(tmp_path / "b")
    _check_errs(_logit_errs(tmp_path / "b", ref, ims, qs), exact=5e-3)
    got = open_native(tmp_path / "b").generate_batch(ims, qs, max_new_tokens=6)
    want = runtimes.load(ref).generate_batch(ims, qs, max_new_tokens=6)
    assert sum(a == b for a, b in zip(got, want)) >= len(qs) - 1


def test_w8a8_vision_encoder(tiny, tmp_path, native_lib, questions):
    ims, qs = questions
    export(tiny, "native", tmp_path / "b", precision="int8", vision="w8a8", calib_n=8)
    info = _native.Model(tmp_path / "b", n_threads=1).info()
    assert "w8a8" in info["vision_weights"], info["vision_weights"]
    _check_errs(_logit_errs(tmp_path / "b", nx.reference_model(tmp_path / "b"), ims, qs), exact=5e-3)


@pytest.mark.parametrize("bits, asym", [(4, False), (4, True), (8, False)])
def test_weight_only_checkpoint_is_run_as_stored(tiny, tmp_path, native_lib, questions, bits, asym):
    """A compressed (RTN) checkpoint: every linear, the ViT's too, runs from its packed tensors as they are."""
    from edgemm.compress import apply
    from edgemm.compress.config import RTNConfig

    ims, qs = questions
    m = copy.deepcopy(tiny.model)
    apply(m, RTNConfig(bits=bits, group_size=32, symmetric=not asym))
    export(LoadedModel(m, tiny.processor, "rtn"), "native", tmp_path / "b")
    info = _native.Model(tmp_path / "b", n_threads=1).info()
    assert f"int{bits}" in info["prefill_weights"] and f"int{bits}" in info["vision_weights"], info
    ref = nx.reference_model(tmp_path / "b")
    errs = _logit_errs(tmp_path / "b", ref, ims, qs)
    _check_errs(errs)
    # without the activation-quantization emulation the reference is measurably further away
    loose = _logit_errs(tmp_path / "b", nx.reference_model(tmp_path / "b", act_quant=False), ims, qs)
    assert loose[len(loose) // 2] > 10 * errs[len(errs) // 2]


def test_partly_compressed_checkpoint_gets_a_complete_decode_set(tiny, tmp_path, native_lib, questions):
    """One int8 layer among float ones: the float LLM layers get W8A8 + int4 decode, the int8 layer keeps its
    tensors in both sets (the engine fuses gate/up, so a decode set covers all LLM linears or none)."""
    from edgemm.compress import apply
    from edgemm.compress.config import RTNConfig

    ims, qs = questions
    m = copy.deepcopy(tiny.model)
    apply(m, RTNConfig(bits=8, group_size=32, include=["text.layers.0.mlp.up_proj"]))
    export(LoadedModel(m, tiny.processor, "part"), "native", tmp_path / "b", calib_n=8)
    dq = json.loads(nx.read_kv(__import__("gguf").GGUFReader(str(tmp_path / "b" / nx.FILE)))["decode_quantization"])["layers"]
    assert dq["text.layers.0.mlp.up_proj"]["format"] == "int8" and dq["text.layers.0.mlp.gate_proj"]["format"] == "int4"
    assert len(dq) == 15 and dq["text.lm_head"]["format"] == "int4"  # 2 x 7 LLM linears + the LM head
    ref = nx.reference_model(tmp_path / "b")
    _check_errs(_logit_errs(tmp_path / "b", ref, ims, qs), exact=5e-3)


def test_generated_image_token_is_an_ordinary_token(demo_tokenizer, tmp_path, native_lib):
    """A generated <image> id is embedded like any token (as torch does), not spliced as the image again."""
    m = random_model(cfg32(demo_tokenizer), seed=1)
    with torch.no_grad():  # an LM head that always predicts the image token (id 3)
        m.text.lm_head.weight.zero_()
        m.text.lm_head.weight[3] = 1.0
    lm = LoadedModel(m, Processor(demo_tokenizer, m.config), "image-token")
    export(lm, "native", tmp_path / "b", precision="fp32")
    im = np.zeros((32, 32, 3), np.uint8)
    want = runtimes.load(lm).generate(im, "what color?", max_new_tokens=4)
    assert open_native(tmp_path / "b").generate(im, "what color?", max_new_tokens=4) == want


def test_f16_float_tensors(tiny, tmp_path, native_lib, questions):
    """float_type="f16": the engine widens F16 tensors exactly as the reference does."""
    ims, qs = questions
    export(tiny, "native", tmp_path / "b", precision="fp32", float_type="f16")
    ref = nx.reference_model(tmp_path / "b")
    assert ref.model.text.embed_tokens.weight.dtype == torch.float32
    assert not torch.equal(ref.model.text.embed_tokens.weight, tiny.model.text.embed_tokens.weight)  # rounded to f16
    _check_errs(_logit_errs(tmp_path / "b", ref, ims, qs), exact=1e-4, worst=1e-4)


@pytest.mark.parametrize("over", [{"tie_word_embeddings": True}, {"vision_feature_select": "full"},
                                  {"vision_feature_layer": -1}])
def test_config_variants(demo_tokenizer, tmp_path, native_lib, questions, over):
    """Tied LM head (no lm_head tensor in the file), [CLS] fed to the LLM, last-layer features."""
    ims, qs = questions
    cfg = cfg32(demo_tokenizer)
    if "tie_word_embeddings" in over:
        cfg.text.tie_word_embeddings = True
    else:
        for k, v in over.items():
            setattr(cfg, k, v)
    m = random_model(cfg.validate(), seed=4)
    lm = LoadedModel(m, Processor(demo_tokenizer, m.config), "variant")
    export(lm, "native", tmp_path / "b", precision="fp32")
    _check_errs(_logit_errs(tmp_path / "b", nx.reference_model(tmp_path / "b"), ims, qs), worst=1e-4)
    assert open_native(tmp_path / "b").generate_batch(ims, qs, max_new_tokens=6) == \
        runtimes.load(lm).generate_batch(ims, qs, max_new_tokens=6)


def test_sanitizer_and_cross_builds_are_not_candidates(tmp_path):
    for name, cache, ok in [("plain", "CMAKE_BUILD_TYPE:STRING=Release\n", True),
                            ("asan", "EDGEMM_SANITIZE:BOOL=ON\n", False),
                            ("arm64", "CMAKE_TOOLCHAIN_FILE:FILEPATH=/x/aarch64-linux-gnu.cmake\n", False)]:
        d = tmp_path / name
        d.mkdir()
        (d / "CMakeCache.txt").write_text(cache)
        (d / "libedgemm.so").write_bytes(b"\x7fELF")
        assert _native._loadable_build(d / "libedgemm.so") is ok, name


def test_attention_option_auto_follows_the_linears_and_the_ab_tool_reports_each_mode(bundles, native_lib):
    from edgemm.bench.attention_ab import measure

    flags = Path("/proc/cpuinfo").read_text()
    bf16_cpu = "avx512_bf16" in flags.split()  # AMX-BF16 tiles or vdpbf16ps
    for p, quantized in (("fp32", False), ("w8a8-int4", True)):
        m = _native.Model(bundles[p], n_threads=1)
        want = "bf16" if (quantized and bf16_cpu) else "fp32"
        assert m.info()["attention"]["text_prefill"] == want, p
        m.close()
    assert _native.Model(bundles["fp32"], n_threads=1, attention="fp32").info()["attention"] == {"vision": "fp32", "text_prefill": "fp32"}
    # KV cache: fp16 with quantized text linears (auto), fp32 for the fp32 bundle or when forced
    assert _native.Model(bundles["w8a8-int4"], n_threads=1).info()["kv_cache"] == "fp16"
    assert _native.Model(bundles["w8a8-int4"], n_threads=1, attention="fp32").info()["kv_cache"] == "fp32"
    assert _native.Model(bundles["fp32"], n_threads=1).info()["kv_cache"] == "fp32"
    with pytest.raises(EdgemmError, match="attention"):
        _native.Model(bundles["fp32"], attention="fp16")
    rep = measure(bundles["w8a8-int4"], threads=1, repeats=1)
    assert [r["mode"] for r in rep["modes"]] == ["auto", "fp32", "auto"]
    assert all(r["runs"][0]["ttft_ms"] > 0 and r["runs"][0]["prefill_tokens"] > 0 for r in rep["modes"])
    assert rep["modes"][1]["attention"]["text_prefill"] == "fp32"


def test_decode_ab_tool_interleaves_two_bundles_in_process_and_across_libraries(bundles, native_lib, tmp_path):
    from edgemm.bench.decode_ab import measure

    rep = measure(bundles["w8a8-int4"], bundles["int8"], rounds=2, tokens=4, threads=1, context=50)
    assert len(rep["a_tok_s"]) == len(rep["b_tok_s"]) == 2 and min(rep["a_tok_s"] + rep["b_tok_s"]) > 0 and rep["context"] == 50
    assert rep["ratio_of_medians"] == round(rep["b_median"] / rep["a_median"], 3)
    lib = str(native_lib)
    rep = measure(bundles["w8a8-int4"], bundles["int8"], rounds=1, tokens=4, threads=1, libs=[lib, lib])
    assert set(rep["libraries"]) == {lib} and len(rep["libraries"][lib]["a_tok_s"]) == 2
    with pytest.raises(EdgemmError, match="manifest"):
        measure(tmp_path, bundles["int8"], rounds=1)
    with pytest.raises(EdgemmError, match="does not exist"):
        measure(bundles["w8a8-int4"], bundles["int8"], rounds=1, libs=[str(tmp_path / "nope.so")])

