"""The native model file (export/native.py): a GGUF container that gguf-py's GGUFReader reads back exactly,
with the keys and tensor layout of the contract in native/README.md ("File format"), built from float and
from already-compressed checkpoints. These tests need no native engine."""

import copy
import json
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch

from conftest import random_model
from edgemm.compress import apply
from edgemm.compress.config import MagnitudeConfig, RTNConfig, W8A8Config
from edgemm.compress.calibration import shapes_forward_loop
from edgemm.errors import EdgemmError
from edgemm.export import export
from edgemm.export import native as nx
from edgemm.models.checkpoint import LoadedModel, save_checkpoint, state_dict_for_saving
from edgemm.models.config import TextConfig, VisionConfig, VLMConfig
from edgemm.processor import Processor


def cfg32(tok, **over):
    """Tiny, with every matmul width a multiple of 32 (the engine's group-size rule)."""
    vision = VisionConfig(image_size=32, patch_size=8, hidden_size=64, num_layers=3, num_heads=4, intermediate_size=128)
    text = TextConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=16, intermediate_size=128, max_position_embeddings=160)
    cfg = VLMConfig(vision=vision, text=text)
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg.validate()


@pytest.fixture(scope="module")
def tiny(demo_tokenizer):
    m = random_model(cfg32(demo_tokenizer), seed=3)
    return LoadedModel(m, Processor(demo_tokenizer, m.config), "tiny32")


