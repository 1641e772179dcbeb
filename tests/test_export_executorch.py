"""ExecuTorch export: the .pte runs in ExecuTorch's own runtime (executorch.runtime) and agrees with torch.

Two programs are lowered once per module (tiny random EdgeVLMs; lowering is the slow part):
- fp32, with FasterVLM visual-token compression inside vision_encoder: methods within 1e-4 of the
  torch reference, greedy and sampled answers equal to the torch runtime's;
- 8da4w on a model whose MLPs carry edgemm's own int4 codes (mapped verbatim), one asymmetric layer
  (re-quantized), the rest quantized by torchao, tied embeddings: the program agrees with its eager
  quantized copy (same numbers) and stays near the float model.
executorch is required: a missing install fails these tests.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import random_model, tiny_config

import executorch  # noqa: F401  (fail, not skip, without it)

from edgemm.errors import EdgemmError


def et_config(**over):
    """tiny_config with XNNPACK-friendly widths (int4 groups must be multiples of 32)."""
    from edgemm.models.config import TextConfig

    cfg = tiny_config()
    cfg.text = TextConfig(vocab_size=cfg.text.vocab_size, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                          head_dim=16, intermediate_size=96, max_position_embeddings=96, **over)
    return cfg.validate()


def loaded_model(model, tokenizer):
    from edgemm.models.checkpoint import LoadedModel
    from edgemm.processor import Processor

    return LoadedModel(model, Processor(tokenizer, model.config), "tiny-et")


def program(bundle):
    from edgemm.runtimes.executorch_runtime import _runtime

    return _runtime().load_program(bundle / "model.pte")


@pytest.fixture(scope="module")
def fp32_bundle(tmp_path_factory, demo_tokenizer):
    from edgemm.export import export

    cfg = et_config()
    cfg.extras["visual_tokens"] = {"method": "fastervlm", "keep": 0.5}
    lm = loaded_model(random_model(cfg, seed=1), demo_tokenizer)
    out = tmp_path_factory.mktemp("et") / "fp32"
    manifest = export(lm, "executorch", out)
    return lm, out, manifest


@pytest.fixture(scope="module")
def q4_bundle(tmp_path_factory, demo_tokenizer):
    from edgemm.compress.common import set_module
    from edgemm.compress.rtn import quantize_linear_rtn
    from edgemm.export import export

    model = random_model(et_config(tie_word_embeddings=True), seed=2)
    model.text.lm_head.weight = model.text.embed_tokens.weight
    for i, layer in enumerate(model.text.layers):
        for name in ("gate_proj", "up_proj", "down_proj"):
            lin = getattr(layer.mlp, name)
            sym = not (i == 1 and name == "down_proj")  # one asymmetric layer: no XNNPACK type, re-quantized
            set_module(model, f"text.layers.{i}.mlp.{name}", quantize_linear_rtn(lin, 4, 32, sym))
    lm = loaded_model(model.eval(), demo_tokenizer)
    out = tmp_path_factory.mktemp("et") / "q4"
    manifest = export(lm, "executorch", out, precision="8da4w")
    return lm, out, manifest


def shapes(n, seed=778):
    from edgemm.data import load_dataset

    return load_dataset(f"shapes:{n}:{seed}")


# ------------------------------------------------------------------------------------------- units


def test_stable_sort_is_torch_stable_sort():
    from edgemm.export.executorch import _sort_free_mode, stable_sort

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5, (3, 17), generator=g).float()  # many ties
    for desc in (False, True):
        ref = torch.sort(x, dim=-1, descending=desc, stable=True)
        got = stable_sort(x, -1, desc)
        assert torch.equal(ref.values, got.values) and torch.equal(ref.indices, got.indices)
    ref = torch.sort(x, dim=0, descending=True, stable=True)
    assert torch.equal(stable_sort(x, 0, True).indices, ref.indices)
    with _sort_free_mode():  # the export-time mode routes every spelling through stable_sort
        a = x.sort(dim=-1, descending=True, stable=True).indices
        b = torch.sort(x, stable=True, dim=-1, descending=True).indices
        c = x.argsort(dim=-1)
    assert torch.equal(a, torch.sort(x, stable=True, dim=-1, descending=True).indices) and torch.equal(a, b)
    assert torch.equal(c, torch.sort(x, stable=True, dim=-1).indices)


def test_options_are_checked(demo_tokenizer):
    from edgemm.export.executorch import prepare, write

    m = random_model(et_config())
    with pytest.raises(EdgemmError, match="precision"):
        prepare(m, precision="int3")
    with pytest.raises(EdgemmError, match="multiple of 32"):
        prepare(m, precision="8da4w", group_size=16)
    with pytest.raises(EdgemmError, match="max_context"):
        prepare(m, max_context=4096)
    with pytest.raises(EdgemmError, match="unknown executorch export option"):
        write(None, loaded_model(m, demo_tokenizer), bogus=1)


def test_static_kv_decoder_is_the_reference_decoder():
    """The export wrapper (static cache, custom ops, XNNPACK-friendly rewrites) in eager torch."""
    from edgemm.export.executorch import prepare

    m = random_model(et_config(), seed=3)
    dec = prepare(m)["text_decoder"]
    g = torch.Generator().manual_seed(0)
    e = torch.randn(1, 12, 64, generator=g)
    with torch.no_grad():
        ref = m.text(e, torch.arange(12)[None])[:, -1]
        dec(e[:, :9], torch.tensor([0]))
        got = dec(e[:, 9:], torch.tensor([9]))  # continues the cache written by the first call
    assert (got - ref).abs().max() < 1e-4


# ------------------------------------------------------------------------------------------- fp32


def test_bundle_layout(fp32_bundle):
    lm, out, manifest = fp32_bundle
    (art,) = manifest["artifacts"]
    assert (art["file"], art["role"], art["format"], art["precision"], art["runtime"]) == \
        ("model.pte", "program", "executorch", "fp32", "executorch")
    assert manifest["num_visual_tokens"] == 8 and manifest["visual_tokens"]["method"] == "fastervlm"
    assert art["extra"]["methods"]["vision_encoder"]["outputs"]["image_embeds"][1] == [1, 8, 64]
    d = art["extra"]["delegation"]
    assert d["vision_encoder"]["xnnpack_delegates"] >= 1 and d["text_decoder"]["xnnpack_delegates"] >= 1
    assert d["text_decoder"]["portable_ops"]["custom_sdpa"] == 2  # one per layer, outside XNNPACK
    prog = program(out)
    assert {"vision_encoder", "token_embedding", "text_decoder"} <= prog.method_names
    meta = {k: prog.load_method(k).execute([]) for k in ("get_max_seq_len", "get_max_context_len", "get_vocab_size",
                                                         "get_bos_id", "get_eos_ids", "use_kv_cache", "enable_dynamic_shape")}
    cfg = lm.config
    assert meta == {"get_max_seq_len": [96], "get_max_context_len": [96], "get_vocab_size": [cfg.text.vocab_size],
                    "get_bos_id": [cfg.bos_token_id], "get_eos_ids": [cfg.eos_token_id], "use_kv_cache": [True],
                    "enable_dynamic_shape": [True]}
    m = prog.metadata("text_decoder")
    assert m.num_inputs() == 2 and m.num_outputs() == 1


def test_fp32_methods_match_torch(fp32_bundle):
    lm, out, _ = fp32_bundle
    model = lm.model
    prog = program(out)
    vis, emb, dec = (prog.load_method(n) for n in ("vision_encoder", "token_embedding", "text_decoder"))
    g = torch.Generator().manual_seed(0)
    px = torch.randn(1, 3, 32, 32, generator=g)
    ids = torch.randint(4, 300, (1, 11), generator=g)
    with torch.no_grad():
        img_ref = model.encode_image(px).embeds
        img = vis.execute([px])[0]
        assert img.shape == img_ref.shape == (1, 8, 64)  # FasterVLM kept 8 of 16 patches
        assert (img - img_ref).abs().max() < 1e-4
        e = emb.execute([ids])[0]
        assert torch.equal(e, model.text.embed_tokens(ids))
        seq = torch.cat([e[:, :4], img_ref, e[:, 4:]], 1)
        ref = model.text(seq, torch.arange(seq.shape[1])[None])[:, -1]
        got = dec.execute([seq, torch.tensor([0])])[0]
        assert got.shape == (1, model.config.text.vocab_size) and (got - ref).abs().max() < 1e-4
        pos = seq.shape[1]
        for step in range(6):  # decode steps; other methods run in between (they must not touch the cache)
            vis.execute([torch.randn(1, 3, 32, 32, generator=g)])
            emb.execute([torch.randint(4, 300, (1, 40), generator=g)])
            t = emb.execute([torch.tensor([[10 + step]])])[0]
            seq = torch.cat([seq, t], 1)
            ref = model.text(seq, torch.arange(seq.shape[1])[None])[:, -1]
            got = dec.execute([t, torch.tensor([pos])])[0]
            pos += 1
            assert (got - ref).abs().max() < 1e-4, step
        # a new prompt restarts at position 0 over the stale cache
        ref = model.text(seq[:, :5], torch.arange(5)[None])[:, -1]
        assert (dec.execute([seq[:, :5].contiguous(), torch.tensor([0])])[0] - ref).abs().max() < 1e-4


def test_fp32_answers_equal_torch(fp32_bundle):
    from edgemm import runtimes

    lm, out, _ = fp32_bundle
    ds = shapes(12)
    ims, qs = [ds.image(r) for r in ds.records], [r.question for r in ds.records]
    et = runtimes.load(out, threads=2)
    assert et.runtime == "executorch"
    ref = runtimes.load(lm).generate_batch(ims, qs, max_new_tokens=8)
    assert et.generate_batch(ims, qs, max_new_tokens=8) == ref
    st = et.stats
    assert st["prefill_tokens"] > 0 and st["decode_tokens"] > 0 and st["decode_tok_s"] > 0
    # sampling: the same seed gives the same tokens as the torch runtime
    opts = dict(max_new_tokens=10, temperature=0.9, top_k=40, top_p=0.95, seed=7)
    torch_s = runtimes.load(lm)
    for im, q in zip(ims[:4], qs[:4]):
        assert et.generate(im, q, **opts) == torch_s.generate(im, q, **opts)
    # text only
    assert et.generate(None, "what is a circle?", max_new_tokens=6) == torch_s.generate(None, "what is a circle?", max_new_tokens=6)


def test_streaming_and_stats(fp32_bundle):
    from edgemm import runtimes

    _, out, _ = fp32_bundle
    ds = shapes(1, seed=5)
    im, q = ds.image(ds.records[0]), ds.records[0].question
    et = runtimes.load(out)
    pieces = list(et.generate(im, q, stream=True, max_new_tokens=12))
    assert "".join(pieces).strip() == et.generate(im, q, max_new_tokens=12)
    st = et.stats
    assert set(st) == {"image_encode_ms", "prefill_ms", "prefill_tokens", "prefill_tok_s", "decode_ms", "decode_tokens",
                       "decode_tok_s", "ttft_ms"}
    assert st["image_encode_ms"] > 0 and st["prefill_ms"] > 0 and st["ttft_ms"] >= st["prefill_ms"]
    assert st["prefill_tokens"] == len(et.processor.encode_prompt(q)) - 1 + 8
    with pytest.raises(EdgemmError, match="exceeds the context"):
        et.generate(im, q, max_new_tokens=95)


def test_cli_run_and_eval(fp32_bundle, tmp_path):
    from typer.testing import CliRunner

    from edgemm.cli import app

    lm, out, _ = fp32_bundle
    r = CliRunner().invoke(app, ["eval", str(out), "--data", "shapes:6:778", "--json", "--predictions", str(tmp_path / "p.jsonl")])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout[r.stdout.index("{"):])
    assert rep["runtime"] == "executorch" and rep["n"] == 6
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 6
    r = CliRunner().invoke(app, ["run", str(out), "--prompt", "what color is it?", "--runtime", "onnxruntime"])
    assert r.exit_code != 0 and "no artifact for runtime" in str(r.exception or r.output)


def test_missing_program_is_a_clean_error(fp32_bundle, tmp_path):
    import shutil

    from edgemm.runtimes.executorch_runtime import open_bundle

    _, out, manifest = fp32_bundle
    with pytest.raises(EdgemmError, match="unknown executorch runtime option"):
        open_bundle(out, manifest, bogus=True)
    with pytest.raises(EdgemmError, match="no ExecuTorch program named"):
        open_bundle(out, manifest, artifact="other.pte")
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    (bad / "model.pte").write_bytes(b"not a program")
    with pytest.raises(EdgemmError, match="cannot load"):
        open_bundle(bad, manifest)


# -------------------------------------------------------------------------------------------- 8da4w


def test_8da4w_bundle_notes_and_precision(q4_bundle):
    _, out, manifest = q4_bundle
    (art,) = manifest["artifacts"]
    assert art["precision"] == "8da4w" and art["extra"]["group_size"] == 32
    notes = " ".join(manifest["notes"])
    assert "5 linear layer(s) carry edgemm's own int4/int8 codes verbatim" in notes
    assert "1 edgemm-quantized linear layer(s) have no matching XNNPACK type" in notes
    model = q4_bundle[0].model  # every weight as fp32 (the MLPs' edgemm int4 layers hold theirs as buffers)
    fp32_bytes = 4 * (sum(p.numel() for p in model.parameters())
                      + sum(m.in_features * m.out_features for m in model.modules() if hasattr(m, "dequantized_weight")))
    assert (out / "model.pte").stat().st_size < 0.55 * fp32_bytes  # ~0.5: int4 decoder, int8 vision, fp32 embedding


def test_8da4w_program_matches_its_eager_copy(q4_bundle):
    """Same numbers as the eager quantized modules (codes, bf16 group scales, dynamic int8 activations);
    vision near the float model, the decoder visibly quantized."""
    from edgemm.export.executorch import prepare

    lm, out, _ = q4_bundle
    model = lm.model
    mods = prepare(model, "8da4w")
    prog = program(out)
    vis, dec = prog.load_method("vision_encoder"), prog.load_method("text_decoder")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        px = torch.randn(1, 3, 32, 32, generator=g)
        img_q, img_f = mods["vision_encoder"](px), model.encode_image(px).embeds
        img = vis.execute([px])[0]
        scale = img_f.abs().max()
        assert (img - img_q).abs().max() < 2e-2 * scale
        assert (img - img_f).abs().max() < 0.2 * scale
        e = model.text.embed_tokens(torch.randint(4, 300, (1, 20), generator=g))
        got = dec.execute([e, torch.tensor([0])])[0]
        ref_q = mods["text_decoder"](e, torch.tensor([0]))
        ref_f = model.text(e, torch.arange(20)[None])[:, -1]
        s = ref_f.abs().max()
        assert (got - ref_q).abs().max() < 2e-2 * s
        # int4 weights really are in the program (on a random model the error vs the float model is large:
        # random layers amplify it, so closeness is checked against the eager quantized copy above)
        assert (got - ref_f).abs().max() > 1e-3 * s
    # the edgemm int4 codes went in verbatim: the eager copy's MLP weights dequantize to edgemm's values
    w = mods["text_decoder"].text.layers[0].mlp.up_proj.weight
    ref_w = model.text.layers[0].mlp.up_proj.dequantized_weight()
    assert type(w).__name__ == "IntxUnpackedToInt8Tensor"
    assert (w.dequantize() - ref_w).abs().max() <= ref_w.abs().max() * 2 ** -8  # only bf16 scale rounding


def test_8da4w_runs_in_the_runtime(q4_bundle):
    from edgemm import runtimes

    lm, out, _ = q4_bundle
    ds = shapes(6)
    et = runtimes.load(out)
    ans = et.generate_batch([ds.image(r) for r in ds.records], [r.question for r in ds.records], max_new_tokens=6)
    assert len(ans) == 6 and all(isinstance(a, str) for a in ans)
    assert et.stats["decode_tokens"] > 0


# -------------------------------------------------------------------------------- token compression


@pytest.mark.slow
@pytest.mark.parametrize("method", ["vtccls", "divprune", "tome", "pool", "random", "clsdiv", "clsmerge"])
def test_every_token_method_runs_inside_vision_encoder(method):
    """Each visual-token method exports (sorts made sort-free) and matches torch in ExecuTorch."""
    from executorch.runtime import Runtime

    from edgemm.export.executorch import lower, prepare

    cfg = et_config()
    cfg.extras["visual_tokens"] = {"method": method, "keep": 0.25}
    m = random_model(cfg, seed=4)
    mods = prepare(m)
    prog, _ = lower(mods, cfg, methods=("vision_encoder",))
    p = Runtime.get().load_program(prog.buffer)
    px = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    got = p.load_method("vision_encoder").execute([px])[0]
    with torch.no_grad():
        ref = m.encode_image(px).embeds
    assert got.shape == ref.shape == (1, 4, 64)
    assert np.abs((got - ref).numpy()).max() < 1e-4
