import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


def tiny_config(**over):
    from edgemm.models.config import TextConfig, VisionConfig, VLMConfig

    from edgemm.tokenizer_build import build_demo_tokenizer

    vocab = build_demo_tokenizer().get_vocab_size()
    vision = VisionConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64)
    text = TextConfig(vocab_size=vocab, hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=12,
                      intermediate_size=80, max_position_embeddings=128)
    cfg = VLMConfig(vision=vision, text=text)
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg.validate()


def random_model(cfg=None, seed=0):
    import torch

    from edgemm.models.modeling import EdgeVLM

    torch.manual_seed(seed)
    m = EdgeVLM(cfg or tiny_config())
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
        for n, p in m.named_parameters():
            if n.endswith("norm.weight") or "layer_norm" in n and n.endswith("weight") or n.endswith("layernorm.weight"):
                p.add_(1.0)
    return m.eval()


@pytest.fixture(scope="session")
def demo_tokenizer():
    from edgemm.tokenizer_build import build_demo_tokenizer

    return build_demo_tokenizer()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, demo_tokenizer):
    """A small random edgemm checkpoint directory."""
    from edgemm.models.checkpoint import save_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(random_model(), demo_tokenizer, path)
    return path
