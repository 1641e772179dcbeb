"""Evaluation correctness, checkpoints, and the CLI (outputs and one-line errors)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from edgemm.cli import main
from edgemm.data import load_dataset
from edgemm.errors import EdgemmError
from edgemm.eval import evaluate
from edgemm.models import load_model
from edgemm.models.checkpoint import load_checkpoint, save_checkpoint


class ScriptedSession:
    """Answers from a function of the question, to check the scoring itself."""

    runtime = "scripted"

    def __init__(self, answer):
        self.answer = answer

    def generate_batch(self, images, prompts, **kw):
        assert len(images) == len(prompts)
        return [self.answer(im, p) for im, p in zip(images, prompts)]


def test_eval_scores_exact_match_after_normalising():
    ds = load_dataset("shapes:60:3")
    truth = {id(r.pil): r.answer for r in ds.records}
    # right (with odd casing/spaces) on everything but the 'shape' type
    sess = ScriptedSession(lambda im, q: "wrong" if q.startswith("what shape") else f"  {truth[id(im)].upper()} ")
    rep = evaluate(sess, ds, "scripted", quiet=True, batch_size=7)
    assert rep["n"] == 60
    assert rep["per_type"]["shape"] == 0.0
    assert all(v == 1.0 for k, v in rep["per_type"].items() if k != "shape")
    assert rep["accuracy"] == pytest.approx(50 / 60)


def test_eval_writes_predictions(tmp_path):
    ds = load_dataset("shapes:12:0")
    evaluate(ScriptedSession(lambda im, q: "yes"), ds, "x", quiet=True, predictions=tmp_path / "p.jsonl")
    lines = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(lines) == 12 and all(x["prediction"] == "yes" for x in lines)
    assert set(lines[0]) == {"image", "question", "answer", "type", "prediction"}


def test_checkpoint_round_trip_is_exact(tmp_path, tiny_ckpt):
    lm = load_checkpoint(tiny_ckpt)
    save_checkpoint(lm.model, lm.processor, tmp_path / "copy")
    lm2 = load_checkpoint(tmp_path / "copy")
    for (k, a), (_, b) in zip(lm.model.state_dict().items(), lm2.model.state_dict().items()):
        assert torch.equal(a, b), k
    assert not list(tmp_path.glob(".*tmp"))  # no temp leftovers


def test_checkpoint_write_is_atomic(tmp_path, tiny_ckpt, monkeypatch):
    lm = load_checkpoint(tiny_ckpt)
    import edgemm.models.checkpoint as ck

    def fail(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ck, "save_file", fail)
    with pytest.raises(RuntimeError):
        save_checkpoint(lm.model, lm.processor, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def run_cli(capsys, *args):
    code = main(list(args))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.fixture()
def png(tmp_path):
    from edgemm.data import shapes

    p = tmp_path / "img.png"
    shapes.render(shapes.sample_scene(np.random.default_rng(0))).save(p)
    return p


def test_cli_info_run_eval_json(capsys, tiny_ckpt, png):
    code, out, _ = run_cli(capsys, "info", str(tiny_ckpt), "--json")
    info = json.loads(out)
    assert code == 0 and info["parameters"]["total"] > 0
    assert info["bytes"]["total"] == sum(v for k, v in info["bytes"].items() if k != "total")
    code, out, _ = run_cli(capsys, "run", str(tiny_ckpt), "--image", str(png), "--prompt", "how many objects are there?",
                           "--max-new-tokens", "3", "--json")
    r = json.loads(out)
    assert code == 0 and isinstance(r["answer"], str)
    assert {"image_encode_ms", "prefill_tok_s", "decode_tok_s", "ttft_ms"} <= set(r["timings"])
    code, out, _ = run_cli(capsys, "eval", str(tiny_ckpt), "--data", "shapes:12:1", "--json")
    e = json.loads(out)
    assert code == 0 and e["n"] == 12 and set(e) >= {"model", "n", "accuracy", "per_type"}
    assert set(e["per_type"]) == {"color", "shape", "count_shape", "count_all", "exists", "position"}


def test_cli_data_shapes(capsys, tmp_path):
    code, _, _ = run_cli(capsys, "data", "shapes", str(tmp_path / "d"), "--n", "8", "--seed", "3")
    assert code == 0 and len((tmp_path / "d" / "data.jsonl").read_text().splitlines()) == 8


def _corrupt(tmp_path, tiny_ckpt, how):
    import shutil

    d = tmp_path / how
    shutil.copytree(tiny_ckpt, d)
    st = d / "model.safetensors"
    if how == "garbage":
        st.write_bytes(b"\x00\x01not a safetensors file" * 10)
    elif how == "truncated":
        st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    elif how == "shapes":
        cfg = json.loads((d / "config.json").read_text())
        cfg["text"]["intermediate_size"] += 8
        (d / "config.json").write_text(json.dumps(cfg))
    elif how == "badjson":
        (d / "config.json").write_text("{not json")
    elif how == "unknown_field":
        cfg = json.loads((d / "config.json").read_text())
        cfg["vision"]["frobnicate"] = 1
        (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("how,msg", [
    ("garbage", "corrupt or truncated"),
    ("truncated", "corrupt or truncated"),
    ("shapes", "has shape"),
    ("badjson", "not valid JSON"),
    ("unknown_field", "unknown field vision.frobnicate"),
])
def test_cli_bad_model_files(capsys, tmp_path, tiny_ckpt, png, how, msg):
    d = _corrupt(tmp_path, tiny_ckpt, how)
    code, out, err = run_cli(capsys, "run", str(d), "--image", str(png), "--prompt", "hi")
    assert code == 1 and msg in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args,msg", [
    (["run", "demo-nope", "--prompt", "x"], "unknown model"),
    (["run", "TINY", "--image", "MISSING", "--prompt", "x"], "image not found"),
    (["run", "TINY", "--image", "NOTIMG", "--prompt", "x"], "not a readable image"),
    (["run", "TINY", "--image", "PNG", "--prompt", "  "], "prompt is empty"),
    (["run", "TINY", "--image", "PNG", "--prompt", "x", "--top-p", "0"], "top_p"),
    (["eval", "TINY", "--data", "shapes:oops"], "bad dataset spec"),
    (["eval", "TINY", "--data", "NODIR"], "dataset not found"),
    (["eval", "TINY", "--data", "shapes:5:1", "--limit", "0"], "--limit"),
    (["info", "PNG"], "directory"),
])
def test_cli_bad_input_gives_one_line_errors(capsys, tmp_path, tiny_ckpt, png, args, msg):
    (tmp_path / "fake.png").write_text("hello")
    subst = {"TINY": str(tiny_ckpt), "MISSING": str(tmp_path / "none.png"), "NOTIMG": str(tmp_path / "fake.png"),
             "PNG": str(png), "NODIR": str(tmp_path / "nodir")}
    code, out, err = run_cli(capsys, *[subst.get(a, a) for a in args])
    assert code != 0 and msg in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_installed_entry_point_reports_errors_without_traceback(tmp_path):
    p = subprocess.run([sys.executable, "-m", "edgemm", "run", "no-such-model", "--prompt", "x"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert p.stderr.strip().startswith("error:") and "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "-m", "edgemm", "eval", "demo"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--data" in p.stderr


def test_processor_refuses_image_token_in_user_text(tiny_ckpt):
    lm = load_model(str(tiny_ckpt))
    with pytest.raises(EdgemmError):
        lm.processor.encode_prompt("what is <image> here?")


@pytest.mark.parametrize("name,floor", [("demo", 0.9), ("demo-small", 0.75)])
def test_shipped_demo_models_answer_held_out_questions(capsys, name, floor):
    """The models shipped in the package load and answer a slice of the held-out set (full figures: README)."""
    from edgemm.data import HELDOUT

    code, out, err = run_cli(capsys, "eval", name, "--data", HELDOUT, "--limit", "192", "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["n"] == 192 and rep["accuracy"] >= floor, rep
