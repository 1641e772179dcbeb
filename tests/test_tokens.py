"""Visual-token compression: each method on inputs where the answer is known, the exact tie-breaking
and order rules, counts, the EdgeVLM hook, checkpoints and the CLI."""

import json

import numpy as np
import pytest
import torch

from conftest import random_model, tiny_config
from edgemm.errors import EdgemmError
from edgemm.tokens import (TokenSetting, apply_to_config, get_setting, parse, pool_counts, pool_shape, set_visual_tokens,
                           visual_token_count)
from edgemm.tokens import base, clsdiv, clsmerge, divprune, pool, randsel, tome

METHODS = ["fastervlm", "vtccls", "divprune", "tome", "pool", "random", "clsdiv", "clsmerge"]


# ------------------------------------------------------------------------------------- settings


def test_parse_forms():
    s = parse("fastervlm:0.25")
    assert (s.method, s.keep, s.options) == ("fastervlm", 0.25, {})
    assert parse("divprune:16").keep == 16 and isinstance(parse("divprune:16").keep, int)
    assert parse("pool:25%").keep == 0.25
    assert parse("VTC-CLS:0.5:start=1,end=2").to_dict() == {"method": "vtccls", "keep": 0.5, "start": 1, "end": 2}
    assert parse("random:8:seed=3").option("seed") == 3
    assert parse("none") is None
    assert parse({"method": "tome", "keep": 4}).to_dict() == {"method": "tome", "keep": 4}
    assert TokenSetting.parse(str(parse("clsdiv:0.1:alpha=2"))) == parse("clsdiv:0.1:alpha=2")


@pytest.mark.parametrize("spec,msg", [
    ("nope:0.5", "unknown visual-token method"),
    ("fastervlm:1.5", "ratio must be in"),
    ("fastervlm:0", "count must be >= 1"),
    ("fastervlm:abc", "bad keep"),
    ("fastervlm", "expected METHOD:KEEP"),
    ("fastervlm:0.5:bogus=1", "no option"),
    ("vtccls:0.5:start", "NAME=VALUE"),
    ("random:4:seed=-1", "seed"),
])
def test_parse_errors(spec, msg):
    with pytest.raises(EdgemmError, match=msg):
        parse(spec)


def test_counts_ratio_count_and_pool_rules():
    cfg = tiny_config()  # 4x4 grid, 16 patches
    for spec, k in [("fastervlm:0.5", 8), ("fastervlm:0.25", 4), ("fastervlm:0.1", 2), ("fastervlm:0.01", 1),
                    ("divprune:5", 5), ("divprune:100", 16), ("fastervlm:1.0", 16), ("pool:0.5", 8), ("pool:6", 6)]:
        assert parse(spec).visual_tokens(cfg) == k, spec
    # the demo geometry: 8x8 patches
    s = lambda spec: parse(spec).patch_count(64, 8)  # noqa: E731
    assert [s("fastervlm:0.5"), s("fastervlm:0.25"), s("fastervlm:0.1")] == [32, 16, 6]
    assert s("pool:0.1") == 6 and pool_shape(6, 8) == (2, 3) and pool_shape(32, 8) == (4, 8) and pool_shape(16, 8) == (4, 4)
    assert 61 not in pool_counts(8)
    with pytest.raises(EdgemmError, match="pool cannot make 61"):
        s("pool:61")
    # [CLS] fed to the LLM: it is kept on top of the patches
    full = tiny_config(vision_feature_select="full")
    assert parse("fastervlm:0.25").visual_tokens(full) == 5 and parse("fastervlm:5").visual_tokens(full) == 5


def test_setting_is_validated_against_the_model():
    cfg = tiny_config()  # blocks 0, 1 run
    with pytest.raises(EdgemmError, match="not available"):
        apply_to_config(cfg, "fastervlm:0.5:layer=2")
    with pytest.raises(EdgemmError, match="start block"):
        apply_to_config(cfg, "vtccls:0.5:start=2")
    assert apply_to_config(cfg, "fastervlm:0.5:layer=0").option("layer") == 0
    assert visual_token_count(cfg) == 8
    apply_to_config(cfg, "none")
    assert get_setting(cfg) is None and visual_token_count(cfg) == 16