@pytest.fixture(scope="module")
def bundles(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("native")
    return {p: export(tiny, "native", root / p, precision=p, calib_n=8) and root / p for p in nx.PRESETS}


def reader(bundle):
    return gguf.GGUFReader(str(bundle / nx.FILE))


def as_numpy(t):
    return np.asarray(t.data).reshape(tuple(reversed([int(x) for x in t.shape])))


def test_keys_and_manifest(bundles, tiny):
    r = reader(bundles["w8a8-int4"])
    kv = nx.read_kv(r)
    assert r.fields["general.architecture"].contents() == "edgemm"
    assert kv["format_version"] == 1 and r.fields["edgemm.format_version"].types == [gguf.GGUFValueType.UINT32]
    for k in ("chunk_size", "max_context"):
        assert r.fields[f"edgemm.{k}"].types == [gguf.GGUFValueType.UINT32]
    assert kv["chunk_size"] == 256 and kv["max_context"] == tiny.config.text.max_position_embeddings
    cfg = json.loads(kv["config"])
    assert cfg["format"] == "edgemm" and cfg["text"] == json.loads(json.dumps(tiny.config.to_dict()["text"]))
    assert json.loads(kv["tokenizer"]) == json.loads(tiny.processor.tokenizer.to_str())
    assert json.loads(kv["preprocess"]) == {"image_size": 32, "resize": "pad", "mean": [0.5] * 3, "std": [0.5] * 3}
    assert kv["prompt_template"] == tiny.config.prompt_template
    q = cfg["extras"]["quantization"]["layers"]
    assert set(q) == {n for n, m in tiny.model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("text.layers.")}
    assert {m["format"] for m in q.values()} == {"w8a8"}
    dq = json.loads(kv["decode_quantization"])["layers"]
    assert set(dq) == set(q) | {"text.lm_head"} and {(m["format"], m["group_size"]) for m in dq.values()} == {("int4", 32)}
    m = json.loads((bundles["w8a8-int4"] / "manifest.json").read_text())
    (art,) = m["artifacts"]
    assert (art["runtime"], art["format"], art["precision"], art["lane"]) == ("native", "edgemm-native", "w8a8-int4", "npu")
    assert art["extra"]["decode"] == "int4" and m["chunk_size"] == 256 and art["extra"]["decode_layers"] == len(dq)
    assert json.loads(nx.read_kv(reader(bundles["fp32"]))["decode_quantization"]) == {}


@pytest.mark.parametrize("preset", list(nx.PRESETS))
def test_every_tensor_round_trips_with_contract_dtypes(bundles, tiny, preset):
    """Names/shapes are the checkpoint's (+ decode.*), dtypes as the contract says, values bit-exact."""
    r = reader(bundles[preset])
    ref = nx.reference_model(bundles[preset])
    sd = {k.replace(".inner.", "."): v for k, v in state_dict_for_saving(ref.model).items()}
    got = {t.name: t for t in r.tensors}
    # the reference's LM head is the decode set's (no float copy in the file) when there is a decode set
    head_dec = preset != "fp32"
    is_dec = lambda k: ".decode." in k or (head_dec and k.startswith("text.lm_head."))  # noqa: E731
    expect = {k.replace(".prefill.", "."): v for k, v in sd.items() if not is_dec(k)}
    dec = {k.replace(".decode.", ".", 1): v for k, v in sd.items() if is_dec(k)}
    names = {k for k in expect if not (k.endswith("outlier_channels") and expect[k].numel() == 0)}
    assert set(got) == names | {"decode." + k for k in dec}
    types = {}
    for name, t in got.items():
        leaf = name.rsplit(".", 1)[1]
        a = as_numpy(t)
        types.setdefault(leaf, set()).add(t.tensor_type.name)
        if name.startswith("decode."):
            continue
        v = expect[name]
        want = v.numpy()
        if leaf == "input_scale":
            assert a.shape == (1,) and want.shape == ()
            want = want.reshape(1)
        assert a.shape == want.shape, name
        assert np.array_equal(a.view(want.dtype) if a.dtype.itemsize == want.dtype.itemsize else a.astype(want.dtype), want), name
    assert types["weight"] == {"F32"} and types.get("bias", {"F32"}) == {"F32"}
    if preset != "fp32":
        assert types["qweight"] == {"I8"} and types["scales"] == {"F16"} and types["weight_scale"] == {"F32"}
        assert types["input_scale"] == {"F32"}
    # the float weights equal the source model's exactly
    src = state_dict_for_saving(tiny.model)
    for name in ("text.embed_tokens.weight", "vision.layers.0.mlp.fc1.weight") + (("text.lm_head.weight",) if not head_dec else ()):
        assert np.array_equal(as_numpy(got[name]), src[name].numpy())
    assert ("text.lm_head.weight" in got) == (not head_dec)


def test_int4_decode_set_is_the_rtn_of_the_float_weights(bundles, tiny):
    r = {t.name: t for t in reader(bundles["w8a8-int4"]).tensors}
    m = copy.deepcopy(tiny.model)
    apply(m, RTNConfig(bits=4, group_size=32, include=["text.layers.*"], exclude=[]))
    for name in ("text.layers.0.mlp.up_proj", "text.layers.1.self_attn.k_proj"):
        mod = m.get_submodule(name)
        q = as_numpy(r[f"decode.{name}.qweight"])
        assert q.dtype == np.int8 and q.shape == tuple(mod.qweight.shape)  # uint8 [N, K/2] as raw I8 bytes
        assert np.array_equal(q.view(np.uint8), mod.qweight.numpy())
        assert np.array_equal(as_numpy(r[f"decode.{name}.scales"]), mod.scales.numpy())
        assert f"decode.{name}.zeros" not in r  # symmetric


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("preset", ["w8a8-int4", "int8"])
def test_decode_set_holds_the_lm_head(demo_tokenizer, tmp_path, preset, tied):
    """The LM head is the decode set's only: the RTN of the float head (of the embedding when tied) in the decode
    format, run on every step (the last row of a prefill too); the main set has no float copy of it."""
    from edgemm.compress.rtn import quantize_linear_rtn

    cfg = cfg32(demo_tokenizer)
    cfg.text.tie_word_embeddings = tied
    m = random_model(cfg.validate(), seed=6)
    assert (m.text.lm_head.weight is m.text.embed_tokens.weight) == tied
    before = {k: v.clone() for k, v in m.state_dict().items()}
    lm = LoadedModel(m, Processor(demo_tokenizer, m.config), "head")
    export(lm, "native", tmp_path / "b", precision=preset, calib_n=8)
    # the source model is untouched: same tensors, same modules, no hooks left behind
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert type(m.text.lm_head) is torch.nn.Linear and type(m.text.layers[0].mlp.up_proj) is torch.nn.Linear
    assert not any(mod._forward_pre_hooks or mod._forward_hooks for mod in m.modules())
    assert (m.text.lm_head.weight is m.text.embed_tokens.weight) == tied

    r = {t.name: t for t in reader(tmp_path / "b").tensors}
    dq = json.loads(nx.read_kv(reader(tmp_path / "b"))["decode_quantization"])["layers"]
    bits, gs = (4, 32) if preset == "w8a8-int4" else (8, 64)
    vocab = demo_tokenizer.get_vocab_size()
    assert dq["text.lm_head"] == {"format": f"int{bits}", "bits": bits, "group_size": gs, "symmetric": True,
                                  "method": "rtn", "in_features": 64, "out_features": vocab, "bias": False}
    assert len(dq) == 15  # 2 x 7 LLM linears + the head
    assert "text.lm_head.weight" not in r
    q = quantize_linear_rtn(m.text.lm_head, bits, gs, True)
    assert np.array_equal(as_numpy(r["decode.text.lm_head.qweight"]).view(q.qweight.numpy().dtype), q.qweight.numpy())
    assert np.array_equal(as_numpy(r["decode.text.lm_head.scales"]), q.scales.numpy())
    assert "decode.text.lm_head.zeros" not in r

    ref = nx.reference_model(tmp_path / "b").model
    head = ref.text.lm_head
    assert type(head).__name__ == "WoqActLinear"
    assert torch.equal(head.inner.qweight, q.qweight) and head.block == (32 if bits == 4 else 64)
    # the prefill's last row (generation) and a one-token step both run the quantized head
    x = torch.randn(2, 5, 64)
    pos = torch.arange(5).expand(2, 5)
    with torch.no_grad():
        lg, h = ref.text(x, pos, logits_to_keep=1, return_hidden=True)
        assert h.shape[1] == 1 and torch.equal(lg, head(h))
        lg1, h1 = ref.text(x[:, :1], pos[:, :1], return_hidden=True)
        assert torch.equal(lg1, head(h1))
        lg_all = ref(torch.tensor([[1, 5, 3, 7, 9]]), torch.randn(1, 3, 32, 32))  # scoring path: every row
        assert lg_all.shape[1] > 1


def test_gptq_decode_set_keeps_an_rtn_lm_head(tiny, tmp_path):
    export(tiny, "native", tmp_path / "b", precision="w8a8-int4", decode_method="gptq", calib_n=8)
    dq = json.loads(nx.read_kv(reader(tmp_path / "b"))["decode_quantization"])["layers"]
    assert {m["method"] for n, m in dq.items() if n != "text.lm_head"} == {"gptq"}
    assert dq["text.lm_head"]["method"] == "rtn" and dq["text.lm_head"]["format"] == "int4"
    assert not any(mod._forward_pre_hooks or mod._forward_hooks for mod in tiny.model.modules())


def test_reference_model_dispatches_prefill_and_decode_weights(bundles, tiny):
    ref = nx.reference_model(bundles["w8a8-int4"]).model
    lin = ref.text.layers[0].mlp.up_proj
    x = torch.randn(2, 5, 64)
    assert torch.equal(lin(x), lin.prefill(x)) and torch.equal(lin(x[:, :1]), lin.decode(x[:, :1]))
    assert type(lin.prefill).__name__ == "W8A8Linear" and type(lin.decode).__name__ == "WoqActLinear"
    assert type(lin.decode.inner).__name__ == "QuantLinear" and lin.decode.block == 32
    # the decode input is quantized as the engine's weight-only kernels do: int8 per block of 32
    x1 = x[:, :1]
    xq = nx.quantize_activations(x1, 32)
    amax = x1.reshape(2, 1, 2, 32).abs().amax(-1, keepdim=True)
    assert torch.allclose(xq.reshape(2, 1, 2, 32), torch.round(x1.reshape(2, 1, 2, 32) * 127 / amax) * amax / 127)
    assert torch.equal(lin(x1), lin.decode.inner(xq))
    assert torch.equal(nx.quantize_activations(torch.zeros(1, 1, 64), 32), torch.zeros(1, 1, 64))
    # fp32: the reference is the source model itself
    fp = nx.reference_model(bundles["fp32"]).model
    ids = torch.tensor([[1, 5, 3, 7, 9]])
    px = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fp(ids, px), tiny.model(ids, px))


