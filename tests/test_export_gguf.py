"""GGUF export (export/gguf.py) run in llama.cpp through llama-cpp-python (runtimes/llamacpp_runtime.py),
checked against the torch reference.

These tests need llama-cpp-python (the `llamacpp` extra): without it they FAIL, they do not skip.
llama.cpp runs with 1 thread here: a test of a 100k-parameter model gains nothing from 2.
"""

import copy
import os

import numpy as np
import pytest
import torch

from conftest import random_model, tiny_config
from edgemm import runtimes
from edgemm.data import AGREEMENT, load_dataset
from edgemm.errors import EdgemmError
from edgemm.export import export
from edgemm.models.checkpoint import LoadedModel
from edgemm.models.config import TextConfig, VisionConfig, VLMConfig
from edgemm.processor import Processor

pytestmark = pytest.mark.llamacpp

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the adapter does, before llama.cpp's libgomp loads

try:
    import llama_cpp  # noqa: F401

    LLAMACPP_ERROR = None
except ImportError as e:  # pragma: no cover - CI installs the extra
    LLAMACPP_ERROR = str(e)


@pytest.fixture(autouse=True)
def _need_llamacpp():
    if LLAMACPP_ERROR is not None:
        pytest.fail(f"llama-cpp-python is not installed ({LLAMACPP_ERROR}): pip install 'edgemm[llamacpp]'")


def loaded(model, tok, name="tiny"):
    return LoadedModel(model, Processor(tok, model.config), name)


def cfg32(tok, **over):
    """A tiny config whose matmul widths are multiples of 32 (Q8_0 / Q4_0 blocks)."""
    vision = VisionConfig(image_size=32, patch_size=8, hidden_size=64, num_layers=3, num_heads=4, intermediate_size=128)
    text = TextConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=16, intermediate_size=96, max_position_embeddings=160)
    cfg = VLMConfig(vision=vision, text=text)
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg.validate()


def open_llama(path, **kw):
    return runtimes.load(path, runtime="llamacpp", threads=1, **kw)


@pytest.fixture(scope="module")
def tiny(demo_tokenizer):
    return loaded(random_model(cfg32(demo_tokenizer), seed=1), demo_tokenizer)