# ------------------------------------------------------------------------------ exact primitives


def test_keep_top_ties_go_to_the_lower_index_and_order_is_raster():
    s = torch.tensor([[0.1, 0.5, 0.5, 0.2, 0.5, 0.9]])
    assert base.keep_top(s, 3).tolist() == [[1, 2, 5]]  # 0.9, then the first two of the three 0.5s
    assert base.keep_top(s, 4).tolist() == [[1, 2, 4, 5]]
    assert base.keep_top(torch.zeros(1, 5), 2).tolist() == [[0, 1]]


def _ctx(cfg, setting, feats, attns, k, project=lambda x: x):
    return base.Ctx(cfg, parse(setting), feats, attns, k, project)


def test_fastervlm_keeps_the_most_attended_patches_in_raster_order():
    from edgemm.tokens import fastervlm

    cfg = tiny_config()  # feature block 1
    feats = torch.arange(16.0)[None, :, None].expand(1, 16, 3).clone()
    attn = torch.full((1, 4, 16), 0.01)
    attn[0, :, 11] = 0.3
    attn[0, :, 2] = 0.2
    attn[0, 0, 7] = 0.8  # one head only: mean 0.2075 -> second
    attn[0, 1:, 5] = 0.25  # three heads: mean 0.19 -> fourth
    out = fastervlm.run(_ctx(cfg, "fastervlm:4", feats, {1: attn, 0: -attn}, 4))
    assert out.index.tolist() == [[2, 5, 7, 11]]
    assert torch.equal(out.feats[0, :, 0], torch.tensor([2.0, 5, 7, 11]))


def test_vtccls_sums_the_attention_of_its_blocks():
    from edgemm.tokens import vtccls

    cfg = tiny_config()
    feats = torch.randn(1, 16, 3)
    a0 = torch.zeros(1, 2, 16)
    a1 = torch.zeros(1, 2, 16)
    a0[0, :, [1, 2, 3]] = torch.tensor([0.5, 0.4, 0.0])
    a1[0, :, [1, 2, 3]] = torch.tensor([0.0, 0.2, 0.45])
    out = vtccls.run(_ctx(cfg, "vtccls:2:start=0", feats, {0: a0, 1: a1}, 2))
    assert out.index.tolist() == [[1, 2]]  # sums 0.5, 0.6, 0.45 (block 1 alone would pick 2, 3)
    out = vtccls.run(_ctx(cfg, "vtccls:2:start=1", feats, {1: a1}, 2))
    assert out.index.tolist() == [[2, 3]]


def _greedy_reference(x: np.ndarray, k: int) -> list[int]:
    """DivPrune in plain numpy loops, for comparison."""
    n = len(x)
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = 1 - u @ u.T
    nn = [min(d[i, j] for i in range(n) if i != j) for j in range(n)]
    sel = [int(np.argmax(nn))]
    while len(sel) < k:
        best, arg = -1.0, -1
        for j in range(n):
            if j in sel:
                continue
            m = min(d[s, j] for s in sel)
            if m > best:
                best, arg = m, j
        sel.append(arg)
    return sorted(sel)


def test_divprune_picks_the_spread_tokens():
    rng = np.random.default_rng(0)
    dirs = np.eye(6)[:4] * 3  # four well separated directions
    x = np.repeat(dirs, [1, 1, 1, 9], axis=0) + 0.01 * rng.standard_normal((12, 6))
    order = rng.permutation(12)
    x = x[order]
    idx = divprune.select(torch.tensor(x, dtype=torch.float32)[None], 4)[0].tolist()
    # one token from each direction, i.e. the three singletons and one of the cluster
    groups = sorted(int(np.argmax(np.abs(x[i]))) for i in idx)
    assert groups == [0, 1, 2, 3] and idx == sorted(idx)
    singles = sorted(int(np.where(order == j)[0][0]) for j in range(3))
    assert set(singles) <= set(idx)
    for seed in range(3):
        y = np.random.default_rng(seed).standard_normal((20, 5))
        assert divprune.select(torch.tensor(y, dtype=torch.float32)[None], 7)[0].tolist() == _greedy_reference(y, 7)


