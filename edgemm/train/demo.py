"""`edgemm train-demo`: trains the shipped demo models on the shapes task, on CPU, seeded.

The recipe mirrors how real VLMs are built, at toy scale:
1. a ViT is pre-trained as a classifier through its [CLS] token (as CLIP/ImageNet ViTs are), so its
   [CLS] attention means something (FasterVLM-style token pruning relies on that), and with a dense
   per-patch objective on the block the projector reads (which object, left or right, covers each
   patch), as detection/segmentation pre-training gives real encoders localized patch features;
2. the VLM (that ViT + a fresh MLP projector + a fresh Llama-style decoder) is trained on visual
   question answering, every question a scene allows per image, packed so that each is computed as
   its own single-turn prompt (edgemm.train.data), loss on the answers only, with the ViT fine-tuned
   at a lower rate.
`demo` (the teacher) and `demo-small` (a smaller decoder: the distillation student's baseline) start
from the same pre-trained ViT and train on the same data stream; demo-small trains the first half of
demo's steps (its budget is also the distilled student's, see docs/distillation.md).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..models.config import TextConfig, VisionConfig, VLMConfig
from ..models.modeling import EdgeVLM, VisionTransformer
from ..processor import Processor
from ..tokenizer_build import build_demo_tokenizer
from .data import IGNORE, N_PATCH_TARGETS, N_VISION_TARGETS, make_batch, merged_labels, packed_forward
from .loop import TrainConfig, train


def demo_vision() -> VisionConfig:
    return VisionConfig(image_size=64, patch_size=8, hidden_size=192, num_layers=6, num_heads=6, intermediate_size=768)


def demo_config(vocab_size: int) -> VLMConfig:
    return VLMConfig(vision=demo_vision(), text=TextConfig(vocab_size=vocab_size, hidden_size=256, num_layers=6, num_heads=8,
                                                           num_kv_heads=2, head_dim=32, intermediate_size=704))


def demo_small_config(vocab_size: int) -> VLMConfig:
    return VLMConfig(vision=demo_vision(), text=TextConfig(vocab_size=vocab_size, hidden_size=128, num_layers=4, num_heads=4,
                                                           num_kv_heads=1, head_dim=32, intermediate_size=352))


@dataclass
class DemoRecipe:
    seed: int = 0
    vision_steps: int = 3000
    vision_lr: float = 1e-3
    vlm_steps: int = 3000  # demo
    small_vlm_steps: int = 1500  # demo-small (the distillation baseline; its budget is the student's)
    vlm_lr: float = 1e-3
    vit_lr_scale: float = 0.1  # the pre-trained ViT fine-tunes at a tenth of the rate
    batch_size: int = 32
    max_questions: int = 12  # questions per image: every binding one, then counts and exists (<= 19 apply)
    bf16: bool = True
    patch_loss_weight: float = 1.0  # the ViT pre-training's per-patch (dense) objective, beside [CLS]


class VisionPretrainHead(nn.Module):
    """Training-only heads (not shipped): a classifier on the [CLS] token of the ViT's last block, and
    a per-patch classifier on the block the projector reads (`feature_layer`)."""

    def __init__(self, vit: VisionTransformer, feature_layer: int):
        super().__init__()
        self.vit = vit
        self.feature_layer = feature_layer
        d = vit.cfg.hidden_size
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, N_VISION_TARGETS)
        self.patch_norm = nn.LayerNorm(d)
        self.patch_head = nn.Linear(d, N_PATCH_TARGETS)

    def forward(self, pixel_values):
        """([B, N_VISION_TARGETS] [CLS] logits, [B, P, N_PATCH_TARGETS] patch logits)."""
        h, _ = self.vit(pixel_values, num_layers=self.feature_layer)
        patch_logits = self.patch_head(self.patch_norm(h[:, 1:]))
        for layer in self.vit.layers[self.feature_layer:]:
            h, _ = layer(h)
        return self.head(self.norm(h[:, 0])), patch_logits


def init_weights(model: nn.Module, std: float = 0.02) -> None:
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
    for name, p in model.named_parameters():
        if name.endswith(("class_embedding", "position_embedding")):
            nn.init.normal_(p, std=std)


def pretrain_vision(processor: Processor, recipe: DemoRecipe, ckpt_dir: Path | None, quiet: bool = False):
    torch.manual_seed(recipe.seed)
    net = VisionPretrainHead(VisionTransformer(processor.config.vision), processor.config.feature_layer_index)
    init_weights(net)

    def loss_fn(m, step):
        b = make_batch(processor, recipe.batch_size, recipe.seed, step, max_questions=1)
        logits, patch_logits = m(b.pixel_values)
        loss = F.binary_cross_entropy_with_logits(logits.float(), b.vision_targets)
        patch_loss = F.binary_cross_entropy_with_logits(patch_logits.float(), b.patch_targets)
        acc = ((logits > 0).float() == b.vision_targets).float().mean()
        # exact-match per patch: every pair/side bit of the patch right
        patch_acc = ((patch_logits > 0).float() == b.patch_targets).all(-1).float().mean()
        return loss + recipe.patch_loss_weight * patch_loss, {"bit_acc": acc, "patch_acc": patch_acc}

    cfg = TrainConfig(steps=recipe.vision_steps, lr=recipe.vision_lr, warmup=100, weight_decay=0.05,
                      batch_size=recipe.batch_size, seed=recipe.seed, bf16=recipe.bf16)
    res = train(net, loss_fn, cfg, ckpt_dir, desc="vision pre-training", quiet=quiet)
    return net.vit, res


def answer_loss(model: EdgeVLM, batch):
    """Cross-entropy on the answer tokens of a packed batch; returns (loss, logits, merged labels)."""
    logits = packed_forward(model, batch, model.encode_image(batch.pixel_values).embeds)
    k = logits.shape[1] - batch.input_ids.shape[1] + 1
    lab = merged_labels(batch.labels, batch.input_ids, model.config.image_token_id, k)
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), lab[:, 1:].reshape(-1), ignore_index=IGNORE)
    return loss, logits, lab


def train_vlm(cfg: VLMConfig, processor: Processor, vit: VisionTransformer, recipe: DemoRecipe, ckpt_dir: Path | None,
              desc: str, quiet: bool = False, steps: int | None = None):
    steps = recipe.vlm_steps if steps is None else steps
    torch.manual_seed(recipe.seed + 1)
    model = EdgeVLM(cfg)
    init_weights(model)
    model.vision.load_state_dict(vit.state_dict())
    proc = Processor(processor.tokenizer, cfg)

    def loss_fn(m, step):
        b = make_batch(proc, recipe.batch_size, recipe.seed + 1, step, max_questions=recipe.max_questions)
        loss, logits, lab = answer_loss(m, b)
        pred = logits[:, :-1].argmax(-1)
        tgt = lab[:, 1:]
        sel = tgt != IGNORE
        return loss, {"tok_acc": (pred[sel] == tgt[sel]).float().mean()}

    tcfg = TrainConfig(steps=steps, lr=recipe.vlm_lr, warmup=150, weight_decay=0.05,
                       batch_size=recipe.batch_size, seed=recipe.seed + 1, bf16=recipe.bf16)
    # Unused ViT blocks (after the feature layer) get no gradient; freeze them explicitly.
    for i, layer in enumerate(model.vision.layers):
        if i >= cfg.feature_layer_index:
            layer.requires_grad_(False)
    vit = [p for n, p in model.named_parameters() if n.startswith("vision.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("vision.")]
    res = train(model, loss_fn, tcfg, ckpt_dir, desc=desc, quiet=quiet, groups=[(vit, recipe.vit_lr_scale), (rest, 1.0)])
    return model, res


def build_config(name: str, vocab_size: int) -> VLMConfig:
    return {"demo": demo_config, "demo-small": demo_small_config}[name](vocab_size)


def train_demo(out_root: Path, names=("demo", "demo-small"), recipe: DemoRecipe | None = None,
               work_dir: Path = Path("runs/train-demo"), quiet: bool = False) -> dict:
    """Train the demo models and write them as edgemm checkpoints under out_root/<name>.

    Stage state lives in work_dir (resumable); the returned report has steps and wall times."""
    from ..models.checkpoint import save_checkpoint
    from ..fileio import write_json

    recipe = recipe or DemoRecipe()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tok = build_demo_tokenizer()
    vocab = tok.get_vocab_size()
    proc = Processor(tok, demo_config(vocab))
    t0 = time.time()
    vit, res_v = pretrain_vision(proc, recipe, work_dir / "vision", quiet=quiet)
    report = {"recipe": asdict(recipe), "vision_pretrain": {"steps": res_v.steps, "wall_s": round(res_v.wall_s, 1),
                                                            "final": res_v.history[-1] if res_v.history else {}}}
    for name in names:
        cfg = build_config(name, vocab)
        steps = recipe.vlm_steps if name == "demo" else recipe.small_vlm_steps
        model, res = train_vlm(cfg, proc, copy.deepcopy(vit), recipe, work_dir / name, desc=f"training {name}", quiet=quiet,
                               steps=steps)
        n_params = sum(p.numel() for p in model.parameters())
        info = {"steps": res.steps, "wall_s": round(res.wall_s, 1), "params": n_params,
                "final": res.history[-1] if res.history else {}}
        report[name] = info
        # shipped in float16 (half the bytes); weights load back into float32 parameters
        save_checkpoint(model, tok, out_root / name, metadata={"trained_by": "edgemm train-demo", "seed": recipe.seed},
                        float_dtype=torch.float16)
        # the model's own recipe: vlm_steps = the steps this model trained (what distillation reads as its budget)
        write_json(out_root / name / "train_log.json", {"model": name, "recipe": {**asdict(recipe), "vlm_steps": steps},
                                                         "vision_pretrain": report["vision_pretrain"], "vlm": info,
                                                         "history": res.history,
                                                         "torch_threads": torch.get_num_threads()})
    report["total_wall_s"] = round(time.time() - t0, 1)
    return report