@pytest.fixture(scope="module")
def bundles(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    return {p: (export(tiny, "gguf", root / p, precision=p), root / p) for p in ("f16", "q8_0", "q4_0")}


@pytest.fixture(scope="module")
def sessions(bundles):
    out = {p: open_llama(path) for p, (_, path) in bundles.items()}
    yield out
    for s in out.values():
        s.close()


@pytest.fixture(scope="module")
def questions():
    ds = load_dataset("shapes:6:5")
    ims = [np.asarray(ds.image(r).resize((32, 32))) for r in ds.records]
    return ims, [r.question for r in ds.records]


def torch_logits(lm, image, q):
    ids, mask = lm.processor.batch([q], with_image=image is not None)
    px = torch.from_numpy(lm.processor.images([image])) if image is not None else None
    with torch.no_grad():
        return lm.model(torch.from_numpy(ids), px, torch.from_numpy(mask))[0, -1].numpy()


def torch_greedy(lm, image, q, n=8):
    ids, mask = lm.processor.batch([q], with_image=image is not None)
    px = torch.from_numpy(lm.processor.images([image])) if image is not None else None
    from edgemm.models.generation import SamplingConfig, generate

    return generate(lm.model, torch.from_numpy(ids), px, torch.from_numpy(mask), SamplingConfig(max_new_tokens=n)).tokens[0]


def torch_embeds(lm, image):
    px = torch.from_numpy(lm.processor.images([image]))
    with torch.no_grad():
        return lm.model.encode_image(px).embeds[0].numpy()


# ------------------------------------------------------------------------------------- layout


def test_bundle_layout_and_metadata(bundles, tiny):
    import gguf

    man, root = bundles["f16"]
    arts = {a["role"]: a for a in man["artifacts"]}
    assert set(arts) == {"text_model", "mmproj"}
    for a in arts.values():
        assert a["format"] == "gguf" and a["runtime"] == "llamacpp" and a["lane"] == "cpu" and len(a["sha256"]) == 64
    r = gguf.GGUFReader(str(root / arts["text_model"]["file"]))
    kv = {f.name: f for f in r.fields.values()}
    assert bytes(kv["general.architecture"].parts[-1]).decode() == "llama"
    assert bytes(kv["tokenizer.ggml.model"].parts[-1]).decode() == "gpt2"
    assert bytes(kv["tokenizer.ggml.pre"].parts[-1]).decode() == "gpt-2"
    assert int(kv["llama.rope.dimension_count"].parts[-1][0]) == tiny.config.text.head_dim
    toks = [bytes(kv["tokenizer.ggml.tokens"].parts[i]).decode() for i in kv["tokenizer.ggml.tokens"].data]
    assert len(toks) == len(set(toks)) == tiny.config.text.vocab_size
    m = gguf.GGUFReader(str(root / arts["mmproj"]["file"]))
    mk = {f.name: f for f in m.fields.values()}
    assert bytes(mk["general.architecture"].parts[-1]).decode() == "clip"
    assert bytes(mk["clip.projector_type"].parts[-1]).decode() == "mlp"
    # only the blocks that produce the features are stored; the feature layer is explicit
    nrun = tiny.config.feature_layer_index
    assert int(mk["clip.vision.block_count"].parts[-1][0]) == nrun == 2
    assert int(mk["clip.vision.feature_layer"].parts[-1][0]) == nrun
    names = {t.name for t in m.tensors}
    assert "v.class_embd" in names and f"v.blk.{nrun - 1}.attn_q.weight" in names and f"v.blk.{nrun}.attn_q.weight" not in names
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(bundles["q4_0"][1] / "edgevlm-q4_0.gguf")).tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["output.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert any("quantized by gguf-py" in n for n in bundles["q4_0"][0]["notes"])


# ------------------------------------------------------------------------------------ tokenizer


ODD = ["What color is the   circle?", "how many\n\nshapes?", "Ünïcödé — ok? 日本語 ✓", "digits 12345 and 3.14",
       "trailing space ", "  leading", "tabs\tand\r\nCRLF", "it's they're we'll I'd", "</s> is eos", "a" * 300, "?!..,;:"]


def test_llamacpp_tokenizes_like_edgemm(sessions, tiny):
    s = sessions["f16"]
    qs = [r.question for r in load_dataset(AGREEMENT).records] + ODD
    img = np.zeros((32, 32, 3), np.uint8)
    for q in qs:
        assert s.prompt_ids(None, q) == tiny.processor.encode_prompt(q, with_image=False), q
    for q in qs[:20] + ODD:
        assert s.prompt_ids(img, q) == tiny.processor.encode_prompt(q, with_image=True), q


def test_llamacpp_detokenizes_like_edgemm(sessions, tiny):
    s = sessions["f16"]
    rng = np.random.default_rng(0)
    n = tiny.processor.tokenizer.get_vocab_size()
    for _ in range(50):
        ids = [int(x) for x in rng.integers(4, n, size=int(rng.integers(1, 12)))]
        ours = b"".join(s.piece(t) for t in ids).decode("utf-8", "replace").strip()
        assert ours == tiny.processor.decode(ids), ids


# ------------------------------------------------------------------------------- vision encoder


def test_image_embeddings_match_torch_with_cls_fix(sessions, tiny, questions):
    s = sessions["f16"]
    for img in questions[0][:3]:
        ref = torch_embeds(tiny, img)
        got = s.encode_image(img)
        assert got.shape == ref.shape == (tiny.config.vision.num_patches, tiny.config.text.hidden_size)
        assert np.abs(got - ref).max() < 0.02 * np.abs(ref).max(), np.abs(got - ref).max()
    assert s.cls_fix.layout in ("cls-last", "cls-first")


def test_cls_bug_25814_is_detected_and_matters(bundles, tiny, questions):
    """With the fix off, llama.cpp builds that append [CLS] last give visibly wrong visual tokens."""
    s = open_llama(bundles["f16"][1], cls_fix=False)
    try:
        img = questions[0][0]
        ref = torch_embeds(tiny, img)
        got = s.encode_image(img)
        if s.cls_fix.layout == "cls-last":  # the llama-cpp-python 0.3.36 build: bug present
            assert s.cls_fix.fixes == 0
            assert np.abs(got - ref).max() > 0.2 * np.abs(ref).max()
            # exactly what the buggy graph computes: [p0..p_{P-1}, CLS] + pos[0..P], rows 1..P kept
            m = tiny.model
            with torch.no_grad():
                px = torch.from_numpy(tiny.processor.images([img]))
                v = m.vision
                x = torch.cat([v.patch_embed(v.patchify(px)), v.class_embedding.expand(1, 1, -1)], 1) + v.position_embedding
                for i in range(tiny.config.feature_layer_index):
                    x, _ = v.layers[i](x)
                buggy = m.projector(x[:, 1:])[0].numpy()
            assert np.abs(got - buggy).max() < 0.02 * np.abs(buggy).max()
        else:  # a fixed build: nothing to correct
            assert s.cls_fix.layout == "cls-first"
            assert np.abs(got - ref).max() < 0.02 * np.abs(ref).max()
    finally:
        s.close()


VISION_VARIANTS = [
    dict(vision_feature_layer=-1),
    dict(vision_feature_layer=1),
    dict(vision_feature_layer=0),
    dict(vision={"pre_layernorm": True, "patch_bias": False, "hidden_act": "quick_gelu"}),
    dict(vision={"hidden_act": "gelu_tanh", "intermediate_size": 64}),  # ffn == hidden: padded, no up/down swap
    dict(vision={"hidden_act": "silu"}, projector={"bias": False, "hidden_act": "gelu_tanh"}),
]


@pytest.mark.parametrize("over", VISION_VARIANTS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_vision_variants_match_torch(over, demo_tokenizer, tmp_path, questions):
    cfg = cfg32(demo_tokenizer)
    for k, v in over.items():
        if isinstance(v, dict):
            for kk, vv in v.items():
                setattr(getattr(cfg, k), kk, vv)
        else:
            setattr(cfg, k, v)
    cfg.validate()
    lm = loaded(random_model(cfg, seed=3), demo_tokenizer)
    export(lm, "gguf", tmp_path / "b")
    s = open_llama(tmp_path / "b")
    try:
        for img in questions[0][:2]:
            ref = torch_embeds(lm, img)
            got = s.encode_image(img)
            assert np.abs(got - ref).max() < 0.02 * np.abs(ref).max(), (over, np.abs(got - ref).max())
        q = questions[1][0]
        assert s.generate(questions[0][0], q, max_new_tokens=6) is not None
        assert s.last_tokens == torch_greedy(lm, questions[0][0], q, 6)[: len(s.last_tokens)]
    finally:
        s.close()


# --------------------------------------------------------------------------------- text model


def test_f16_logits_and_greedy_match_torch(sessions, tiny, questions):
    s = sessions["f16"]
    ims, qs = questions
    for img, q in [(None, qs[0]), (None, qs[1]), (ims[0], qs[0]), (ims[1], qs[2]), (ims[2], qs[3])]:
        ref = torch_logits(tiny, img, q)
        got = s.prompt_logits(img, q)
        assert np.abs(got - ref).max() < 0.02 * np.abs(ref).max() + 0.01, np.abs(got - ref).max()
        assert np.corrcoef(got, ref)[0, 1] > 0.9999
        s.generate(img, q, max_new_tokens=8)
        assert s.last_tokens == torch_greedy(tiny, img, q, 8), q
        assert len(s.prompt_tokens) == len(tiny.processor.encode_prompt(q, img is not None)) + (
            tiny.config.vision.num_patches - 1 if img is not None else 0)


def test_unpermuted_qk_gives_wrong_logits(tiny, tmp_path, questions):
    """The Q/K row interleave is needed: without it llama.cpp's RoPE rotates the wrong pairs."""
    from edgemm.export.gguf import write_text_gguf

    export(tiny, "gguf", tmp_path / "b")
    write_text_gguf(tmp_path / "b" / "edgevlm-f16.gguf", tiny, "f16", permute_qk=False)
    from edgemm.export.bundle import read_manifest

    man = read_manifest(tmp_path / "b", verify=False)
    s = runtimes._adapter("llamacpp").open_bundle(tmp_path / "b", man, threads=1)
    try:
        q = questions[1][0]
        ref = torch_logits(tiny, None, q)
        got = s.prompt_logits(None, q)
        assert np.abs(got - ref).max() > 0.1 * np.abs(ref).max()
    finally:
        s.close()


def _dequantized_copy(lm, path):
    """The torch model with its text weights replaced by what the GGUF file holds (dequantized, Q/K
    rows back in rotate-half order): the reference for quantized files."""
    import gguf

    from edgemm.export.gguf import permute_rope

    r = gguf.GGUFReader(str(path))
    t = {x.name: gguf.quants.dequantize(x.data, x.tensor_type).reshape([int(d) for d in reversed(x.shape)]) for x in r.tensors}
    m = copy.deepcopy(lm.model)
    c = lm.config.text

    def unperm(w, heads):
        d = w.shape[0] // heads
        return w.reshape(heads, d // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)

    assert np.array_equal(unperm(permute_rope(np.arange(32.0).reshape(8, 4), 2), 2), np.arange(32.0).reshape(8, 4))
    with torch.no_grad():
        m.text.embed_tokens.weight.copy_(torch.from_numpy(t["token_embd.weight"]))
        m.text.lm_head.weight.copy_(torch.from_numpy(t["output.weight"]))
        for i, layer in enumerate(m.text.layers):
            a, f = layer.self_attn, layer.mlp
            a.q_proj.weight.copy_(torch.from_numpy(unperm(t[f"blk.{i}.attn_q.weight"], c.num_heads)))
            a.k_proj.weight.copy_(torch.from_numpy(unperm(t[f"blk.{i}.attn_k.weight"], c.num_kv_heads)))
            for n, mod in (("attn_v", a.v_proj), ("attn_output", a.o_proj), ("ffn_gate", f.gate_proj),
                           ("ffn_up", f.up_proj), ("ffn_down", f.down_proj)):
                mod.weight.copy_(torch.from_numpy(t[f"blk.{i}.{n}.weight"]))
    return loaded(m, lm.processor.tokenizer)


@pytest.mark.parametrize("prec", ["q8_0", "q4_0"])
def test_quantized_files_load_answer_and_compute_what_they_hold(prec, sessions, bundles, tiny, questions):
    s = sessions[prec]
    ref_lm = _dequantized_copy(tiny, bundles[prec][1] / f"edgevlm-{prec}.gguf")
    ims, qs = questions
    for img, q in [(None, qs[0]), (ims[0], qs[1])]:
        out = s.generate(img, q, max_new_tokens=6)
        assert isinstance(out, str) and s.stats["decode_tokens"] >= 0 and len(s.last_tokens) >= 1
        got = s.prompt_logits(img, q)
        ref = torch_logits(ref_lm, img, q)
        # llama.cpp also quantizes the activations to 8 bits for Q8_0/Q4_0 dot products: close, not exact
        assert np.corrcoef(got, ref)[0, 1] > 0.999, (prec, np.corrcoef(got, ref)[0, 1])
        assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()
        assert np.corrcoef(got, torch_logits(tiny, img, q))[0, 1] > (0.99 if prec == "q8_0" else 0.9)


@pytest.mark.parametrize("mp,tol", [("f32", 0.02), ("q8_0", 0.05)])
def test_mmproj_precisions(mp, tol, tiny, tmp_path, questions):
    man = export(tiny, "gguf", tmp_path / "b", mmproj_precision=mp)
    assert {a["role"]: a["precision"] for a in man["artifacts"]}["mmproj"] == mp
    s = open_llama(tmp_path / "b")
    try:
        img = questions[0][0]
        ref, got = torch_embeds(tiny, img), s.encode_image(img)
        assert np.abs(got - ref).max() < tol * np.abs(ref).max()
    finally:
        s.close()


@pytest.mark.parametrize("bits,expect", [(8, "q8_0"), (4, "q4_0")])
def test_packed_int_layers_map_bit_exactly(bits, expect, demo_tokenizer, tmp_path, questions):
    import gguf

    from edgemm.compress.rtn import RTNConfig, rtn_quantize
    from edgemm.export.gguf import permute_rope

    lm = loaded(random_model(cfg32(demo_tokenizer), seed=5), demo_tokenizer)
    rtn_quantize(lm.model, RTNConfig(bits=bits, group_size=32, symmetric=True))  # every Linear but lm_head
    man = export(lm, "gguf", tmp_path / "b")  # precisions chosen automatically: the types that hold the codes
    assert [a["precision"] for a in man["artifacts"]] == [expect, expect]
    assert any(f"14 int{bits}->{expect.upper()}" in n for n in man["notes"]), man["notes"]
    # mmproj: 2 blocks x 6 layers + 2 projector layers mapped; the patch embedding (a conv kernel) is F16
    assert any(f"mmproj-{expect}.gguf: 14 packed edgemm layers mapped" in n for n in man["notes"]), man["notes"]
    assert any("vision.patch_embed" in n and "dequantized" in n for n in man["notes"]), man["notes"]
    mm = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "b" / f"mmproj-{expect}.gguf")).tensors}
    for name, mod in (("v.blk.1.attn_v.weight", lm.model.vision.layers[1].self_attn.v_proj), ("mm.2.weight", lm.model.projector.linear_2)):
        t = mm[name]
        assert t.tensor_type.name == expect.upper()
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(mod.out_features, mod.in_features)
        assert np.array_equal(w, mod.dequantized_weight().numpy()), name
    r = gguf.GGUFReader(str(tmp_path / "b" / f"edgevlm-{expect}.gguf"))
    tensors = {t.name: t for t in r.tensors}
    c = lm.config.text
    for i, layer in enumerate(lm.model.text.layers):
        for name, mod, heads in (("attn_q", layer.self_attn.q_proj, c.num_heads), ("attn_k", layer.self_attn.k_proj, c.num_kv_heads),
                                 ("ffn_down", layer.mlp.down_proj, None)):
            t = tensors[f"blk.{i}.{name}.weight"]
            assert t.tensor_type.name == expect.upper()
            w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(mod.out_features, mod.in_features)
            ref = mod.dequantized_weight().numpy()
            if heads:
                ref = permute_rope(ref, heads)
            assert np.array_equal(w, ref), (i, name)  # the same numbers, not re-quantized
    s = open_llama(tmp_path / "b")
    try:
        ims, qs = questions
        ref = torch_embeds(lm, ims[0])
        assert np.abs(s.encode_image(ims[0]) - ref).max() < 0.05 * np.abs(ref).max()
        for img, q in [(None, qs[0]), (ims[0], qs[1])]:
            got, ref = s.prompt_logits(img, q), torch_logits(lm, img, q)
            assert np.corrcoef(got, ref)[0, 1] > 0.995
    finally:
        s.close()


