"""Core ML export: what Linux can verify.

coremltools on Linux converts and saves the packages and reads them back, but cannot predict (no Core ML
framework). These tests check the saved packages: they load as specs, declare the inputs, outputs and
states the manifest says (iOS 18 spec, stateful KV cache), hold the op kinds and weight types expected
per precision, and compute what torch computes when run op by op through edgemm's MIL interpreter
(float16 after each op): vision encoder, token embedding, and the stateful decoder over several calls
(chunked prefill, then decode steps that continue the state). Core ML's own kernels and compute-unit
placement are not exercised (docs/export-coreml.md). coremltools is required: a missing install fails.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import random_model, tiny_config

import coremltools  # noqa: F401  (fail, not skip, without it)

from edgemm.errors import EdgemmError


def cm_config(**over):
    """tiny_config with widths that are multiples of 32 (coremltools' int4 block)."""
    from edgemm.models.config import TextConfig

    cfg = tiny_config()
    cfg.text = TextConfig(vocab_size=cfg.text.vocab_size, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                          head_dim=16, intermediate_size=96, max_position_embeddings=64, **over)
    return cfg.validate()


def loaded_model(model, tokenizer):
    from edgemm.models.checkpoint import LoadedModel
    from edgemm.processor import Processor

    return LoadedModel(model, Processor(tokenizer, model.config), "tiny-coreml")


@pytest.fixture(scope="module")
def fp16_bundle(tmp_path_factory, demo_tokenizer):
    from edgemm.export import export

    cfg = cm_config()
    cfg.extras["visual_tokens"] = {"method": "fastervlm", "keep": 0.5}
    lm = loaded_model(random_model(cfg, seed=11), demo_tokenizer)
    out = tmp_path_factory.mktemp("cm") / "fp16"
    return lm, out, export(lm, "coreml", out, max_context=48)


@pytest.fixture(scope="module")
def int4_bundle(tmp_path_factory, demo_tokenizer):
    from edgemm.export import export

    lm = loaded_model(random_model(cm_config(), seed=12), demo_tokenizer)
    out = tmp_path_factory.mktemp("cm") / "int4"
    return lm, out, export(lm, "coreml", out, precision="int4", max_context=32)


def _pkg(out, name):
    return out / "coreml" / f"{name}.mlpackage"


# ------------------------------------------------------------------------------------------ fp16


def test_manifest_and_declared_interfaces(fp16_bundle):
    from edgemm.export.bundle import read_manifest
    from edgemm.export.coreml import inspect_package

    lm, out, manifest = fp16_bundle
    cfg = lm.config
    assert read_manifest(out)["artifacts"] == manifest["artifacts"]  # sha256 of every package verified
    arts = {a["role"]: a for a in manifest["artifacts"]}
    assert set(arts) == {"vision_encoder", "embed_tokens", "decoder"}
    for a in arts.values():
        assert a["format"] == "coreml" and a["runtime"] == "coreml" and len(a["sha256"]) == 64 and a["bytes"] > 0
        assert a["extra"]["deployment_target"] == "iOS18"
    assert any("prediction itself needs macOS" in n for n in manifest["notes"])

    k = manifest["num_visual_tokens"]
    assert k == 8  # FasterVLM keeps half of the 16 patches, inside the package
    vis = inspect_package(_pkg(out, "vision_encoder"))
    assert vis["specification_version"] >= 9  # iOS 18
    assert vis["inputs"] == [{"name": "images", "type": "tensor", "dtype": "float32", "shape": [1, 3, 32, 32], "range": None}]
    assert [(o["name"], o["dtype"], o["shape"]) for o in vis["outputs"]] == [("image_embeds", "float16", [1, k, 64])]

    emb = inspect_package(_pkg(out, "token_embedding"))
    (i,) = emb["inputs"]
    assert (i["name"], i["dtype"], i["range"]) == ("input_ids", "int32", [[1, 1], [1, 48]])

    dec = inspect_package(_pkg(out, "text_decoder"))
    names = {f["name"]: f for f in dec["inputs"]}
    assert names["inputs_embeds"]["dtype"] == "float16" and names["inputs_embeds"]["range"] == [[1, 1], [1, 48], [64, 64]]
    assert names["causal_mask"]["range"] == [[1, 1], [1, 1], [1, 48], [1, 48]]
    state_shape = [2, 1, 2, 48, 16]  # layers, batch, kv heads, max_context, head_dim
    assert dec["states"] == [{"name": "key_cache", "type": "state", "dtype": "float16", "shape": state_shape},
                             {"name": "value_cache", "type": "state", "dtype": "float16", "shape": state_shape}]
    assert [(o["name"], o["dtype"]) for o in dec["outputs"]] == [("logits", "float16")]
    ops = dec["functions"]["main"]["ops"]
    assert ops["read_state"] >= 2 and ops["write_state"] >= 2 and ops["slice_update"] >= 2
    assert ops["scaled_dot_product_attention"] == 2 and ops["linear"] == 2 * 7 + 1  # q k v o gate up down, lm_head
    assert dec["linear_weights"] == {"const:float16": 15}  # fp16: no compressed weights
    assert arts["decoder"]["extra"]["states"]["key_cache"][1] == state_shape
    assert arts["decoder"]["extra"]["op_counts"] == ops


def test_interpreted_packages_match_torch(fp16_bundle):
    """vision (token compression included), embedding and the stateful decoder over a chunked prefill and
    decode steps, each within float16 precision of the float32 torch model."""
    from edgemm.export.coreml import MilInterpreter, causal_mask

    lm, out, _ = fp16_bundle
    m = lm.model
    g = torch.Generator().manual_seed(0)
    px = torch.randn(1, 3, 32, 32, generator=g)
    with torch.no_grad():
        ref_img = m.encode_image(px).embeds
    img = MilInterpreter(_pkg(out, "vision_encoder"))(images=px.numpy())["image_embeds"]
    assert img.dtype == np.float16 and img.shape == tuple(ref_img.shape)
    assert np.abs(img.astype(np.float32) - ref_img.numpy()).max() < 2e-2 * ref_img.abs().max().item()

    ids = torch.randint(4, 300, (1, 9), generator=g)
    emb = MilInterpreter(_pkg(out, "token_embedding"))(input_ids=ids.numpy().astype(np.int32))["embeddings"]
    with torch.no_grad():
        ref_emb = m.text.embed_tokens(ids)
    assert np.abs(emb.astype(np.float32) - ref_emb.numpy()).max() < 1e-2 * ref_emb.abs().max().item()

    seq = torch.cat([ref_emb[:, :3], ref_img, ref_emb[:, 3:]], 1)  # [1, 17, 64]
    dec = MilInterpreter(_pkg(out, "text_decoder"))
    past = 0
    for chunk in (seq[:, :10], seq[:, 10:]):  # chunked prefill: the second call continues the state
        t = chunk.shape[1]
        got = dec(inputs_embeds=chunk.numpy().astype(np.float16), causal_mask=causal_mask(past, t))["logits"]
        past += t
        with torch.no_grad():
            ref = m.text(seq[:, :past], torch.arange(past)[None])[:, -1]
        scale = ref.abs().max().item()
        assert np.abs(got.astype(np.float32) - ref.numpy()).max() < 2e-2 * scale, past
    # decode steps (teacher-forced with torch's greedy tokens): logits and greedy choices agree
    for _ in range(5):
        nxt = int(ref.argmax())
        e = m.text.embed_tokens(torch.tensor([[nxt]])).detach()
        seq = torch.cat([seq, e], 1)
        got = dec(inputs_embeds=e.numpy().astype(np.float16), causal_mask=causal_mask(past, 1))["logits"]
        past += 1
        with torch.no_grad():
            ref = m.text(seq, torch.arange(past)[None])[:, -1]
        assert np.abs(got.astype(np.float32) - ref.numpy()).max() < 2e-2 * ref.abs().max().item()
        top2 = ref.topk(2).values[0]
        if (top2[0] - top2[1]).item() > 4e-2 * ref.abs().max().item():  # a clear choice must be the same
            assert int(np.argmax(got)) == int(ref.argmax())
    # a fresh state (a new conversation) gives the first call's logits again
    dec.reset_state()
    got0 = dec(inputs_embeds=seq[:, :10].numpy().astype(np.float16), causal_mask=causal_mask(0, 10))["logits"]
    with torch.no_grad():
        ref0 = m.text(seq[:, :10], torch.arange(10)[None])[:, -1]
    assert np.abs(got0.astype(np.float32) - ref0.numpy()).max() < 2e-2 * ref0.abs().max().item()


# ------------------------------------------------------------------------------------------ int4


def test_int4_weights_are_compressed_and_close(int4_bundle):
    from edgemm.export.coreml import MilInterpreter, causal_mask, inspect_package

    lm, out, manifest = int4_bundle
    arts = {a["role"]: a for a in manifest["artifacts"]}
    assert (arts["decoder"]["precision"], arts["vision_encoder"]["precision"]) == ("int4", "int8")
    dec = inspect_package(_pkg(out, "text_decoder"))
    vis = inspect_package(_pkg(out, "vision_encoder"))
    assert dec["linear_weights"] == {"constexpr_blockwise_shift_scale:int4": 15}
    n_linear = vis["functions"]["main"]["ops"]["linear"]
    assert n_linear >= 2 * 6 + 2  # two ViT layers to the feature layer (q k v o fc1 fc2), the projector
    assert vis["linear_weights"] == {"constexpr_blockwise_shift_scale:int8": n_linear}  # every one int8
    assert not any("stay float16" in n for n in manifest["notes"])
    # the package computes the model with its own (int4) weights: a torch copy holding the weights the
    # package decompresses to gives the same logits (float16 precision), and it differs from the float model
    import copy

    m = lm.model
    it = MilInterpreter(_pkg(out, "text_decoder"))
    wq = it.constexpr_values()
    q = copy.deepcopy(m)
    params = dict(q.text.named_parameters())
    n_set = 0
    for name, w in wq.items():
        key = name.removeprefix("text_").removesuffix("_to_fp16_quantized")
        match = [p for n, p in params.items() if n.replace(".", "_") == key]
        assert len(match) == 1, name
        with torch.no_grad():
            match[0].copy_(torch.from_numpy(w))
        n_set += 1
    assert n_set == 15
    e = m.text.embed_tokens(torch.randint(4, 300, (1, 12), generator=torch.Generator().manual_seed(2))).detach()
    got = it(inputs_embeds=e.numpy().astype(np.float16), causal_mask=causal_mask(0, 12))["logits"].astype(np.float32)
    with torch.no_grad():
        ref_q = q.text(e, torch.arange(12)[None])[:, -1].numpy()
        ref_f = m.text(e, torch.arange(12)[None])[:, -1].numpy()
    assert np.abs(got - ref_q).max() < 2e-2 * np.abs(ref_q).max()
    assert np.abs(ref_q - ref_f).max() > 1e-2 * np.abs(ref_f).max()  # int4 rounding is really there
    w_f = m.text.layers[0].mlp.up_proj.weight.detach().numpy()
    w_q = wq["text_layers_0_mlp_up_proj_weight_to_fp16_quantized"]
    assert 0 < np.abs(w_q - w_f).max() <= 0.5 * np.abs(w_f).max() / 7 * 1.01  # half an int4 step of the block max
    fp16_bytes = 2 * sum(p.numel() for n, p in m.text.named_parameters() if n != "embed_tokens.weight")
    blob = _pkg(out, "text_decoder") / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    assert blob.stat().st_size < 0.35 * fp16_bytes  # int4 codes + a float16 scale per 32 (~0.28 of float16)


def test_unquantizable_widths_are_noted(tmp_path, demo_tokenizer):
    """tiny_config's decoder widths (48, 80) are not multiples of 32: coremltools leaves those layers
    float16, and the bundle says so instead of claiming int4 weights it does not hold."""
    from edgemm.export import export

    lm = loaded_model(random_model(tiny_config(), seed=3), demo_tokenizer)
    m = export(lm, "coreml", tmp_path / "b", precision="int4", max_context=16)
    assert any("text_decoder stay float16" in n for n in m["notes"])
    dec = next(a for a in m["artifacts"] if a["role"] == "decoder")
    assert dec["extra"]["linear_weights"].get("const:float16", 0) > 0


def test_options_are_checked(demo_tokenizer, tmp_path):
    from edgemm.export import export
    from edgemm.export.coreml import prepare

    lm = loaded_model(random_model(cm_config(), seed=1), demo_tokenizer)
    with pytest.raises(EdgemmError, match="unknown coreml precision"):
        export(lm, "coreml", tmp_path / "a", precision="int3")
    with pytest.raises(EdgemmError, match="unknown coreml export option"):
        export(lm, "coreml", tmp_path / "b", bogus=1)
    with pytest.raises(EdgemmError, match="max_context"):
        prepare(lm.model, max_context=4096)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
