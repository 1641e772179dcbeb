"""ONNX export (export/onnx.py) run in onnxruntime (runtimes/onnxruntime_runtime.py) against torch."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from conftest import random_model, tiny_config
from edgemm import runtimes
from edgemm.data import load_dataset
from edgemm.errors import EdgemmError
from edgemm.export import export
from edgemm.models.checkpoint import LoadedModel
from edgemm.processor import Processor


def loaded(model, tok):
    return LoadedModel(model, Processor(tok, model.config), "tiny")


@pytest.fixture(scope="module")
def tiny(demo_tokenizer):
    return loaded(random_model(), demo_tokenizer)


@pytest.fixture(scope="module")
def bundles(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    return {p: (export(tiny, "onnx", root / p, precision=p), root / p) for p in ("fp32", "int8", "int4")}


@pytest.fixture(scope="module")
def questions():
    ds = load_dataset("shapes:12:5")
    return [ds.image(r) for r in ds.records], [r.question for r in ds.records]


def _dtype(vi):
    return onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)


def test_layout_and_io_names(bundles, tiny):
    man, root = bundles["fp32"]
    files = {a["file"]: a for a in man["artifacts"]}
    for f in ("onnx/vision_encoder.onnx", "onnx/embed_tokens.onnx", "onnx/decoder_model_merged.onnx"):
        assert files[f]["runtime"] == "onnxruntime" and files[f]["format"] == "onnx"
        onnx.checker.check_model(str(root / f), full_check=True)
    for f in ("config.json", "generation_config.json", "preprocessor_config.json", "tokenizer_config.json",
              "genai_config.json", "tokenizer.json"):
        assert (root / f).is_file(), f
    g = onnx.load(str(root / "onnx/decoder_model_merged.onnx")).graph
    n = tiny.config.text.num_layers
    ins = {i.name: i for i in g.input}
    assert list(ins)[:3] == ["inputs_embeds", "attention_mask", "position_ids"]
    assert [i.name for i in g.input[3:]] == [f"past_key_values.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
    assert [o.name for o in g.output] == ["logits"] + [f"present.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
    assert _dtype(ins["attention_mask"]) == np.int64 and _dtype(ins["position_ids"]) == np.int64
    dims = [d.dim_param for d in ins["past_key_values.0.key"].type.tensor_type.shape.dim]
    assert dims[0] == "batch_size" and dims[2] == "past_sequence_length"
    assert not any(nd.op_type == "If" for nd in g.node)
    cfg = json.loads((root / "config.json").read_text())
    assert cfg["model_type"] == "llava" and cfg["text_config"]["num_key_value_heads"] == tiny.config.text.num_kv_heads
    genai = json.loads((root / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["filename"] == "onnx/decoder_model_merged.onnx"


def _torch_logits(model, ids, mask, px):
    with torch.no_grad():
        return model(torch.from_numpy(ids), None if px is None else torch.from_numpy(px), torch.from_numpy(mask)).numpy()


def test_fp32_logits_match_torch_prefill_and_decode(bundles, tiny, questions):
    sess = runtimes.load(bundles["fp32"][1], runtime="onnxruntime")
    ims, qs = questions
    # a batch with left padding: prompts of different lengths
    qs2 = [qs[0], qs[1] + " please answer now"]
    ids, mask, px = sess._inputs(ims[:2], qs2)
    emb, m2 = sess.merge(ids, mask, sess.encode_images(px))
    last, past, pos = sess.prefill(emb, m2)
    ref = _torch_logits(tiny.model, ids, mask, px)
    assert np.abs(last - ref[:, -1]).max() < 1e-4 * max(1.0, np.abs(ref).max())
    # one decode step through the cache == the full forward with the token appended
    nxt = ref[:, -1].argmax(-1)
    ids3 = np.concatenate([ids, nxt[:, None]], 1)
    mask3 = np.concatenate([mask, np.ones_like(mask[:, :1])], 1)
    m3 = np.concatenate([m2, np.ones_like(m2[:, :1])], 1)
    logits, _ = sess.decode_step(sess.embed_ids(nxt[:, None]), m3, pos[:, -1:] + 1, past)
    ref3 = _torch_logits(tiny.model, ids3, mask3, px)
    assert np.abs(logits - ref3[:, -1]).max() < 1e-4 * max(1.0, np.abs(ref3).max())


def test_fp32_greedy_answers_equal_torch(bundles, tiny, questions):
    ims, qs = questions
    ref = runtimes.load(tiny)
    sess = runtimes.load(bundles["fp32"][1])
    assert sess.runtime == "onnxruntime"
    assert sess.generate_batch(ims, qs, max_new_tokens=6) == ref.generate_batch(ims, qs, max_new_tokens=6)
    for im, q in zip(ims[:4], qs[:4]):
        want = ref.generate(im, q, max_new_tokens=6)
        assert sess.generate(im, q, max_new_tokens=6) == want
        assert "".join(sess.generate(im, q, max_new_tokens=6, stream=True)).strip() == want
    # text only
    assert sess.generate(None, "hello there", max_new_tokens=5) == ref.generate(None, "hello there", max_new_tokens=5)
    st = sess.stats
    assert st["prefill_tokens"] > 0 and st["ttft_ms"] > 0 and set(st) >= {"image_encode_ms", "decode_tok_s", "prefill_tok_s"}


def test_int8_and_int4_graphs_load_and_answer(bundles, tiny, questions):
    ims, qs = questions
    ops = {}
    for p in ("int8", "int4"):
        man, root = bundles[p]
        dec = next(a for a in man["artifacts"] if a["role"] == "decoder")
        assert dec["precision"] == p
        ops[p] = {n.op_type for n in onnx.load(str(root / dec["file"])).graph.node}
        sess = runtimes.load(root)
        ids, mask, px = sess._inputs(ims[:3], qs[:3])
        emb, m2 = sess.merge(ids, mask, sess.encode_images(px))
        last, _, _ = sess.prefill(emb, m2)
        ref = _torch_logits(tiny.model, ids, mask, px)[:, -1]
        # quantization noise on a random Gaussian model (a worst case for 4 bits): the logits stay
        # correlated with torch's; answer accuracy is measured on the demo model (docs/export-onnx.md)
        corr = np.corrcoef(last.ravel(), ref.ravel())[0, 1]
        assert corr > {"int8": 0.99, "int4": 0.9}[p], (p, corr)
        answers = sess.generate_batch(ims[:3], qs[:3], max_new_tokens=4)
        assert len(answers) == 3 and sess.stats["decode_tokens"] >= 0
    assert "MatMulInteger" in ops["int8"] or "DynamicQuantizeMatMul" in ops["int8"]
    assert "MatMulNBits" in ops["int4"]
    vis = next(a for a in bundles["int4"][0]["artifacts"] if a["role"] == "vision_encoder")
    assert vis["file"] == "onnx/vision_encoder_int8.onnx"  # the q4 set keeps an int8 vision encoder


def test_sampling_is_seeded_and_top_k_1_is_greedy(bundles, questions):
    ims, qs = questions
    sess = runtimes.load(bundles["fp32"][1])
    greedy = sess.generate(ims[0], qs[0], max_new_tokens=6)
    assert sess.generate(ims[0], qs[0], max_new_tokens=6, temperature=0.8, top_k=1, seed=1) == greedy
    a = sess.generate(ims[0], qs[0], max_new_tokens=6, temperature=1.5, top_p=0.9, seed=7)
    b = sess.generate(ims[0], qs[0], max_new_tokens=6, temperature=1.5, top_p=0.9, seed=7)
    assert a == b


def test_adapter_does_not_import_torch(bundles, questions):
    root = bundles["fp32"][1]
    code = ("import sys; from edgemm import runtimes; s = runtimes.load(sys.argv[1]); "
            "import numpy as np; im = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype('uint8'); "
            "print(repr(s.generate(im, 'what color is the shape?', max_new_tokens=3))); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    r = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_errors_are_one_line(bundles, tmp_path, tiny):
    with pytest.raises(EdgemmError, match="precision"):
        export(tiny, "onnx", tmp_path / "x", precision="int3")
    assert not (tmp_path / "x").exists()
    with pytest.raises(EdgemmError, match="no ONNX decoder"):
        runtimes.load(bundles["fp32"][1], precision="int4")
    sess = runtimes.load(bundles["fp32"][1])
    with pytest.raises(EdgemmError, match="exceeds the context"):
        sess.generate(None, "hi", max_new_tokens=500)


class Int4Linear(torch.nn.Module):
    """A linear layer holding edgemm int4 tensors (docs/formats.md), as a compressed checkpoint does."""

    def __init__(self, lin: torch.nn.Linear, group: int, asym: bool):
        super().__init__()
        w = lin.weight.detach().float()
        n, k = w.shape
        wg = w.reshape(n, k // group, group)
        if asym:
            lo, hi = wg.amin(-1), wg.amax(-1)
            scale = ((hi - lo) / 15).clamp(min=1e-8)
            zero = (-lo / scale).round().clamp(0, 15)
        else:
            scale = (wg.abs().amax(-1) / 7).clamp(min=1e-8)
            zero = torch.full_like(scale, 8)
        scale = scale.half().float()
        u = (wg / scale[..., None] + zero[..., None]).round().clamp(0, 15).to(torch.uint8).reshape(n, k)
        self.register_buffer("qweight", (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous())
        self.register_buffer("scales", scale.half())
        if asym:
            self.register_buffer("zeros", zero.to(torch.uint8))
        self.bias = None
        self.group = group

    def dequantize(self):
        q = self.qweight
        u = torch.stack([q & 15, q >> 4], -1).reshape(q.shape[0], -1).float()
        z = self.zeros.float() if hasattr(self, "zeros") else torch.full_like(self.scales.float(), 8)
        return (u - z.repeat_interleave(self.group, 1)) * self.scales.float().repeat_interleave(self.group, 1)

    def forward(self, x):
        return x @ self.dequantize().T


@pytest.mark.parametrize("asym", [False, True])
def test_int4_maps_edgemm_weights_verbatim(demo_tokenizer, tmp_path, asym):
    cfg = tiny_config()
    cfg.text.hidden_size, cfg.text.num_heads, cfg.text.head_dim, cfg.text.intermediate_size = 64, 4, 16, 96
    model = random_model(cfg.validate())
    n = 0
    for layer in model.text.layers:  # every decoder linear carries int4 codes
        for parent in (layer.mlp, layer.self_attn):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(parent, name, Int4Linear(child, 32, asym))
                    n += 1
    model.text.lm_head = Int4Linear(model.text.lm_head, 32, asym)
    n += 1
    model.config.extras["quantization"] = {"method": "int4", "group_size": 32}
    lm = loaded(model, demo_tokenizer)
    man = export(lm, "onnx", tmp_path / "b", precision="int4")
    dec = next(a for a in man["artifacts"] if a["role"] == "decoder")
    assert dec["extra"]["mapped"] == n and dec["extra"]["requantized"] == 0
    assert any("verbatim" in x for x in man["notes"])
    # nothing was re-quantized, so the int4 graph computes exactly the torch model's dequantized weights
    sess = runtimes.load(tmp_path / "b")
    ids, mask = sess.processor.batch(["what shape is it?"], with_image=False)
    emb, m2 = sess.merge(ids, mask, None)
    last, _, _ = sess.prefill(emb, m2)
    ref = _torch_logits(model, ids, mask, None)[:, -1]
    assert np.abs(last - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    # and the MatMulNBits B inputs hold edgemm's packed codes byte for byte
    g = onnx.load(str(tmp_path / "b" / dec["file"])).graph
    blobs = {onnx.numpy_helper.to_array(i).tobytes() for i in g.initializer if i.data_type == onnx.TensorProto.UINT8}
    for layer in model.text.layers:
        assert layer.mlp.down_proj.qweight.numpy().tobytes() in blobs
        if asym:
            z = layer.mlp.down_proj.zeros.numpy()
            z = np.concatenate([z, np.zeros((z.shape[0], z.shape[1] % 2), np.uint8)], 1)  # odd group count
            assert (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8).tobytes() in blobs


@pytest.mark.parametrize("method", ["fastervlm", "tome"])
def test_visual_token_compression_inside_the_vision_encoder(demo_tokenizer, tmp_path, questions, method):
    model = random_model()
    model.config.extras["visual_tokens"] = {"method": method, "keep": 0.25}
    lm = loaded(model, demo_tokenizer)
    man, root = export(lm, "onnx", tmp_path / "vt"), tmp_path / "vt"
    k = man["num_visual_tokens"]
    assert k == 4  # 16 patches x 0.25
    ims, qs = questions
    sess = runtimes.load(root)
    ids, mask, px = sess._inputs(ims[:2], qs[:2])
    assert sess.encode_images(px).shape == (2, k, model.config.text.hidden_size)
    ref = runtimes.load(lm)
    assert sess.generate_batch(ims[:6], qs[:6], max_new_tokens=5) == ref.generate_batch(ims[:6], qs[:6], max_new_tokens=5)


def test_onnxruntime_genai_runs_the_bundle_with_images(bundles, tiny, questions):
    """genai_config.json + embed_tokens_genai.onnx: onnxruntime-genai's vision -> embedding -> decoder
    pipeline gives torch's greedy answers (prompt with K image tokens, pixel_values from edgemm's
    processor, token ids as int32)."""
    import onnxruntime_genai as og  # the [runtimes] extra installs it; missing in CI is a failure
    man, root = bundles["fp32"]
    ims, qs = questions
    cfg, proc = tiny.config, tiny.processor
    k = man["num_visual_tokens"]
    model = og.Model(str(root))
    ref = runtimes.load(tiny).generate_batch(ims[:4], qs[:4], max_new_tokens=6)
    for im, q, want in zip(ims[:4], qs[:4], ref):
        ids = proc.encode_prompt(q)
        p = ids.index(cfg.image_token_id)
        ids = ids[:p] + [cfg.image_token_id] * k + ids[p + 1:]
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + 6, do_sample=False)
        gen = og.Generator(model, params)
        nt = og.NamedTensors()
        nt["input_ids"] = np.array([ids], np.int32)
        nt["pixel_values"] = proc.images([im])
        nt["num_image_tokens"] = np.array([k], np.int64)
        gen.set_inputs(nt)
        toks = []
        while not gen.is_done() and len(toks) < 6:
            gen.generate_next_token()
            t = int(gen.get_next_tokens()[0])
            if t == cfg.eos_token_id:
                break
            toks.append(t)
        assert proc.decode(toks) == want


@pytest.mark.parametrize("conf,precision", [
    ({"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False}, "int4"),
    ({"method": "rtn", "bits": 8, "group_size": 32}, "int8"),
])
def test_compressed_checkpoint_weights_map_to_matmulnbits(demo_tokenizer, tmp_path, conf, precision):
    """An edgemm.compress checkpoint (every linear packed, lm_head included) exports with its own
    codes: nothing is re-quantized, so onnxruntime's logits equal torch's on the packed model."""
    from edgemm.compress import apply
    from edgemm.models.checkpoint import load_checkpoint, save_checkpoint

    cfg = tiny_config()
    cfg.text.hidden_size, cfg.text.num_heads, cfg.text.head_dim, cfg.text.intermediate_size = 64, 4, 16, 96
    model = random_model(cfg.validate())
    apply(model, {**conf, "exclude": []})
    save_checkpoint(model, demo_tokenizer, tmp_path / "ckpt")
    lm = load_checkpoint(tmp_path / "ckpt")
    man = export(lm, "onnx", tmp_path / "b", precision=precision)
    dec = next(a for a in man["artifacts"] if a["role"] == "decoder")
    n_dec = 7 * cfg.text.num_layers + 1
    assert dec["extra"]["mapped"] == n_dec and dec["extra"]["requantized"] == 0
    sess = runtimes.load(tmp_path / "b")
    ids, mask, px = sess._inputs(*[[x] for x in _one_question()])
    emb, m2 = sess.merge(ids, mask, sess.encode_images(px))
    last, _, _ = sess.prefill(emb, m2)
    with torch.no_grad():  # same image features, so only the decoder is compared
        ref = lm.model.text(torch.from_numpy(emb), torch.arange(emb.shape[1])[None])[:, -1].numpy()
    assert np.abs(last - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())


def _one_question():
    ds = load_dataset("shapes:1:9")
    return ds.image(ds.records[0]), ds.records[0].question
