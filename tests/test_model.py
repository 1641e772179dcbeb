"""EdgeVLM numerics against the plain numpy reference, KV cache, batching and generation."""

import numpy as np
import pytest
import torch

import reference_model as ref
from conftest import random_model, tiny_config
from edgemm.errors import EdgemmError
from edgemm.models.generation import SamplingConfig, generate, sample_next
from edgemm.models.modeling import KVCache, positions_from_mask

IMG = 3  # image token id of the demo tokenizer


def _ids(cfg, n_before=3, n_after=5, seed=0):
    rng = np.random.default_rng(seed)
    pool = [i for i in range(10, cfg.text.vocab_size)]
    return [1] + list(rng.choice(pool, n_before)) + [IMG] + list(rng.choice(pool, n_after))


@pytest.mark.parametrize("over", [
    {},
    {"vision_feature_layer": -1},
    {"vision_feature_layer": 1, "vision_feature_select": "full"},
])
def test_forward_matches_numpy_reference(over):
    cfg = tiny_config(**over)
    cfg.vision.pre_layernorm = over.get("vision_feature_layer") == -1
    cfg.vision.hidden_act = "quick_gelu" if over.get("vision_feature_select") == "full" else "gelu"
    m = random_model(cfg)
    ids = _ids(cfg)
    px = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        got = m(torch.tensor([ids]), px)[0].double().numpy()
    want = ref.forward(ref.state_dict_f64(m), cfg, ids, px[0].double().numpy())
    assert got.shape == want.shape == (len(ids) - 1 + cfg.num_visual_tokens, cfg.text.vocab_size)
    assert np.abs(got - want).max() < 1e-4


def test_text_only_forward_matches_reference():
    cfg = tiny_config()
    m = random_model(cfg, seed=3)
    ids = [1, 40, 41, 42, 43]
    with torch.no_grad():
        got = m(torch.tensor([ids]))[0].double().numpy()
    want = ref.forward(ref.state_dict_f64(m), cfg, ids, None)
    assert np.abs(got - want).max() < 1e-4


def test_cls_attention_of_any_block_matches_reference():
    cfg = tiny_config()
    m = random_model(cfg, seed=1)
    px = torch.randn(2, 3, 32, 32)
    sd = ref.state_dict_f64(m)
    with torch.no_grad():
        _, attns = m.vision(px, attn_layers=(0, 2, -1))
    assert sorted(attns) == [0, 2]  # -1 is the last block, 2
    for blk in (0, 2):
        a = attns[blk]
        assert a.shape == (2, cfg.vision.num_heads, cfg.vision.num_patches)
        want = ref.cls_attention(sd, cfg, px[1].double().numpy(), blk)
        assert np.abs(a[1].double().numpy() - want).max() < 1e-5
        # a softmax row over CLS + patches: the patch part sums to < 1
        assert bool((a.sum(-1) < 1).all())


def test_cls_attention_beyond_feature_layer_is_an_error():
    m = random_model(tiny_config())  # feature layer -2: blocks 0, 1 run
    with pytest.raises(EdgemmError):
        m.vision_features(torch.randn(1, 3, 32, 32), attn_layers=(2,))


def test_kv_cache_incremental_equals_full_forward():
    cfg = tiny_config()
    m = random_model(cfg, seed=2)
    ids = torch.tensor([_ids(cfg, 2, 6)])
    px = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        full = m(ids, px)
        emb = m.merge_image(ids, m.encode_image(px).embeds)
        cache = KVCache(cfg.text.num_layers)
        n = emb.shape[1]
        pieces = []
        split = [0, n - 5, n - 3, n - 2, n - 1, n]
        for a, b in zip(split, split[1:]):
            pos = torch.arange(a, b)[None]
            pieces.append(m.text(emb[:, a:b], pos, None, cache))
        inc = torch.cat(pieces, 1)
    assert len(cache) == n
    assert torch.allclose(full, inc, atol=1e-5)