def test_compressed_checkpoint_is_mapped_verbatim(tiny, tmp_path):
    m = copy.deepcopy(tiny.model)
    apply(m, RTNConfig(bits=4, group_size=32))
    lm = LoadedModel(m, tiny.processor, "rtn4")
    export(lm, "native", tmp_path / "b", calib_n=8)
    man = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert any("mapped verbatim" in n for n in man["notes"])
    assert man["artifacts"][0]["precision"] == "int4" and man["artifacts"][0]["lane"] == "cpu"
    r = {t.name: t for t in reader(tmp_path / "b").tensors}
    assert not any(k.startswith("decode.") for k in r)
    sd = state_dict_for_saving(m)
    for k in ("text.layers.0.self_attn.q_proj.qweight", "vision.layers.1.mlp.fc2.qweight", "projector.linear_1.scales"):
        assert np.array_equal(as_numpy(r[k]).view(sd[k].numpy().dtype), sd[k].numpy()), k
    assert "text.lm_head.weight" in r and json.loads(nx.read_kv(reader(tmp_path / "b"))["decode_quantization"]) == {}


def test_w8a8_checkpoint_gets_a_derived_decode_set_and_sparsity_is_kept(tiny, tmp_path):
    m = copy.deepcopy(tiny.model)
    apply(m, MagnitudeConfig(pattern="2:4", include=["text.layers.*"]))
    loop = shapes_forward_loop(tiny.processor, n=8)
    apply(m, W8A8Config(include=["text.layers.*"]), forward_loop=loop)
    save_checkpoint(m, tiny.processor, tmp_path / "ck")
    export(str(tmp_path / "ck"), "native", tmp_path / "b", precision="w8a8-int4")
    man = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert any("dequantized" in n for n in man["notes"])
    assert man["artifacts"][0]["precision"] == "w8a8-int4" and man["artifacts"][0]["lane"] == "npu"
    kv = nx.read_kv(reader(tmp_path / "b"))
    cfg = json.loads(kv["config"])
    assert set(cfg["extras"]["sparsity"]["layers"]) == set(cfg["extras"]["quantization"]["layers"])
    ref = nx.reference_model(tmp_path / "b").model
    dq = json.loads(kv["decode_quantization"])["layers"]
    for name in cfg["extras"]["sparsity"]["layers"]:
        lin = ref.get_submodule(name)
        for w in (lin.prefill.dequantized_weight(), lin.decode.dequantized_weight()):
            assert int((w.reshape(w.shape[0], -1, 4) != 0).sum(-1).max()) <= 2, name
        # a scale per 32 stored values: 64 input positions of a 2:4 layer (32 where 64 does not divide K)
        assert dq[name]["group_size"] == (64 if dq[name]["in_features"] % 64 == 0 else 32), dq[name]
    assert dq["text.lm_head"]["group_size"] == 32
    assert any(dq[n]["group_size"] == 64 for n in cfg["extras"]["sparsity"]["layers"])


