"""`edgemm demo`: the tour's first part on the shipped model, and its last step (export for the C++
engine, answer with it) on a tiny checkpoint. The story's stages are covered in test_recipes.py."""

import json

from rich.console import Console

from edgemm.cli import main
from edgemm.data import load_dataset


def test_demo_answers_and_measures_without_the_story(capsys):
    assert main(["demo", "--n", "24", "--no-story", "--json"]) in (0, None)
    rep = json.loads(capsys.readouterr().out)
    assert len(rep["examples"]) == 6 and rep["eval"]["n"] == 24
    assert all(ex["timings"]["ttft_ms"] > 0 for ex in rep["examples"])
    assert rep["eval"]["accuracy"] >= 0.8  # the shipped demo (99.4% on the held-out set)


def test_demo_runs_the_compressed_model_on_the_native_engine(demo_tokenizer, tmp_path):
    import io

    from conftest import random_model, tiny_config
    from edgemm.demo import run_on_device
    from edgemm.models.config import TextConfig
    from edgemm.models.checkpoint import save_checkpoint

    cfg = tiny_config()
    # widths the engine's int4 decode groups (32) divide
    cfg.text = TextConfig(**{**cfg.text.__dict__, "hidden_size": 64, "head_dim": 16, "intermediate_size": 128})
    ck = tmp_path / "stage" / "model"
    save_checkpoint(random_model(cfg.validate()), demo_tokenizer, ck)
    buf = io.StringIO()
    rep = run_on_device(ck, load_dataset("shapes:3:5"), console=Console(file=buf, width=200))
    assert "error" not in rep, rep
    assert (tmp_path / "stage" / "bundle-native" / "manifest.json").is_file()
    # the engine runs the exported file of the same weights: same greedy answers as torch
    assert [r["native"] for r in rep["rows"]] == [r["torch"] for r in rep["rows"]]
    assert "native answers equal torch's on 3/3" in buf.getvalue()
