"""android-npu graph set (export/npu.py): static shapes, QDQ layout, lanes, and the chunked prefill run
graph by graph in onnxruntime (CPU provider) against a plain torch W8A8 reference."""

import copy

import numpy as np
import onnx
import pytest
import torch

from conftest import random_model
from edgemm import runtimes
from edgemm.data import load_dataset
from edgemm.export.bundle import bundle_dir, read_manifest
from edgemm.export.npu import reference_logits, w8a8_params, write_android_npu
from edgemm.models.checkpoint import LoadedModel
from edgemm.processor import Processor


def outlier_model():
    """A random tiny model with massive activations on a few tokens and channels (as real LLMs
    have on BOS), so that calibration picks clipped scales and outlier channels."""
    m = random_model(seed=3)
    with torch.no_grad():
        m.text.embed_tokens.weight[m.config.bos_token_id, 5] = 60.0
        for mlp in (m.text.layers[0].mlp, m.text.layers[1].mlp):  # BOS -> a huge SwiGLU product in channel 3
            mlp.gate_proj.weight[3, 5] = 10.0
            mlp.up_proj.weight[3, 5] = 10.0
    return m


@pytest.fixture(scope="module")
def lm(demo_tokenizer):
    m = outlier_model()
    return LoadedModel(m, Processor(demo_tokenizer, m.config), "tiny-outliers")


def _bundle(lm, path, **kw):
    with bundle_dir(path, lm, "android-npu") as bw:
        write_android_npu(bw, lm, **kw)
    return read_manifest(path), path


@pytest.fixture(scope="module")
def npu(lm, tmp_path_factory):
    return _bundle(lm, tmp_path_factory.mktemp("npu") / "b8", chunk_size=8, max_context=96, decode_precision="fp32")


@pytest.fixture(scope="module")
def params(lm):
    return w8a8_params(lm)[0]


@pytest.fixture(scope="module")
def prompts():
    ds = load_dataset("shapes:4:11")
    return [(ds.image(r), r.question) for r in ds.records]


def test_graphs_are_static_int32_and_laned(npu, lm):
    man, root = npu
    assert man["chunk_size"] == 8 and man["max_context"] == 96
    roles = {}
    for a in man["artifacts"]:
        roles.setdefault(a["role"], []).append(a)
        if not a["file"].startswith("npu/"):
            continue
        g = onnx.load(str(root / a["file"])).graph
        for vi in list(g.input) + list(g.output):
            dims = vi.type.tensor_type.shape.dim
            assert all(d.HasField("dim_value") for d in dims), (a["file"], vi.name)  # no symbolic dims
            assert vi.type.tensor_type.elem_type != onnx.TensorProto.INT64, (a["file"], vi.name)
        for vi in g.input:
            if vi.name in ("input_ids", "position_ids", "past_len"):
                assert vi.type.tensor_type.elem_type == onnx.TensorProto.INT32
    n = lm.config.text.num_layers
    assert len(roles["prefill_layer"]) == 3 * n and all(a["lane"] == "npu" and a["precision"] == "w8a8" for a in roles["prefill_layer"])
    assert len(roles["shadow"]) == 4 * n and all(a["lane"] == "cpu" and a["precision"] == "fp32" for a in roles["shadow"])
    assert roles["prefill_attention"][0]["lane"] == "cpu" and roles["decoder"][0]["lane"] == "cpu"
    assert roles["vision_encoder"][0]["lane"] == "npu"


def test_npu_graphs_hold_w8a8_in_qdq_form(npu, params):
    man, root = npu
    g = onnx.load(str(root / "npu/layer0_mlp.onnx")).graph
    ops = [nd.op_type for nd in g.node]
    assert ops.count("QuantizeLinear") == 3 and ops.count("MatMul") == 3
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in g.initializer}
    weights = [v for v in inits.values() if v.dtype == np.int8 and v.ndim == 2]
    p = params["text.layers.0.mlp.down_proj"]
    assert any(np.array_equal(w, p.qweight.T) for w in weights)  # int8 codes verbatim, [K, N]
    dq = [nd for nd in g.node if nd.op_type == "DequantizeLinear" and nd.input[0] in inits and inits[nd.input[0]].ndim == 2]
    assert all(next(a.i for a in nd.attribute if a.name == "axis") == 1 for nd in dq)  # per output channel
    zps = [inits[nd.input[2]] for nd in g.node if nd.op_type == "QuantizeLinear"]
    assert all(z.dtype == np.uint8 and int(z) == 128 for z in zps)  # int8 code + 128