def test_left_padding_in_a_batch_does_not_change_logits():
    cfg = tiny_config()
    m = random_model(cfg, seed=4)
    a, b = _ids(cfg, 2, 3, seed=1), _ids(cfg, 4, 6, seed=2)
    px = torch.randn(2, 3, 32, 32)
    t = max(len(a), len(b))
    ids = torch.zeros(2, t, dtype=torch.long)
    mask = torch.zeros(2, t, dtype=torch.long)
    for i, s in enumerate((a, b)):
        ids[i, t - len(s):] = torch.tensor(s)
        mask[i, t - len(s):] = 1
    with torch.no_grad():
        batched = m(ids, px, mask)
        single = m(torch.tensor([a]), px[:1])
    k = single.shape[1]
    assert torch.allclose(batched[0, -k:], single[0], atol=1e-5)


def test_positions_skip_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_greedy_generation_equals_argmax_loop_and_stops_at_eos():
    cfg = tiny_config()
    m = random_model(cfg, seed=5)
    ids = torch.tensor([_ids(cfg)])
    px = torch.randn(1, 3, 32, 32)
    res = generate(m, ids, px, sampling=SamplingConfig(max_new_tokens=6))
    # the same by recomputing full sequences without a cache
    seq = ids
    want = []
    with torch.no_grad():
        for _ in range(6):
            nxt = int(m(seq, px)[0, -1].argmax())
            if nxt == cfg.eos_token_id:
                break
            want.append(nxt)
            seq = torch.cat([seq, torch.tensor([[nxt]])], 1)
    assert res.tokens[0] == want
    # with the first greedy token declared EOS, generation stops with nothing
    res2 = generate(m, ids, px, sampling=SamplingConfig(max_new_tokens=6), eos_token_id=want[0] if want else cfg.eos_token_id)
    assert res2.tokens[0] == []
    assert res.stats.prefill_tokens == ids.shape[1] - 1 + cfg.num_visual_tokens


def test_sampling_controls():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    g = torch.Generator().manual_seed(1)
    # top_k=1 and tiny top_p are greedy
    assert torch.equal(sample_next(logits, SamplingConfig(temperature=1.0, top_k=1), g), logits.argmax(-1))
    assert torch.equal(sample_next(logits, SamplingConfig(temperature=1.0, top_p=1e-6), g), logits.argmax(-1))
    # top_k=3 only ever picks among the top 3
    top3 = logits.topk(3, -1).indices
    for _ in range(50):
        s = sample_next(logits, SamplingConfig(temperature=2.0, top_k=3), g)
        assert bool((top3 == s[:, None]).any(-1).all())
    # same seed, same samples
    a = sample_next(logits, SamplingConfig(temperature=1.0), torch.Generator().manual_seed(7))
    b = sample_next(logits, SamplingConfig(temperature=1.0), torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_sampled_generation_is_seeded_and_validated():
    cfg = tiny_config()
    m = random_model(cfg, seed=6)
    ids = torch.tensor([_ids(cfg)])
    px = torch.randn(1, 3, 32, 32)
    s = SamplingConfig(max_new_tokens=8, temperature=1.5, top_p=0.9, seed=11)
    assert generate(m, ids, px, sampling=s).tokens == generate(m, ids, px, sampling=s).tokens
    for bad in (SamplingConfig(max_new_tokens=0), SamplingConfig(temperature=-1), SamplingConfig(top_p=0)):
        with pytest.raises(EdgemmError):
            generate(m, ids, px, sampling=bad)


def test_prompt_past_context_is_refused():
    cfg = tiny_config()
    m = random_model(cfg)
    ids = torch.tensor([[1] * 100 + [IMG]])
    with pytest.raises(EdgemmError, match="context"):
        generate(m, ids, torch.randn(1, 3, 32, 32), sampling=SamplingConfig(max_new_tokens=20))


def test_image_token_rules():
    cfg = tiny_config()
    m = random_model(cfg)
    with pytest.raises(EdgemmError):
        m(torch.tensor([[1, IMG, 5]]))  # image token without an image
    with pytest.raises(EdgemmError):
        m(torch.tensor([[1, IMG, IMG, 5]]), torch.randn(1, 3, 32, 32))
    with pytest.raises(EdgemmError):
        m(torch.tensor([[1, IMG, 5]]), torch.randn(1, 3, 16, 16))