# ---------------------------------------------------------------------------- session behaviour


def test_streaming_stats_and_sampling(sessions, questions):
    s = sessions["f16"]
    ims, qs = questions
    full = s.generate(ims[0], qs[0], max_new_tokens=8)
    pieces = list(s.generate(ims[0], qs[0], stream=True, max_new_tokens=8))
    assert "".join(pieces).strip() == full
    st = s.stats
    for k in ("image_encode_ms", "prefill_ms", "prefill_tokens", "prefill_tok_s", "decode_ms", "decode_tokens", "decode_tok_s", "ttft_ms"):
        assert k in st
    assert st["image_encode_ms"] > 0 and st["prefill_ms"] > 0 and st["ttft_ms"] >= st["image_encode_ms"]
    assert st["prefill_tokens"] == len(s.prompt_tokens)
    a = s.generate(ims[0], qs[0], max_new_tokens=8, temperature=1.0, seed=7)
    b = s.generate(ims[0], qs[0], max_new_tokens=8, temperature=1.0, seed=7)
    assert a == b
    assert s.generate(ims[0], qs[0], max_new_tokens=8, temperature=0.7, top_k=1, seed=3) == full
    t = s.generate(None, qs[1], max_new_tokens=4)
    assert isinstance(t, str)
    with pytest.raises(EdgemmError, match="exceeds the context"):
        s.generate(ims[0], qs[0], max_new_tokens=1000)


