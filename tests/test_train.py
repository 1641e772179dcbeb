"""The training loop and the demo recipe's pieces on tiny models."""

import pytest
import torch

from conftest import random_model, tiny_config
from edgemm.errors import EdgemmError
from edgemm.processor import Processor
from edgemm.train.data import (IGNORE, N_PATCH_TARGETS, PAIRS, make_batch, packed_forward, packed_ids, patch_targets,
                               vision_targets)
from edgemm.train.demo import answer_loss
from edgemm.train.loop import TrainConfig, train


@pytest.fixture()
def proc(demo_tokenizer):
    return Processor(demo_tokenizer, tiny_config())


def test_packed_row_is_the_prefix_once_then_each_questions_own_prompt_and_answer(proc):
    qas = [("how many objects are there?", "two", "count_all"), ("is there a red circle?", "no", "exists")]
    ids, labels, segs = packed_ids(proc, qas)
    first, second = proc.encode_prompt(qas[0][0]), proc.encode_prompt(qas[1][0])
    cut = first.index(proc.config.image_token_id) + 1
    a1, a2 = proc.encode_answer("two"), proc.encode_answer("no")
    assert ids == first + a1 + second[cut:] + a2
    assert segs == [0] * cut + [1] * (len(first) - cut + len(a1)) + [2] * (len(second) - cut + len(a2))
    assert [t for t, l in zip(ids, labels) if l != IGNORE] == a1 + a2 and a1[-1] == proc.config.eos_token_id
    assert proc.decode(a1) == "two"


def test_each_packed_turn_is_computed_exactly_as_its_single_turn_prompt(proc):
    """The block mask and restarted positions make turn j's logits equal those of the plain prompt
    "question j" + its answer: no turn sees another turn, as at inference."""
    model = random_model(tiny_config(), seed=1).eval()
    b = make_batch(proc, 3, 0, 7, max_questions=5)
    with torch.no_grad():
        emb = model.encode_image(b.pixel_values).embeds
        packed = packed_forward(model, b, emb)
    k = emb.shape[1]
    image = proc.config.image_token_id
    checked = 0
    for i in range(3):
        ids, segs = b.input_ids[i].tolist(), b.segments[i].tolist()
        cut = segs.count(0)
        for j in range(1, max(segs) + 1):
            turn = [t for t, s in zip(ids, segs) if s == j]
            start = segs.index(j)
            single = torch.tensor([ids[:cut] + turn])
            with torch.no_grad():
                want = model(single, b.pixel_values[i:i + 1])[0, cut - 1 + k:]
            got = packed[i, start - 1 + k: start - 1 + k + len(turn)]
            assert torch.allclose(got, want, atol=1e-5), (i, j, (got - want).abs().max())
            checked += 1
    assert checked >= 6 and image in ids


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


def test_patch_targets_mark_each_objects_patches_with_its_pair_and_side():
    from edgemm.data.shapes import Obj

    left, right = Obj("circle", "red", 2, 2, 12), Obj("square", "blue", 40, 41, 14)
    t = patch_targets([left, right], grid=8, patch=8).reshape(8, 8, N_PATCH_TARGETS)
    jl = 2 * PAIRS.index(("red", "circle"))  # left side: even slot
    jr = 2 * PAIRS.index(("blue", "square")) + 1  # right side: odd slot
    assert {(int(r), int(c)) for r, c in zip(*t[..., jl].nonzero())} == {(0, 0), (0, 1), (1, 0), (1, 1)}  # px 2..13
    assert {(int(r), int(c)) for r, c in zip(*t[..., jr].nonzero())} == {(5, 5), (5, 6), (6, 5), (6, 6)}  # px 40..53, 41..54
    assert t.sum() == 8


def test_training_examples_ask_every_binding_question_and_balanced_exists():
    import numpy as np

    from edgemm.data import shapes

    rng = np.random.default_rng(3)
    for _ in range(50):
        im, qas, scene = shapes.training_example(rng, max_questions=100)
        cands = shapes.candidates(scene)
        for t in ("color", "shape", "position", "count_shape", "count_all"):
            assert {q for q, _a, tt in qas if tt == t} == {q for q, _a in cands[t]}, t
        ex = [a for _q, a, t in qas if t == "exists"]
        assert ex.count("yes") == ex.count("no") == min(2, sum(a == "yes" for _q, a in cands["exists"]))
        assert len({q for q, _a, _t in qas}) == len(qas)


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