def test_f16_float_type_and_vision_w8a8(tiny, tmp_path):
    export(tiny, "native", tmp_path / "b", precision="int8", float_type="f16", vision="w8a8", calib_n=8)
    r = {t.name: t for t in reader(tmp_path / "b").tensors}
    assert r["text.embed_tokens.weight"].tensor_type.name == "F16"
    assert r["vision.layers.0.mlp.fc1.qweight"].tensor_type.name == "I8"  # the ViT went W8A8 too
    dq = json.loads(nx.read_kv(reader(tmp_path / "b"))["decode_quantization"])["layers"]
    assert {(m["format"], m["group_size"]) for m in dq.values()} == {("int8", 64), ("int8", 128)}


@pytest.mark.parametrize("opts, match", [
    ({"precision": "int3"}, "precision"),
    ({"decode": "int2"}, "decode"),
    ({"chunk_size": 0}, "chunk_size"),
    ({"max_context": 100000}, "max_context"),
    ({"group_size": 48}, "group size 48"),
    ({"bogus": 1}, "unknown option"),
])
def test_bad_options_are_one_line_errors_and_leave_nothing(tiny, tmp_path, opts, match):
    with pytest.raises(EdgemmError, match=match):
        export(tiny, "native", tmp_path / "x", calib_n=4, **opts)
    assert not (tmp_path / "x").exists()


def test_reading_bad_files_is_an_error(tmp_path, bundles):
    with pytest.raises(EdgemmError, match="not found"):
        nx.reference_model(tmp_path / "nope.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 10)
    with pytest.raises(EdgemmError, match="GGUF"):
        nx.read_model_file(bad)
    data = (bundles["fp32"] / nx.FILE).read_bytes()
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(EdgemmError):
        nx.read_model_file(trunc)


def test_cli_export_native(tmp_path, demo_tokenizer, capsys):
    m = random_model(cfg32(demo_tokenizer), seed=5)
    save_checkpoint(m, demo_tokenizer, tmp_path / "ck")
    r = subprocess.run([sys.executable, "-m", "edgemm", "export", str(tmp_path / "ck"), "--target", "native",
                        "--precision", "fp32", "-o", str(tmp_path / "b"), "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["artifacts"][0]["file"] == nx.FILE
    from edgemm.cli import main  # the error path in-process (a second interpreter start costs ~30 s here)

    assert main(["export", str(tmp_path / "ck"), "--target", "native", "--precision", "int3", "-o", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err.strip()
    assert "precision 'int3'" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "c").exists()