def test_calibration_found_outlier_channels(npu, params):
    man, _ = npu
    hot = man["npu"]["outlier_channels"]
    assert "text.layers.0.mlp.down_proj" in hot
    assert 3 in params["text.layers.0.mlp.down_proj"].outlier_channels


def _embeds(sess, image, question):
    ids, mask, px = sess._inputs([image], [question])
    return sess.merge(ids, mask, sess.encode_images(px))


def test_chunked_prefill_matches_w8a8_reference(npu, lm, params, prompts):
    sess = runtimes.load(npu[1])
    assert type(sess).__name__ == "NpuSession"
    for image, q in prompts[:3]:
        emb, mask = _embeds(sess, image, q)
        last, past, pos = sess.prefill(emb, mask)
        ref = reference_logits(lm, params, emb)
        # same arithmetic (QDQ == formats.md W8A8 + shadow), different summation order: float32 noise only
        assert np.abs(last - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
        assert sess.prefill_info["shadow_unhandled"] == 0
        assert sess.prefill_info["npu_chunks"] == -(-emb.shape[1] // 8)
        assert past["past_key_values.0.key"].shape[2] == emb.shape[1]
        # and near the float model: W8A8 error only (random Gaussian weights are a harsh case; answer
        # agreement is measured on the demo model, docs/export-onnx.md)
        with torch.no_grad():
            f = lm.model.text(torch.from_numpy(emb), torch.arange(emb.shape[1])[None])[:, -1].numpy()
        assert np.corrcoef(last.ravel(), f.ravel())[0, 1] > 0.95


def test_shadow_path_matters(lm, params, prompts, npu):
    """Dropping the outlier channels (plain clipping) moves the logits far more than float noise."""
    sess = runtimes.load(npu[1])
    emb, mask = _embeds(sess, *prompts[0])
    ref = reference_logits(lm, params, emb)
    mm = copy.deepcopy(lm.model)
    mods = dict(mm.named_modules())
    for name, p in params.items():  # the same W8A8 tensors with plain clipping, no shadow path
        parent, child = name.rsplit(".", 1)
        setattr(mods[parent], child, _Clip(torch.from_numpy(p.w_float), p.input_scale))
    with torch.no_grad():
        noshadow = mm.text(torch.from_numpy(emb), torch.arange(emb.shape[1])[None])[:, -1].numpy()
    last, _, _ = sess.prefill(emb, mask)
    assert np.abs(noshadow - ref).max() > 100 * max(np.abs(last - ref).max(), 1e-6)


class _Clip(torch.nn.Module):
    def __init__(self, w, s):
        super().__init__()
        self.w, self.s = w, s

    def forward(self, x):
        return (torch.round(x / self.s).clamp(-128, 127) * self.s) @ self.w.T


def test_chunk_size_does_not_change_the_result(lm, npu, prompts, tmp_path):
    man16, root16 = _bundle(lm, tmp_path / "b16", chunk_size=16, max_context=96, decode_precision="fp32")
    s8, s16 = runtimes.load(npu[1]), runtimes.load(root16)
    for image, q in prompts[:2]:
        emb, mask = _embeds(s8, image, q)
        a, _, _ = s8.prefill(emb, mask)
        b, _, _ = s16.prefill(emb, mask)
        assert np.abs(a - b).max() < 1e-4 * max(1.0, np.abs(a).max())
        assert s8.generate(image, q, max_new_tokens=5) == s16.generate(image, q, max_new_tokens=5)


def test_whole_bundle_generates_and_reports(npu, prompts):
    sess = runtimes.load(npu[1])
    image, q = prompts[0]
    text = sess.generate(image, q, max_new_tokens=6)
    assert isinstance(text, str)
    st = sess.stats
    assert st["npu_chunks"] >= 2 and st["prefill_tokens"] > 8 and st["ttft_ms"] > 0
    assert "".join(sess.generate(image, q, max_new_tokens=6, stream=True)).strip() == text
    answers = sess.generate_batch([p[0] for p in prompts], [p[1] for p in prompts], max_new_tokens=4)
    assert len(answers) == len(prompts)


def test_prefill_plus_decode_equals_reference_tokens(npu, lm, params, prompts):
    """With an fp32 decode graph, the first token is the W8A8 prefill's argmax and every later
    token comes from the cache the chunks wrote: the float decoder over that cache."""
    sess = runtimes.load(npu[1])
    image, q = prompts[1]
    emb, mask = _embeds(sess, image, q)
    last, past, pos = sess.prefill(emb, mask)
    tok = int(last.argmax())
    logits, _ = sess.decode_step(sess.embed_ids(np.array([[tok]])), np.ones((1, emb.shape[1] + 1), np.int64), pos[:, -1:] + 1, past)
    # the reference: W8A8 keys/values for the prompt are what the cache holds; the new token's own
    # row is float. Compare against the full-float model fed the same prompt: close, not equal.
    with torch.no_grad():
        e2 = torch.cat([torch.from_numpy(emb), lm.model.text.embed_tokens(torch.tensor([[tok]]))], 1)
        f = lm.model.text(e2, torch.arange(e2.shape[1])[None])[:, -1].numpy()
    assert np.corrcoef(logits.ravel(), f.ravel())[0, 1] > 0.98


def test_carried_w8a8_tensors_are_used_verbatim(demo_tokenizer, tmp_path):
    m = random_model(seed=4)
    names = []
    for i, layer in enumerate(m.text.layers):
        for parent, child in ((layer.mlp, "down_proj"), (layer.self_attn, "q_proj")):
            setattr(parent, child, _W8A8(getattr(parent, child)))
            names.append(f"text.layers.{i}.{'mlp' if child == 'down_proj' else 'self_attn'}.{child}")
    lm = LoadedModel(m, Processor(demo_tokenizer, m.config), "carried")
    params, src = w8a8_params(lm)
    assert src == "mixed"
    for n in names:
        mod = dict(m.named_modules())[n]
        assert np.array_equal(params[n].qweight, mod.qweight.numpy()) and params[n].input_scale == float(mod.input_scale)
        assert np.array_equal(params[n].outlier_channels, [1, 2])
    man, root = _bundle(lm, tmp_path / "c", chunk_size=8, max_context=64, decode_precision="int4", vision_quant=False)
    assert man["npu"]["w8a8_source"] == "mixed" and man["artifacts"][0]["lane"] == "cpu"
    assert runtimes.load(root).generate(None, "what shape is it?", max_new_tokens=3) is not None


class _W8A8(torch.nn.Module):
    """A linear carrying edgemm W8A8 tensors (docs/formats.md), as a w8a8-compressed checkpoint does."""

    def __init__(self, lin):
        super().__init__()
        w = lin.weight.detach()
        ws = w.abs().amax(1) / 127
        self.register_buffer("qweight", torch.round(w / ws[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("weight_scale", ws.float())
        self.register_buffer("input_scale", torch.tensor(0.05))
        self.register_buffer("outlier_channels", torch.tensor([1, 2], dtype=torch.int32))

    def dequantized_weight(self):
        return self.qweight.float() * self.weight_scale[:, None]

    def forward(self, x):
        return x @ self.dequantized_weight().T


def test_compress_w8a8_checkpoint_drives_the_npu_graphs(demo_tokenizer, tmp_path):
    """A checkpoint compressed with edgemm.compress w8a8 (shadow on): the NPU graphs take its
    tensors, and the chunked prefill equals the checkpoint's own torch W8A8 forward."""
    from edgemm.compress import apply
    from edgemm.compress.calibration import shapes_forward_loop
    from edgemm.models.checkpoint import load_checkpoint, save_checkpoint

    m = outlier_model()
    proc = Processor(demo_tokenizer, m.config)
    apply(m, {"method": "w8a8", "include": ["text.layers.*"]}, forward_loop=shapes_forward_loop(proc, n=16))
    save_checkpoint(m, demo_tokenizer, tmp_path / "ckpt")
    lm = load_checkpoint(tmp_path / "ckpt")
    params, src = w8a8_params(lm)
    assert src == "checkpoint (edgemm w8a8)" or src == "checkpoint"
    man, root = _bundle(lm, tmp_path / "b", chunk_size=8, max_context=96, decode_precision="fp32", vision_quant=False)
    assert man["npu"]["w8a8_source"] == src
    sess = runtimes.load(root)
    ds = load_dataset("shapes:2:13")
    for r in ds.records:
        emb, mask = _embeds(sess, ds.image(r), r.question)
        last, _, _ = sess.prefill(emb, mask)
        with torch.no_grad():  # the checkpoint's own W8A8Linear modules (exact int8 GEMM + shadow)
            ref = lm.model.text(torch.from_numpy(emb), torch.arange(emb.shape[1])[None])[:, -1].numpy()
        assert np.abs(last - ref).max() < 1e-3 * max(1.0, np.abs(ref).max())
