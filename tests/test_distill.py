"""LLaVA-KD distillation: the losses against hand-computed values, the stage wiring, a tiny run that
learns, resume after an interruption, the CLI, and DDP under torchrun."""

import copy
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import random_model, tiny_config
from edgemm.distill.losses import kd_kl, rdist, self_similarity
from edgemm.distill.trainer import DistillConfig, distill, kd_loss, run_model, student_config
from edgemm.errors import EdgemmError
from edgemm.processor import Processor
from edgemm.train.data import make_batch


def test_kd_kl_matches_a_hand_computation():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 0.0]])
    t = torch.tensor([[2.0, 1.0, 0.0], [1.0, -1.0, 3.0]])
    T = 2.0

    def softmax(z):
        e = [math.exp(v / T) for v in z]
        return [x / sum(e) for x in e]

    want = 0.0
    for zs, zt in zip(s.tolist(), t.tolist()):
        ps, pt = softmax(zs), softmax(zt)
        want += sum(a * math.log(a / b) for a, b in zip(pt, ps))
    want = want / 2 * T * T
    assert kd_kl(s, t, T).item() == pytest.approx(want, rel=1e-5)
    assert kd_kl(t, t, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_kl(s[:0], t[:0], T).item() == 0.0  # no position selected


def test_rdist_matches_a_hand_computation_and_ignores_the_hidden_size():
    hs = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]]])
    ht = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])
    r = 1 / math.sqrt(2)
    rs = np.array([[1, r, 0], [r, 1, r], [0, r, 1]])
    rt = np.eye(3)
    cos = (rs * rt).sum() / (np.linalg.norm(rs) * np.linalg.norm(rt))
    assert torch.allclose(self_similarity(hs)[0], torch.tensor(rs, dtype=torch.float32), atol=1e-6)
    assert rdist(hs, ht).item() == pytest.approx(1 - cos, rel=1e-5)
    # a student whose outputs are a rotation + scaling of the teacher's (in a bigger space) has the same relations
    torch.manual_seed(0)
    t = torch.randn(2, 5, 4)
    q, _ = torch.linalg.qr(torch.randn(6, 6))
    st = 3.0 * torch.cat([t, torch.zeros(2, 5, 2)], -1) @ q
    assert rdist(st, t).item() == pytest.approx(0.0, abs=1e-5)
    assert rdist(torch.randn(2, 5, 4), t).item() > 0.01


@pytest.fixture(scope="module")
def setup(demo_tokenizer):
    tcfg = tiny_config()
    teacher = random_model(tcfg, seed=0)
    scfg = copy.deepcopy(tcfg)
    scfg.text.hidden_size, scfg.text.intermediate_size, scfg.text.num_layers, scfg.text.num_heads = 32, 48, 1, 2
    scfg.text.num_kv_heads, scfg.text.head_dim = 1, 16
    return teacher, Processor(demo_tokenizer, tcfg), scfg.validate()


def test_kd_terms_vanish_when_the_student_is_the_teacher(setup):
    teacher, proc, _ = setup
    b = make_batch(proc, 3, 0, 0)
    with torch.no_grad():
        logits, hidden, k = run_model(teacher, b)
        loss, m = kd_loss(logits, hidden, logits, hidden, b, k, teacher.config.image_token_id, DistillConfig(), True)
    assert k == 16
    assert m["kl_resp"].item() == pytest.approx(0, abs=1e-5) and m["kl_vis"].item() == pytest.approx(0, abs=1e-5)
    assert m["rdist"].item() == pytest.approx(0, abs=1e-5)
    assert loss.item() == pytest.approx(m["ce"].item(), rel=1e-5)
    # and with another model they do not, and they are off in SFT
    other = random_model(teacher.config, seed=9)
    with torch.no_grad():
        lo, ho, _ = run_model(other, b)
        _, m2 = kd_loss(lo, ho, logits, hidden, b, k, teacher.config.image_token_id, DistillConfig(), True)
        _, m3 = kd_loss(lo, ho, logits, hidden, b, k, teacher.config.image_token_id, DistillConfig(), False)
    assert m2["kl_resp"] > 0.01 and m2["kl_vis"] > 0.01 and m2["rdist"] > 1e-4
    assert set(m3) == {"ce", "tok_acc"}


def test_student_config_checks(setup):
    teacher, _, scfg = setup
    assert student_config(_write_student_config_tmp(scfg), teacher.config).text.hidden_size == 32
    with pytest.raises(EdgemmError, match="vision encoder"):  # demo-small has the demo's 64px ViT
        student_config("demo-small", teacher.config)
    with pytest.raises(EdgemmError, match="neither"):
        student_config("/no/such/config.json", teacher.config)


def _tiny(cfg_over=None, **kw):
    d = dict(steps=24, batch_size=4, bf16=False, log_every=1, warmup=2, ckpt_every=4, lr=3e-3, dft_lr=3e-3)
    d.update(kw)
    return DistillConfig(**d)