def test_tome_preserves_the_size_weighted_mean_and_merges_duplicates_first():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 5)
    for k in (1, 3, 6, 8, 15):
        m, size, pos = tome.merge(x, k)
        assert m.shape == (2, k, 5) and size.shape == (2, k)
        assert torch.equal(size.sum(-1), torch.full((2,), 16.0))
        assert torch.allclose((m * size[..., None]).sum(1) / 16, x.mean(1), atol=1e-5)
        assert bool((pos[:, 1:] > pos[:, :-1]).all())  # raster order of representatives
    # pairs of identical tokens at (2i, 2i+1): the first round merges exactly those pairs
    u = torch.randn(1, 8, 4)
    dup = u.repeat_interleave(2, dim=1)
    m, size, pos = tome.merge(dup, 8)
    assert torch.allclose(m, u, atol=1e-6) and size.tolist() == [[2.0] * 8] and pos.tolist() == [[1, 3, 5, 7, 9, 11, 13, 15]]


def test_pool_averages_blocks_of_the_grid():
    g = 4
    feats = torch.arange(16.0).reshape(1, 16, 1)
    out, rep = pool.pool(feats, g, 4)  # 2x2 blocks
    assert out[0, :, 0].tolist() == [2.5, 4.5, 10.5, 12.5] and rep.tolist() == [[0, 2, 8, 10]]
    out, rep = pool.pool(feats, g, 2)  # 1x2: left and right halves
    assert out[0, :, 0].tolist() == [6.5, 8.5] and rep.tolist() == [[0, 2]]


def test_random_is_a_fixed_documented_subset():
    assert randsel.splitmix64(0) == 0xE220A8397B1DCDAF  # the reference generator's first output from state 0
    a = randsel.subset(64, 16, 0)
    assert a == randsel.subset(64, 16, 0) and a != randsel.subset(64, 16, 1) and a == sorted(a) and len(set(a)) == 16


def test_clsdiv_weights_diversity_by_importance():
    # tokens 0..3 on four orthogonal directions, 4..7 copies of them; importance favours 4..7 and token 1
    x = torch.cat([torch.eye(4), torch.eye(4)]).unsqueeze(0)
    a = torch.tensor([[0.05, 0.5, 0.05, 0.05, 0.4, 0.3, 0.6, 0.2]])
    cfg = tiny_config()
    attn = a[:, None, :].expand(1, 2, 8)
    ctx = _ctx(cfg, "clsdiv:4:alpha=1", x, {1: attn}, 4)
    out = clsdiv.run(ctx)
    # first = most attended (6, direction 2); then one per remaining direction, the more important copy
    assert out.index.tolist() == [[1, 4, 6, 7]]
    d = base.cosine_distance(x)
    assert base.max_min_select(d, 4, torch.tensor([6]))[0].tolist() == [0, 1, 3, 6]  # alpha 0: lowest-index copies


def test_clsmerge_averages_dropped_patches_into_the_nearest_kept_one():
    x = torch.tensor([[[1.0, 0], [0.9, 0.1], [0, 1.0], [0.1, 0.9], [1.0, 0.05]]])
    w = torch.tensor([[0.4, 0.1, 0.3, 0.1, 0.1]])
    kept = base.keep_top(w, 2)
    assert kept.tolist() == [[0, 2]]
    out = clsmerge.merge_into_kept(x, w, kept)
    want0 = (0.4 * x[0, 0] + 0.1 * x[0, 1] + 0.1 * x[0, 4]) / 0.6
    want1 = (0.3 * x[0, 2] + 0.1 * x[0, 3]) / 0.4
    assert torch.allclose(out[0, 0], want0) and torch.allclose(out[0, 1], want1)


