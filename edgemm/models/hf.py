"""Import a Hugging Face `LlavaForConditionalGeneration` checkpoint directory into EdgeVLM.

Reads config.json, *.safetensors (sharded or not), tokenizer.json and preprocessor_config.json
directly (transformers is not needed). Anything edgemm cannot represent exactly is refused with an
error that names the config field.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from tokenizers import Tokenizer

from ..errors import EdgemmError
from .checkpoint import LoadedModel, load_state, read_config, read_safetensors
from .config import ProjectorConfig, TextConfig, VisionConfig, VLMConfig
from .modeling import EdgeVLM
from ..processor import Processor

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VISION_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


def is_hf_llava(path: Path) -> bool:
    f = path / "config.json"
    if not f.is_file():
        return False
    try:
        return json.loads(f.read_text()).get("model_type") == "llava"
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def _refuse(field: str, value, why: str = "") -> EdgemmError:
    return EdgemmError(f"cannot import this LLaVA checkpoint: {field} = {value!r} is not supported{': ' + why if why else ''}")


def config_from_hf(hf: dict, preproc: dict | None = None) -> VLMConfig:
    if hf.get("model_type") != "llava":
        raise _refuse("model_type", hf.get("model_type"), "expected 'llava'")
    v = hf.get("vision_config") or {}
    t = hf.get("text_config") or {}
    if v.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise _refuse("vision_config.model_type", v.get("model_type"), "edgemm's ViT needs a [CLS] token (CLIP)")
    if t.get("model_type", "llama") not in ("llama", "mistral"):
        raise _refuse("text_config.model_type", t.get("model_type"), "edgemm's decoder is Llama-style")
    if t.get("model_type") == "mistral" and t.get("sliding_window") is not None:
        raise _refuse("text_config.sliding_window", t.get("sliding_window"))
    for field in ("attention_bias", "mlp_bias"):
        if t.get(field):
            raise _refuse(f"text_config.{field}", t[field])
    if t.get("hidden_act", "silu") != "silu":
        raise _refuse("text_config.hidden_act", t.get("hidden_act"))
    rope = t.get("rope_parameters") or {}
    if t.get("rope_scaling"):
        raise _refuse("text_config.rope_scaling", t["rope_scaling"])
    if rope.get("rope_type", "default") != "default":
        raise _refuse("text_config.rope_parameters.rope_type", rope.get("rope_type"))
    if t.get("pretraining_tp", 1) != 1:
        raise _refuse("text_config.pretraining_tp", t["pretraining_tp"])
    vact = v.get("hidden_act", "quick_gelu")
    if vact not in VISION_ACTS:
        raise _refuse("vision_config.hidden_act", vact)
    pact = hf.get("projector_hidden_act", "gelu")
    if pact not in VISION_ACTS:
        raise _refuse("projector_hidden_act", pact)
    layer = hf.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise _refuse("vision_feature_layer", layer, "only a single layer index")
    select = hf.get("vision_feature_select_strategy", "default")
    if select not in ("default", "full"):
        raise _refuse("vision_feature_select_strategy", select)
    if (v.get("num_channels", 3)) != 3:
        raise _refuse("vision_config.num_channels", v.get("num_channels"))

    hidden, heads = t.get("hidden_size", 4096), t.get("num_attention_heads", 32)
    mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    if preproc:
        mean = tuple(preproc.get("image_mean", mean))
        std = tuple(preproc.get("image_std", std))
    vision = VisionConfig(
        image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 32), num_channels=3,
        hidden_size=v.get("hidden_size", 768), num_layers=v.get("num_hidden_layers", 12),
        num_heads=v.get("num_attention_heads", 12), intermediate_size=v.get("intermediate_size", 3072),
        layer_norm_eps=v.get("layer_norm_eps", 1e-5), hidden_act=VISION_ACTS[vact], patch_bias=False,
        pre_layernorm=True, image_mean=mean, image_std=std, image_resize="crop")
    text = TextConfig(
        vocab_size=t.get("vocab_size", 32000), hidden_size=hidden, num_layers=t.get("num_hidden_layers", 32),
        num_heads=heads, num_kv_heads=t.get("num_key_value_heads") or heads,
        head_dim=t.get("head_dim") or hidden // heads, intermediate_size=t.get("intermediate_size", 11008),
        rms_norm_eps=t.get("rms_norm_eps", 1e-6), rope_theta=rope.get("rope_theta", t.get("rope_theta", 10000.0)),
        max_position_embeddings=t.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(t.get("tie_word_embeddings", hf.get("tie_word_embeddings", False))))
    image_token = hf.get("image_token_index", hf.get("image_token_id"))
    if image_token is None:
        raise _refuse("image_token_index", None, "the config must name the image token")
    bos = t.get("bos_token_id", 1)
    eos = t.get("eos_token_id", 2)
    if isinstance(eos, list):
        eos = eos[0]
    pad = t.get("pad_token_id", hf.get("pad_token_id"))
    cfg = VLMConfig(
        vision=vision, text=text, projector=ProjectorConfig(VISION_ACTS[pact], bool(hf.get("multimodal_projector_bias", True))),
        vision_feature_layer=layer, vision_feature_select=select, image_token_id=image_token,
        bos_token_id=1 if bos is None else bos, eos_token_id=2 if eos is None else eos,
        pad_token_id=pad if pad is not None else (0 if eos is None else eos))
    return cfg.validate()


_VISION = re.compile(r"^(?:model\.)?vision_tower\.(?:vision_model\.)?(.*)$")
_PROJ = re.compile(r"^(?:model\.)?multi_modal_projector\.(.*)$")
_TEXT = re.compile(r"^(?:language_model\.model\.|model\.language_model\.)(.*)$")
_HEAD = re.compile(r"^(?:language_model\.)?lm_head\.weight$")


def convert_state_dict(hf_sd: dict[str, torch.Tensor], cfg: VLMConfig) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, w in hf_sd.items():
        w = w.float()
        if m := _VISION.match(k):
            rest = m.group(1)
            if rest.startswith("post_layernorm."):
                continue  # only the pooled output uses it; LLaVA does not
            rest = (rest.replace("embeddings.patch_embedding.weight", "patch_embed.weight")
                        .replace("embeddings.patch_embedding.bias", "patch_embed.bias")
                        .replace("embeddings.class_embedding", "class_embedding")
                        .replace("embeddings.position_embedding.weight", "position_embedding")
                        .replace("pre_layrnorm.", "pre_layernorm.")
                        .replace("encoder.layers.", "layers."))
            if rest == "patch_embed.weight":
                w = w.reshape(w.shape[0], -1)
            out["vision." + rest] = w
        elif m := _PROJ.match(k):
            out["projector." + m.group(1)] = w
        elif m := _TEXT.match(k):
            if "rotary_emb" in k:
                continue
            out["text." + m.group(1)] = w
        elif _HEAD.match(k):
            out["text.lm_head.weight"] = w
        elif k.endswith("position_ids"):
            continue
        else:
            raise EdgemmError(f"cannot import this LLaVA checkpoint: unknown tensor {k}")
    if cfg.text.tie_word_embeddings:
        out.pop("text.lm_head.weight", None)
    return out


def read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        if list(path.glob("*.bin")) or list(path.glob("*.pt")):
            raise EdgemmError(f"{path} holds only pickle weights (*.bin); edgemm loads safetensors only (re-save with safe_serialization=True)")
        raise EdgemmError(f"no *.safetensors weights in {path}")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(read_safetensors(f))
    return sd


def from_hf(path: str | Path) -> LoadedModel:
    """Load a Hugging Face LLaVA directory (config.json, safetensors, tokenizer.json) as an EdgeVLM."""
    path = Path(path)
    if not path.is_dir():
        raise EdgemmError(f"not a model directory: {path}")
    hf = read_config(path)
    pre = None
    if (path / "preprocessor_config.json").is_file():
        try:
            pre = json.loads((path / "preprocessor_config.json").read_text())
        except json.JSONDecodeError as e:
            raise EdgemmError(f"{path / 'preprocessor_config.json'} is not valid JSON ({e})") from None
    cfg = config_from_hf(hf, pre)
    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
        raise EdgemmError(f"no tokenizer.json in {path} (save the tokenizer with a fast tokenizer)")
    try:
        tok = Tokenizer.from_file(str(tok_file))
    except Exception as e:
        raise EdgemmError(f"cannot read tokenizer {tok_file}: {str(e).splitlines()[0][:200]}") from None
    processor = Processor(tok, cfg)
    model = EdgeVLM(cfg)
    load_state(model, convert_state_dict(read_hf_weights(path), cfg), str(path))
    model.eval()
    return LoadedModel(model, processor, str(path), path)