def test_tiny_distillation_learns_and_follows_the_stages(setup):
    teacher, proc, scfg = setup
    res = distill(teacher, proc, scfg, _tiny(steps=40, split=(0.2, 0.2, 0.6)), None, quiet=True)
    assert [s["stage"] for s in res.stages] == ["dpt", "sft", "dft"] and [s["steps"] for s in res.stages] == [8, 8, 24]
    assert [s["first_step"] for s in res.stages] == [0, 8, 16]
    dft = res.stages[2]["history"]
    first = np.mean([h["loss"] for h in dft[:4]])
    last = np.mean([h["loss"] for h in dft[-4:]])
    assert last < 0.9 * first
    kl_first = np.mean([h["kl_resp"] for h in res.stages[0]["history"][:3]])
    kl_last = np.mean([h["kl_resp"] for h in dft[-4:]])
    assert kl_last < kl_first
    assert "kl_resp" not in res.stages[1]["history"][0]  # SFT: CE only
    # the student's ViT is the teacher's, untouched (frozen)
    for (k, a), b in zip(teacher.vision.state_dict().items(), res.student.vision.state_dict().values()):
        assert torch.equal(a, b), k


def test_ablation_switches(setup):
    teacher, proc, scfg = setup
    res = distill(teacher, proc, scfg, _tiny(steps=6, mdist=False), None, quiet=True)
    assert "rdist" in res.stages[0]["history"][0] and "kl_resp" not in res.stages[0]["history"][0]
    res = distill(teacher, proc, scfg, _tiny(steps=6, rdist=False), None, quiet=True)
    assert "kl_vis" in res.stages[2]["history"][0] and "rdist" not in res.stages[2]["history"][0]
    res = distill(teacher, proc, scfg, _tiny(steps=6, dpt_train=("projector",)), None, quiet=True)
    assert res.stages[0]["trained"] == ["projector"]


def test_resume_after_interruption_matches_an_uninterrupted_run(setup, tmp_path, monkeypatch):
    teacher, proc, scfg = setup
    straight = distill(teacher, proc, scfg, _tiny(), None, quiet=True).student
    import edgemm.distill.trainer as tr

    real = tr.make_batch
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 19:  # DFT step 6 (DPT 7 steps, SFT 5), after its step-4 checkpoint
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(tr, "make_batch", flaky)
    with pytest.raises(KeyboardInterrupt):
        distill(teacher, proc, scfg, _tiny(), tmp_path / "work", quiet=True)
    monkeypatch.setattr(tr, "make_batch", real)
    assert (tmp_path / "work" / "3-dft" / "trainer.json").is_file()
    resumed = distill(teacher, proc, scfg, _tiny(), tmp_path / "work", quiet=True)
    assert [len(s["history"]) for s in resumed.stages] == [7, 5, 12]
    for (k, a), b in zip(straight.state_dict().items(), resumed.student.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k


def _write_student_config_tmp(scfg) -> str:
    import tempfile

    f = Path(tempfile.mkdtemp()) / "student.json"
    return str(_write_student_config(f, scfg))


def _write_student_config(path: Path, scfg):
    path.write_text(json.dumps(scfg.to_dict()))
    return path


def test_cli_distill_writes_a_loadable_student(capsys, tmp_path, tiny_ckpt, setup):
    from edgemm.cli import main
    from edgemm.models import load_model

    _, _, scfg = setup
    sc = _write_student_config(tmp_path / "student.json", scfg)
    code = main(["distill", str(tiny_ckpt), "--student-config", str(sc), "-o", str(tmp_path / "kd"), "--steps", "6",
                 "--batch-size", "2", "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    log = json.loads(out)
    assert [s["stage"] for s in log["stages"]] == ["dpt", "sft", "dft"] and log["config"]["steps"] == 6
    lm = load_model(str(tmp_path / "kd"))
    assert lm.config.text.hidden_size == 32 and (tmp_path / "kd" / "distill_log.json").is_file()
    assert main(["distill", str(tiny_ckpt), "--student-config", "demo-small", "-o", str(tmp_path / "x")]) == 1
    assert "vision encoder" in capsys.readouterr().err


@pytest.mark.slow
def test_distill_runs_unchanged_under_torchrun_with_ddp(tmp_path, tiny_ckpt, setup):
    _, _, scfg = setup
    sc = _write_student_config(tmp_path / "student.json", scfg)
    torchrun = Path(sys.executable).with_name("torchrun")
    assert torchrun.exists(), "torchrun is part of torch"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "edgemm", "distill", str(tiny_ckpt),
           "--student-config", str(sc), "-o", str(tmp_path / "kd"), "--steps", "4", "--batch-size", "2", "--threads", "1", "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    log = json.loads((tmp_path / "kd" / "distill_log.json").read_text())
    assert log["world_size"] == 2
    shutil.rmtree(tmp_path / ".kd.work", ignore_errors=True)


def test_budget_defaults_to_the_sft_baselines(tmp_path):
    from edgemm.train.demo import DemoRecipe

    base = tmp_path / "baseline"
    base.mkdir()
    (base / "train_log.json").write_text(json.dumps({"recipe": {"vlm_steps": 1234, "batch_size": 16, "max_questions": 5, "seed": 3}}))
    c = DistillConfig(baseline=str(base)).resolved()
    assert (c.steps, c.batch_size, c.max_questions, c.seed) == (1234, 16, 5, 3)
    assert c.stage_steps() == [370, 247, 617] and sum(c.stage_steps()) == 1234
    c = DistillConfig(baseline=str(base), steps=10).resolved()
    assert (c.steps, c.batch_size) == (10, 16)
    d = DistillConfig(baseline=None).resolved()
    assert (d.steps, d.batch_size, d.seed) == (DemoRecipe().small_vlm_steps, DemoRecipe().batch_size, DemoRecipe().seed)
    with pytest.raises(EdgemmError, match="not resolved"):
        DistillConfig().stage_steps()
