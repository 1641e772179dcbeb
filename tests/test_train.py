"""The training loop and the demo recipe's pieces on tiny models."""

import pytest
import torch

from conftest import random_model, tiny_config
from edgemm.errors import EdgemmError
from edgemm.processor import Processor
from edgemm.train.data import IGNORE, conversation_ids, make_batch, vision_targets
from edgemm.train.demo import answer_loss
from edgemm.train.loop import TrainConfig, train


@pytest.fixture()
def proc(demo_tokenizer):
    return Processor(demo_tokenizer, tiny_config())


def test_conversation_first_turn_is_the_inference_prompt(proc):
    qas = [("how many objects are there?", "two", "count_all"), ("is there a red circle?", "no", "exists")]
    ids, labels = conversation_ids(proc, qas)
    first = proc.encode_prompt(qas[0][0])
    assert ids[: len(first)] == first
    ans = proc.encode_answer("two")
    assert ids[len(first): len(first) + len(ans)] == ans and ans[-1] == proc.config.eos_token_id
    supervised = [t for t, l in zip(ids, labels) if l != IGNORE]
    assert supervised == ans + proc.encode_answer("no")
    assert proc.decode(ans) == "two"


def test_batches_are_reproducible_per_step_and_rank(proc):
    a, b = make_batch(proc, 3, 0, 5), make_batch(proc, 3, 0, 5)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.pixel_values, b.pixel_values)
    c = make_batch(proc, 3, 0, 5, rank=1)
    assert not torch.equal(a.pixel_values, c.pixel_values)
    assert a.vision_targets.shape[0] == 3


def test_vision_targets_encode_the_scene():
    from edgemm.data.shapes import Obj

    t = vision_targets([Obj("circle", "red", 2, 2, 12), Obj("square", "blue", 40, 40, 14)])
    assert t[:12].sum() == 2 and t[12:24].sum() == 1 and t[24:28].tolist() == [0, 1, 0, 0]


def _tiny_run(proc, tmp_path, steps, ckpt=None, fail_at=None):
    torch.manual_seed(0)
    model = random_model(tiny_config(), seed=0)
    model.train()

    def loss_fn(m, step):
        if fail_at is not None and step == fail_at:
            raise KeyboardInterrupt
        loss, _, _ = answer_loss(m, make_batch(proc, 4, 0, step % 2))
        return loss, {}

    cfg = TrainConfig(steps=steps, lr=3e-3, warmup=2, batch_size=4, bf16=False, ckpt_every=4, log_every=1)
    return model, train(model, loss_fn, cfg, ckpt, quiet=True)


def test_training_decreases_the_loss(proc, tmp_path):
    _, res = _tiny_run(proc, tmp_path, 30)
    first = sum(h["loss"] for h in res.history[:4]) / 4
    last = sum(h["loss"] for h in res.history[-4:]) / 4
    assert last < 0.6 * first


def test_resume_after_interruption_matches_an_uninterrupted_run(proc, tmp_path):
    straight, _ = _tiny_run(proc, tmp_path, 10)
    with pytest.raises(KeyboardInterrupt):
        _tiny_run(proc, tmp_path, 10, ckpt=tmp_path / "ck", fail_at=6)
    resumed, res = _tiny_run(proc, tmp_path, 10, ckpt=tmp_path / "ck")
    assert res.history[0]["step"] == 1 and len(res.history) == 10  # history carried over
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k


def test_resume_refuses_a_different_config(proc, tmp_path):
    _tiny_run(proc, tmp_path, 4, ckpt=tmp_path / "ck")
    with pytest.raises(EdgemmError, match="another training config"):
        _tiny_run(proc, tmp_path, 6, ckpt=tmp_path / "ck")
