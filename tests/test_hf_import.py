"""Hugging Face LLaVA import: tiny random models from transformers configs, compared with transformers."""

import json

import numpy as np
import pytest
import torch

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, PreTrainedTokenizerFast

from edgemm.errors import EdgemmError
from edgemm.models import from_hf, load_model
from edgemm.models.generation import SamplingConfig

VOCAB = 120
IMAGE_ID = 119


def make_llava(path, image_size=32, patch_size=8, feature_layer=-2, select="default", kv_heads=2, heads=4,
               vision_act="quick_gelu", tie=False, seed=0, **cfg_over):
    torch.manual_seed(seed)
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          image_size=image_size, patch_size=patch_size, projection_dim=16, hidden_act=vision_act)
    tc = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=heads,
                     num_key_value_heads=kv_heads, max_position_embeddings=256, tie_word_embeddings=tie)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=IMAGE_ID, vision_feature_layer=feature_layer,
                      vision_feature_select_strategy=select, tie_word_embeddings=tie, **cfg_over)
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random init gives tiny logits; make differences visible
        for n, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.1)
    model.save_pretrained(path)
    vocab = {f"w{i}": i for i in range(IMAGE_ID)}
    vocab["<image>"] = IMAGE_ID
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<image>"])
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(path)
    return model


CASES = [
    dict(),  # GQA 4/2, penultimate layer, patches only
    dict(feature_layer=-1),
    dict(feature_layer=-2, select="full"),
    dict(image_size=48, patch_size=16, kv_heads=1),
    dict(image_size=28, patch_size=4, kv_heads=4, vision_act="gelu"),
    dict(tie=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_logits_match_transformers(tmp_path, case):
    hf = make_llava(tmp_path, **case)
    lm = from_hf(tmp_path)
    cfg = lm.config
    size = case.get("image_size", 32)
    k = cfg.num_visual_tokens
    ids = [1, 5, 6, IMAGE_ID, 7, 8, 9, 10]
    hf_ids = ids[:3] + [IMAGE_ID] * k + ids[4:]
    px = torch.randn(1, 3, size, size)
    with torch.no_grad():
        want = hf(input_ids=torch.tensor([hf_ids]), pixel_values=px).logits
        got = lm.model(torch.tensor([ids]), px)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-4
    # text-only prompts too
    with torch.no_grad():
        want_t = hf(input_ids=torch.tensor([[1, 5, 6, 7]])).logits
        got_t = lm.model(torch.tensor([[1, 5, 6, 7]]))
    assert (got_t - want_t).abs().max().item() <= 1e-4


def test_load_model_detects_hf_and_greedy_matches_transformers_generate(tmp_path):
    hf = make_llava(tmp_path, seed=3)
    lm = load_model(str(tmp_path))
    assert lm.config.vision_feature_layer == -2 and lm.config.text.num_kv_heads == 2
    k = lm.config.num_visual_tokens
    ids = [1, 5, IMAGE_ID, 7, 8]
    px = torch.randn(1, 3, 32, 32)
    out = lm.model.generate(torch.tensor([ids]), px, eos_token_id=-1, sampling=SamplingConfig(max_new_tokens=5))
    want = hf.generate(input_ids=torch.tensor([ids[:2] + [IMAGE_ID] * k + ids[3:]]), pixel_values=px,
                       max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.tokens[0] == want[0, -5:].tolist()


@pytest.mark.parametrize("field,edit", [
    ("text_config.model_type", lambda c: c["text_config"].update(model_type="qwen2")),
    ("vision_config.model_type", lambda c: c["vision_config"].update(model_type="siglip_vision_model")),
    ("vision_feature_layer", lambda c: c.update(vision_feature_layer=[-2, -5])),
    ("vision_feature_select_strategy", lambda c: c.update(vision_feature_select_strategy="cls")),
    ("text_config.attention_bias", lambda c: c["text_config"].update(attention_bias=True)),
    ("text_config.rope_scaling", lambda c: c["text_config"].update(rope_scaling={"type": "linear", "factor": 2.0})),
    ("text_config.hidden_act", lambda c: c["text_config"].update(hidden_act="gelu")),
    ("projector_hidden_act", lambda c: c.update(projector_hidden_act="relu")),
])
def test_unrepresentable_config_is_refused_naming_the_field(tmp_path, field, edit):
    make_llava(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    edit(cfg)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EdgemmError) as e:
        from_hf(tmp_path)
    assert field in str(e.value)


def test_pickle_only_checkpoint_is_refused(tmp_path):
    make_llava(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(EdgemmError, match="safetensors"):
        from_hf(tmp_path)


def test_hf_image_preprocessing_uses_preprocessor_config(tmp_path):
    make_llava(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.1, 0.2, 0.3], "image_std": [0.5, 0.5, 0.5]}))
    lm = from_hf(tmp_path)
    assert lm.config.vision.image_mean == (0.1, 0.2, 0.3)
    x = lm.processor.images([np.full((40, 60, 3), 255, np.uint8)])
    assert x.shape == (1, 3, 32, 32)
    assert np.allclose(x[0, 0], (1 - 0.1) / 0.5, atol=1e-5)