# ---------------------------------------------------------------------------------- in the model


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("keep", ["0.5", "3"])
def test_every_method_honours_the_count_and_runs_end_to_end(method, keep):
    from edgemm.models.generation import SamplingConfig, generate

    m = random_model(seed=1)
    set_visual_tokens(m, f"{method}:{keep}")
    k = visual_token_count(m.config)
    assert k == (8 if keep == "0.5" else 3) or (method == "pool" and keep == "3" and k == 3)
    px = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        f = m.encode_image(px)
        assert f.embeds.shape == (3, k, m.config.text.hidden_size) and f.token_index.shape == (3, k)
        assert bool((f.token_index[:, 1:] > f.token_index[:, :-1]).all())
        # per image: a batch gives the same tokens as each image alone
        single = m.encode_image(px[1:2])
        assert torch.allclose(single.embeds[0], f.embeds[1], atol=1e-5)
        ids = torch.tensor([[1, 20, 3, 21, 22]] * 3)
        logits = m(ids, px)
        assert logits.shape[1] == 4 + k
    res = generate(m, ids, px, sampling=SamplingConfig(max_new_tokens=3))
    assert res.stats.prefill_tokens == 4 + k


def test_selection_methods_feed_the_projected_kept_features():
    m = random_model(seed=2)
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats, attns = m.vision_features(px, attn_layers=(1,))
        set_visual_tokens(m, "fastervlm:5")
        f = m.encode_image(px)
        score = attns[1].mean(1)
        for b in range(2):
            want = sorted(np.argsort(-score[b].numpy(), kind="stable")[:5].tolist())
            assert f.token_index[b].tolist() == want
        assert torch.allclose(f.embeds, m.projector(base.gather_tokens(feats, f.token_index)), atol=1e-6)
        set_visual_tokens(m, "divprune:5")
        f = m.encode_image(px)
        assert f.token_index.tolist() == divprune.select(m.projector(feats), 5).tolist()


def test_fastervlm_early_selects_inside_the_vit():
    """early=true: block `layer`'s [CLS] attention picks the patches, the later blocks see [CLS] + the kept
    patches only; at the feature block it is plain fastervlm."""
    m = random_model(seed=2)
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h0, attns = m.vision(px, num_layers=1, attn_layers=(0,))
        idx = base.keep_top(attns[0].float().mean(1), 5)
        x = torch.cat([h0[:, :1], base.gather_tokens(h0[:, 1:], idx)], dim=1)
        x, _ = m.vision.layers[1](x)
        set_visual_tokens(m, "fastervlm:5:layer=0,early=true")
        f = m.encode_image(px)
        assert f.token_index.tolist() == idx.tolist()
        assert torch.allclose(f.embeds, m.projector(x[:, 1:]), atol=1e-6)
        late = m.vision_features(px)[0]  # the post-ViT selection of the same patches differs: they saw every patch
        assert not torch.allclose(f.embeds, m.projector(base.gather_tokens(late, idx)), atol=1e-4)
        set_visual_tokens(m, "fastervlm:5:early=true")  # default layer = the feature block: nothing to drop early
        a = m.encode_image(px)
        set_visual_tokens(m, "fastervlm:5")
        b = m.encode_image(px)
        assert torch.equal(a.embeds, b.embeds) and torch.equal(a.token_index, b.token_index)
    with pytest.raises(EdgemmError, match="true or false"):
        parse("fastervlm:0.25:early=2")


def test_cls_token_is_protected_when_fed():
    m = random_model(tiny_config(vision_feature_select="full"), seed=3)
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = m.encode_image(px).embeds
        for method in METHODS:
            set_visual_tokens(m, f"{method}:0.25")
            f = m.encode_image(px)
            assert f.embeds.shape[1] == 5 and f.token_index[:, 0].tolist() == [0, 0]
            assert torch.allclose(f.embeds[:, 0], full[:, 0], atol=1e-6), method  # [CLS] untouched, first
            assert bool((f.token_index[:, 1:] >= 1).all())


def test_keep_everything_is_the_identity():
    m = random_model(seed=4)
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = m.encode_image(px).embeds
        for method in METHODS:
            set_visual_tokens(m, f"{method}:1.0")
            assert torch.allclose(m.encode_image(px).embeds, want, atol=1e-6), method