def test_refuses_what_llamacpp_cannot_represent(demo_tokenizer, tmp_path):
    full = loaded(random_model(cfg32(demo_tokenizer, vision_feature_select="full")), demo_tokenizer)
    with pytest.raises(EdgemmError, match="vision_feature_select 'full'"):
        export(full, "gguf", tmp_path / "a")
    assert not (tmp_path / "a").exists()
    cfg = cfg32(demo_tokenizer)
    cfg.projector.hidden_act = "silu"
    with pytest.raises(EdgemmError, match="projector activation"):
        export(loaded(random_model(cfg.validate()), demo_tokenizer), "gguf", tmp_path / "b")
    cfg = cfg32(demo_tokenizer)
    cfg.extras["visual_tokens"] = {"method": "fastervlm", "keep": 0.25}
    with pytest.raises(EdgemmError, match="fastervlm.*CLS"):
        export(loaded(random_model(cfg), demo_tokenizer), "gguf", tmp_path / "c")
    with pytest.raises(EdgemmError, match="precision"):
        export(loaded(random_model(cfg32(demo_tokenizer)), demo_tokenizer), "gguf", tmp_path / "d", precision="q5_k")
    # a word-level tokenizer (as in the HF-import tests) has no llama.cpp equivalent that tokenizes alike
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<s>", "</s>", "<image>", "what", "color", "?"]
    wl = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    wl.add_special_tokens(words[:4])
    with pytest.raises(EdgemmError, match="only byte-level BPE"):
        export(loaded(random_model(cfg32(demo_tokenizer)), wl), "gguf", tmp_path / "e")
    assert not any((tmp_path / n).exists() for n in "abcde")


