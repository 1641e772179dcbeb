"""The recipe pipeline: recipe validation, the runner's report after every stage, resume after an
interruption, the FLOPs estimate against counted multiply-accumulates, and `edgemm compress`."""

import json

import pytest
import torch

from conftest import random_model, tiny_config
from edgemm.errors import EdgemmError
from edgemm.recipes import EXTRA_STAGES, load_recipe, shipped
from edgemm.recipes.metrics import prefill_flops, prompt_text_tokens
from edgemm.tokens import set_visual_tokens

EVAL = {"data": "shapes:12:5"}


class FakeWeights:
    """A weight stage standing in for edgemm.compress in tests: zeroes the smallest half of every
    decoder Linear weight; `fail` interrupts it like Ctrl-C."""

    calls = 0
    fail = False

    @staticmethod
    def validate(opts):
        if "fraction" not in opts:
            raise EdgemmError("fake: needs fraction")
        return dict(opts)

    @classmethod
    def run(cls, loaded, opts, ctx):
        cls.calls += 1
        if cls.fail:
            raise KeyboardInterrupt
        n = 0
        with torch.no_grad():
            for name, mod in loaded.model.text.named_modules():
                if isinstance(mod, torch.nn.Linear) and "lm_head" not in name:
                    w = mod.weight
                    thr = w.abs().flatten().kthvalue(int(w.numel() * opts["fraction"])).values
                    w[w.abs() <= thr] = 0
                    n += 1
        return loaded, {"layers": n}


@pytest.fixture()
def fake_stage(monkeypatch):
    monkeypatch.setitem(EXTRA_STAGES, "fake", (FakeWeights.validate, FakeWeights.run))
    FakeWeights.calls, FakeWeights.fail = 0, False
    return FakeWeights


def _recipe(**extra):
    return {"name": "t", "description": "test", "eval": EVAL,
            "stages": [{"tokens": "fastervlm:0.25"}, {"fake": {"fraction": 0.5}, "name": "prune"}], **extra}


def test_shipped_recipes_load_and_validate():
    names = shipped()
    assert {"laptop", "phone-npu", "tiny"} <= set(names)
    pn = load_recipe("phone-npu")
    assert [s.type for s in pn.stages] == ["distill", "tokens", "sparsify", "quantize"]
    assert pn.stages[1].options["keep"] == 0.25
    for n in names:
        assert load_recipe(n).stages


@pytest.mark.parametrize("bad,msg", [
    ({"stages": []}, "non-empty"),
    ({"stages": [{"zip": {}}]}, "unknown stage type"),
    ({"stages": [{"tokens": "nope:0.5"}]}, "unknown visual-token method"),
    ({"stages": [{"tokens": "fastervlm:0.5"}, {"tokens": "pool:0.25"}]}, "two stages are named"),
    ({"stages": [{"distill": {"steps": 0}}]}, "steps must be >= 1"),
    ({"stages": [{"distill": {"bogus": 1}}]}, "unknown distill option"),
    ({"stages": [{"tokens": "fastervlm:0.5"}], "extra": 1}, "unknown field"),
    ({"stages": [{"quantize": {"bits": 4}}]}, "needs a method"),
])
def test_bad_recipes_are_refused(bad, msg):
    with pytest.raises(EdgemmError, match=msg):
        load_recipe(bad)