def test_setting_survives_a_checkpoint_round_trip(tmp_path, demo_tokenizer):
    from edgemm.models.checkpoint import load_checkpoint, save_checkpoint

    m = random_model(seed=5)
    set_visual_tokens(m, "tome:0.25")
    save_checkpoint(m, demo_tokenizer, tmp_path / "c")
    assert json.loads((tmp_path / "c" / "config.json").read_text())["extras"]["visual_tokens"] == {"method": "tome", "keep": 0.25}
    lm = load_checkpoint(tmp_path / "c")
    px = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(lm.model.encode_image(px).embeds, m.encode_image(px).embeds, atol=1e-6)


def test_cli_visual_tokens_on_eval_run_and_tokens_set(capsys, tmp_path, tiny_ckpt):
    from edgemm.cli import main
    from edgemm.data import shapes

    png = tmp_path / "im.png"
    shapes.render(shapes.sample_scene(np.random.default_rng(0))).save(png)
    assert main(["eval", str(tiny_ckpt), "--data", "shapes:6:1", "--visual-tokens", "divprune:0.25", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["visual_tokens"] == {"setting": {"method": "divprune", "keep": 0.25}, "tokens": 4, "of": 16}
    args = ["run", str(tiny_ckpt), "--image", str(png), "--prompt", "how many objects are there?", "--max-new-tokens", "2", "--json"]
    assert main(args) == 0
    full = json.loads(capsys.readouterr().out)
    assert main(args + ["--visual-tokens", "pool:4"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["visual_tokens"]["tokens"] == 4 and full["visual_tokens"]["tokens"] == 16
    assert r["timings"]["prefill_tokens"] == full["timings"]["prefill_tokens"] - 12
    assert main(["tokens", "set", str(tiny_ckpt), "clsmerge:2", "-o", str(tmp_path / "t"), "--json"]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "t"), "--data", "shapes:3:1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["visual_tokens"]["tokens"] == 2
    # 'none' switches a stored setting off
    assert main(["eval", str(tmp_path / "t"), "--data", "shapes:3:1", "--visual-tokens", "none", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["visual_tokens"]["tokens"] == 16
    for bad, msg in ((["eval", str(tiny_ckpt), "--data", "shapes:3:1", "--visual-tokens", "fastervlm:7:layer=5"], "not available"),
                     (["eval", str(tiny_ckpt), "--data", "shapes:3:1", "--visual-tokens", "zap:0.5"], "unknown visual-token method")):
        assert main(bad) == 1
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1


def test_prefill_token_count_in_generation_stats(tiny_ckpt):
    from edgemm import runtimes
    from edgemm.models import load_model
    from edgemm.data import load_dataset

    lm = load_model(str(tiny_ckpt))
    sess = runtimes.load(lm)
    r = load_dataset("shapes:1:0").records[0]
    sess.generate(r.pil, r.question, max_new_tokens=1)
    full = sess.stats["prefill_tokens"]
    set_visual_tokens(lm, "fastervlm:0.25")
    sess.generate(r.pil, r.question, max_new_tokens=1)
    assert sess.stats["prefill_tokens"] == full - 12


def test_cli_tokens_sweep(capsys, tmp_path, tiny_ckpt):
    from edgemm.cli import main

    assert main(["tokens", "sweep", str(tiny_ckpt), "--methods", "fastervlm;vtccls::start=0,end=1", "--keep", "0.5,2",
                 "--data", "shapes:6:4", "-o", str(tmp_path / "s.json"), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert [(r["method"], r["tokens"]) for r in rep["rows"]] == [("fastervlm", 8), ("fastervlm", 2),
                                                                 ("vtccls::start=0,end=1", 8), ("vtccls::start=0,end=1", 2)]
    assert rep["rows"][2]["setting"] == {"method": "vtccls", "keep": 0.5, "start": 0, "end": 1}
    final = json.loads((tmp_path / "s.json").read_text())
    assert final["n"] == 6 and "partial" not in final and len(final["rows"]) == 4  # partial writes replaced by the full result