@pytest.mark.parametrize("method,keep", [("divprune", 0.25), ("random", 5)])
def test_embedding_level_token_compression_matches_torch(method, keep, demo_tokenizer, tmp_path, questions):
    cfg = cfg32(demo_tokenizer)
    cfg.extras["visual_tokens"] = {"method": method, "keep": keep}
    lm = loaded(random_model(cfg, seed=2), demo_tokenizer)
    man = export(lm, "gguf", tmp_path / "b")
    assert man["visual_tokens"]["method"] == method and any("adapter applies it" in n for n in man["notes"])
    s = open_llama(tmp_path / "b")
    try:
        for img in questions[0][:3]:
            px = torch.from_numpy(lm.processor.images([img]))
            with torch.no_grad():
                feats = lm.model.encode_image(px)
            got = s.encode_image(img)
            assert got.shape == feats.embeds[0].shape == (man["num_visual_tokens"], cfg.text.hidden_size)
            assert np.abs(got - feats.embeds[0].numpy()).max() < 0.02 * feats.embeds.abs().max().item()
        q = questions[1][0]
        s.generate(questions[0][0], q, max_new_tokens=6)
        assert s.last_tokens == torch_greedy(lm, questions[0][0], q, 6)
        assert s.stats["prefill_tokens"] == len(lm.processor.encode_prompt(q)) - 1 + man["num_visual_tokens"]
    finally:
        s.close()