def test_recipe_yaml_errors(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("stages: [tokens: {")
    with pytest.raises(EdgemmError, match="not valid YAML"):
        load_recipe(p)
    with pytest.raises(EdgemmError, match="unknown recipe"):
        load_recipe("no-such-recipe")


def test_runner_writes_checkpoint_and_report_after_each_stage(tmp_path, tiny_ckpt, fake_stage):
    from edgemm.models import load_model
    from edgemm.recipes.runner import run_recipe

    rep = run_recipe(str(tiny_ckpt), _recipe(), tmp_path / "out", quiet=True)
    rows = rep["rows"]
    assert [r["stage"] for r in rows] == ["input", "tokens", "prune"]
    assert [r["visual_tokens"] for r in rows] == [16, 4, 4]
    assert rows[1]["prefill_flops"] < rows[0]["prefill_flops"] and rows[2]["prefill_flops"] == rows[1]["prefill_flops"]
    assert all(r["n"] == 12 for r in rows) and rows[0]["pct_of_input"] == 100.0
    assert rows[2]["info"] == {"layers": 2 * 7}
    out = tmp_path / "out"
    for f in ("report.json", "report.md", "report.png"):
        assert (out / f).stat().st_size > 0
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "| prune |" in md and "| tokens |" in md
    lm = load_model(str(out / "model"))
    assert lm.config.extras["visual_tokens"] == {"method": "fastervlm", "keep": 0.25}
    zeros = (lm.model.text.layers[0].mlp.up_proj.weight == 0).float().mean().item()
    assert zeros >= 0.5
    assert json.loads((out / "report.json").read_text())["rows"][2]["accuracy"] == rows[2]["accuracy"]


def test_runner_resumes_after_an_interruption(tmp_path, tiny_ckpt, fake_stage):
    from edgemm.recipes.runner import run_recipe

    fake_stage.fail = True
    with pytest.raises(KeyboardInterrupt):
        run_recipe(str(tiny_ckpt), _recipe(), tmp_path / "out", quiet=True)
    # the first stage and its report survived the interruption
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [r["stage"] for r in rep["rows"]] == ["input", "tokens"]
    assert not (tmp_path / "out" / "model").exists()
    fake_stage.fail = False
    said = []
    rep = run_recipe(str(tiny_ckpt), _recipe(), tmp_path / "out", quiet=True, say=said.append)
    assert [r["cached"] for r in rep["rows"]] == [True, True, False]
    assert any("stage 1 tokens: cached" in s for s in said) and fake_stage.calls == 2
    # a third run recomputes nothing; a changed stage recomputes from there on
    rep = run_recipe(str(tiny_ckpt), _recipe(), tmp_path / "out", quiet=True)
    assert all(r["cached"] for r in rep["rows"]) and fake_stage.calls == 2
    changed = _recipe()
    changed["stages"][1] = {"fake": {"fraction": 0.25}, "name": "prune"}
    rep = run_recipe(str(tiny_ckpt), changed, tmp_path / "out", quiet=True)
    assert [r["cached"] for r in rep["rows"]] == [True, True, False] and fake_stage.calls == 3
    # the resumed result equals a run that was never interrupted
    straight = run_recipe(str(tiny_ckpt), _recipe(), tmp_path / "straight", quiet=True)
    again = run_recipe(str(tiny_ckpt), _recipe(), tmp_path / "out", quiet=True)
    assert [r["accuracy"] for r in straight["rows"]] == [r["accuracy"] for r in again["rows"]]
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "out" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_runner_with_a_distill_stage(tmp_path, tiny_ckpt):
    from edgemm.recipes.runner import run_recipe

    cfg = tiny_config()
    cfg.text.hidden_size, cfg.text.intermediate_size, cfg.text.num_layers = 24, 32, 1
    cfg.text.num_heads, cfg.text.num_kv_heads, cfg.text.head_dim = 2, 1, 12
    (tmp_path / "student.json").write_text(json.dumps(cfg.validate().to_dict()))
    recipe = {"eval": EVAL, "stages": [{"distill": {"student": str(tmp_path / "student.json"), "steps": 4, "batch_size": 2,
                                                    "bf16": False}}, {"tokens": "divprune:0.5"}]}
    rep = run_recipe(str(tiny_ckpt), recipe, tmp_path / "out", quiet=True)
    r = rep["rows"]
    assert [x["stage"] for x in r] == ["input", "distill", "tokens"]
    assert r[1]["params"] < r[0]["params"] and r[1]["weight_bytes"] < r[0]["weight_bytes"]
    assert r[1]["info"]["stages"][0]["stage"] == "dpt"
    assert not (tmp_path / "out" / "stages" / "01-distill.work").exists()  # training state dropped once the stage is saved


def _linear_macs(model, ids, px):
    """Multiply-accumulates of every nn.Linear call in a prefill that keeps only the last logits."""
    from edgemm.models.modeling import expand_mask, positions_from_mask

    macs = {"n": 0}

    def hook(mod, inp, out):
        macs["n"] += inp[0].numel() // inp[0].shape[-1] * mod.in_features * mod.out_features

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        emb = model.merge_image(ids, model.encode_image(px).embeds)
        mask = expand_mask(ids, None, model.config.image_token_id, emb.shape[1])
        model.text(emb, positions_from_mask(mask), None, logits_to_keep=1)
    for h in hs:
        h.remove()
    return macs["n"], emb.shape[1]


@pytest.mark.parametrize("setting", [None, "fastervlm:0.25", "pool:0.5", "tome:3"])
def test_prefill_flops_match_counted_linear_work(setting, demo_tokenizer):
    from edgemm.processor import Processor

    m = random_model(seed=1)
    set_visual_tokens(m, setting)
    proc = Processor(demo_tokenizer, m.config)
    ids = torch.tensor([proc.encode_prompt("how many objects are there?")])
    n_text = prompt_text_tokens(proc)
    assert n_text == ids.shape[1] - 1
    macs, T = _linear_macs(m, ids, torch.randn(1, 3, 32, 32))
    f = prefill_flops(m.config, n_text)
    assert f["prompt_tokens"] == T
    cfg = m.config
    n = cfg.vision.num_patches + 1
    attn = cfg.feature_layer_index * 2 * n * n * cfg.vision.hidden_size  # ViT QK^T and AV
    t = cfg.text
    attn += t.num_layers * 2 * t.num_heads * t.head_dim * T * (T + 1) // 2  # causal decoder attention
    assert f["total"] - f["tokens"] == 2 * (macs + attn)


def test_demo_story_reports_each_stage_and_reuses_its_cache(tmp_path, tiny_ckpt, fake_stage):
    import io

    from rich.console import Console

    from edgemm.demo import run_story

    buf = io.StringIO()
    con = Console(file=buf, width=200)
    rep = run_story(str(tiny_ckpt), _recipe(), tmp_path / "cache", n=6, console=con)
    text = buf.getvalue()
    assert [r["stage"] for r in rep["rows"]] == ["input", "tokens", "prune"]
    assert "computed now" in text and "the teacher" in text and "visual-token compression (fastervlm, keep 0.25)" in text
    buf.truncate(0)
    buf.seek(0)
    rep = run_story(str(tiny_ckpt), _recipe(), tmp_path / "cache", n=6, console=con)
    text = buf.getvalue()
    assert all(r["cached"] for r in rep["rows"]) and fake_stage.calls == 1
    assert "cached from an earlier run: input, tokens, prune" in text


def test_runner_chains_the_real_weight_methods(tmp_path, tiny_ckpt):
    """tokens -> 2:4 (magnitude) -> W8A8 with shadow outliers, through edgemm.compress; the stage
    checkpoints reload (packed layers restored) and the bytes shrink."""
    from edgemm.compress import layer_formats
    from edgemm.models import load_model
    from edgemm.recipes.runner import run_recipe

    recipe = {"eval": EVAL, "stages": [{"tokens": "fastervlm:0.5"},
                                       {"sparsify": {"method": "magnitude", "pattern": "2:4"}},
                                       {"quantize": {"method": "w8a8", "shadow": True, "calibration": {"n": 8}}}]}
    rep = run_recipe(str(tiny_ckpt), recipe, tmp_path / "out", quiet=True)
    r = rep["rows"]
    assert [x["type"] for x in r] == ["input", "tokens", "sparsify", "quantize"]
    assert r[3]["weight_bytes"] < 0.6 * r[2]["weight_bytes"] and r[3]["weight_bytes_source"] == "edgemm.compress.weight_bytes"
    assert r[2]["info"]["method"] == "magnitude" and r[3]["info"]["method"] == "w8a8"
    lm = load_model(str(tmp_path / "out" / "model"))
    fmts = layer_formats(lm.model)
    assert fmts["text.layers.0.mlp.up_proj"]["format"] == "w8a8" and fmts["text.layers.0.mlp.up_proj"]["nm"] == "2:4"
    assert lm.config.extras["visual_tokens"]["method"] == "fastervlm"
    # resume: everything cached, and the cached rows match
    again = run_recipe(str(tiny_ckpt), recipe, tmp_path / "out", quiet=True)
    assert all(x["cached"] for x in again["rows"]) and [x["accuracy"] for x in again["rows"]] == [x["accuracy"] for x in r]


def test_cli_compress_and_recipes(capsys, tmp_path, tiny_ckpt):
    from edgemm.cli import main

    y = tmp_path / "r.yaml"
    y.write_text("name: small\neval: {data: 'shapes:6:2'}\nstages:\n  - tokens: pool:0.25\n")
    assert main(["compress", str(tiny_ckpt), "--recipe", str(y), "-o", str(tmp_path / "out"), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert [r["visual_tokens"] for r in rep["rows"]] == [16, 4] and rep["recipe"]["name"] == "small"
    assert main(["compress", str(tiny_ckpt), "--recipe", str(y), "-o", str(tmp_path / "out")]) == 0
    text = capsys.readouterr()
    assert "| tokens |" in text.out and "cached" in text.err
    assert main(["recipes", "list", "--json"]) == 0
    names = [r["name"] for r in json.loads(capsys.readouterr().out)]
    assert {"laptop", "phone-npu", "tiny"} <= set(names)
    # --reuse: a stage's output taken from an existing checkpoint
    y2 = tmp_path / "r2.yaml"
    y2.write_text("eval: {data: 'shapes:6:2'}\nstages:\n  - tokens: fastervlm:0.5\n  - tokens: pool:0.25\n    name: pooled\n")
    assert main(["compress", str(tiny_ckpt), "--recipe", str(y2), "-o", str(tmp_path / "o2"), "--reuse",
                 f"pooled={tmp_path / 'out' / 'model'}", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["rows"][2]["info"]["prebuilt"] == str(tmp_path / "out" / "model") and rep["rows"][2]["visual_tokens"] == 4
    assert main(["compress", str(tiny_ckpt), "--recipe", str(y2), "-o", str(tmp_path / "o3"), "--reuse", "zz=x"]) == 1
    assert "no stage 'zz'" in capsys.readouterr().err
    assert main(["compress", str(tiny_ckpt), "--recipe", "nope", "-o", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "unknown recipe" in err and len(err.strip().splitlines()) == 1


def test_demo_story_never_starts_an_hour_long_distillation_unasked(tmp_path, tiny_ckpt, fake_stage, monkeypatch, demo_tokenizer):
    import io

    from rich.console import Console

    import edgemm.models as models
    from edgemm.demo import run_story
    from edgemm.models.checkpoint import save_checkpoint

    sub = tmp_path / "assets" / "demo-small"
    save_checkpoint(random_model(seed=7), demo_tokenizer, sub)
    monkeypatch.setattr(models, "builtin_path", lambda name: tmp_path / "assets" / name)

    def no_training(*a, **k):
        raise AssertionError("the story must not distil unasked")

    import edgemm.recipes.runner as runner

    monkeypatch.setitem(runner.STAGE_RUNNERS, "distill", no_training)
    recipe = {"name": "s", "eval": EVAL, "stages": [{"distill": {"student": "demo-small"}}, {"tokens": "pool:0.25"}]}
    buf = io.StringIO()
    rep = run_story(str(tiny_ckpt), recipe, tmp_path / "cache", n=6, console=Console(file=buf, width=220))
    text = buf.getvalue()
    assert "uses the SFT baseline demo-small in its place" in text and "demo-small in its place (not distilled)" in text
    assert rep["rows"][1]["info"]["prebuilt"] == str(sub) and rep["cache_dir"].endswith("with-demo-small")