def test_cli_export_run_eval(tiny, tmp_path):
    from edgemm.cli import main
    from edgemm.models.checkpoint import save_checkpoint

    ck = save_checkpoint(tiny.model, tiny.processor.tokenizer, tmp_path / "ck")
    assert main(["export", str(ck), "--target", "gguf", "-o", str(tmp_path / "b"), "--precision", "q8_0", "--json"]) in (0, None)
    assert (tmp_path / "b" / "edgevlm-q8_0.gguf").is_file()
    assert main(["eval", str(tmp_path / "b"), "--data", "shapes:4:3", "--runtime", "llamacpp", "--threads", "1",
                 "--predictions", str(tmp_path / "p.jsonl"), "--json"]) in (0, None)
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 4


# ------------------------------------------------------------------------------------ the demo


def test_demo_model_agrees_with_torch(tmp_path):
    """The trained demo model: F16 greedy answers equal torch's on 24 agreement questions (the full
    200-question measurement is in docs/export-gguf.md)."""
    from edgemm.models import builtin_path, load_model

    assert (builtin_path("demo") / "config.json").is_file(), "the shipped demo model is missing (edgemm train-demo)"
    lm = load_model("demo")
    export(lm, "gguf", tmp_path / "demo")
    s = open_llama(tmp_path / "demo")
    ts = runtimes.load(lm)
    ds = load_dataset(AGREEMENT, 24)
    try:
        ims, qs = [ds.image(r) for r in ds.records], [r.question for r in ds.records]
        assert s.generate_batch(ims, qs, max_new_tokens=8) == ts.generate_batch(ims, qs, max_new_tokens=8)
    finally:
        s.close()
