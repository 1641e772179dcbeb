"""LLaVA-KD-style distillation of a teacher EdgeVLM into a smaller student, in three stages.

1. DPT (distilled pre-training): CE + the enabled KD terms, training the projector (and, by default
   here, the LLM: the demo student's LLM has no language pre-training to keep frozen);
2. SFT (supervised fine-tuning): CE on the answers only, projector + LLM;
3. DFT (distilled fine-tuning): CE + MDist + RDist, projector + LLM.

The student shares the teacher's vision encoder (as in LLaVA-KD, where teacher and student use the
same frozen SigLIP): its ViT is a copy of the teacher's, frozen by default. The data generator,
batch size and total step budget are the SFT-only baseline's (`edgemm.train.demo.DemoRecipe`):
stage s, step i trains on `make_batch(proc, batch_size, seed + 1, offset_s + i, rank)`, the very
batches `demo-small` was trained on. Each stage runs in `edgemm.train.loop.train` (checkpoints,
resume, progress, DDP under torchrun: the teacher lives in the loss closure, frozen, outside DDP).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import EdgemmError
from ..models.config import VLMConfig
from ..models.modeling import EdgeVLM
from ..processor import Processor
from ..train.data import IGNORE, make_batch, merged_labels, packed_forward, visual_positions
from ..train.loop import TrainConfig, dist_info, train
from .losses import kd_kl, rdist

STAGES = ("dpt", "sft", "dft")


BUDGET_FIELDS = {"steps": "vlm_steps", "batch_size": "batch_size", "max_questions": "max_questions", "seed": "seed"}


def baseline_recipe(baseline: str | None = "demo-small") -> dict:
    """The SFT baseline's training recipe (its train_log.json beside the checkpoint), else DemoRecipe's defaults."""
    from ..train.demo import DemoRecipe

    rec = asdict(DemoRecipe())
    rec["vlm_steps"] = rec["small_vlm_steps"]  # demo-small's budget
    if baseline:
        from ..models import BUILTIN, builtin_path

        p = (builtin_path(baseline) if baseline in BUILTIN else Path(baseline)) / "train_log.json"
        if p.is_file():
            try:
                rec.update(json.loads(p.read_text()).get("recipe", {}))
            except json.JSONDecodeError:
                raise EdgemmError(f"{p} is not valid JSON") from None
    return rec


@dataclass
class DistillConfig:
    # The budget: None = the SFT baseline's (`baseline`'s train_log.json recipe: vlm_steps, batch_size,
    # max_questions, seed; DemoRecipe's defaults without one), so the comparison is at equal data and steps.
    steps: int | None = None  # total optimizer steps over the three stages
    split: tuple[float, float, float] = (0.3, 0.2, 0.5)  # fractions of `steps` for DPT, SFT, DFT
    batch_size: int | None = None  # per rank
    max_questions: int | None = None
    seed: int | None = None  # the data seed is seed + 1 and the student's init seed seed + 1, as the baseline's
    baseline: str | None = "demo-small"
    lr: float = 1e-3
    dft_lr: float = 5e-4  # the last stage refines
    weight_decay: float = 0.05
    warmup: int = 150
    bf16: bool = True
    mdist: bool = True
    rdist: bool = True
    temperature: float = 2.0
    w_ce: float = 1.0
    w_response: float = 1.0  # MDist on the response tokens
    w_visual: float = 0.5  # MDist on the visual-token positions
    w_rdist: float = 10.0  # RDist is ~0.02 at init on the demo, the KL terms ~10-20: weight 1 would make it vanish
    dpt_train: tuple[str, ...] = ("projector", "text")  # LLaVA-KD: projector only (its LLM is pre-trained)
    vit: str = "frozen"  # frozen | finetune (at vit_lr_scale in every stage)
    vit_lr_scale: float = 0.1
    ckpt_every: int = 250
    log_every: int = 50

    def resolved(self) -> "DistillConfig":
        """A copy with the budget fields filled in from the baseline's recipe."""
        rec = None
        kw = {}
        for f, r in BUDGET_FIELDS.items():
            if getattr(self, f) is None:
                rec = rec if rec is not None else baseline_recipe(self.baseline)
                kw[f] = int(rec[r])
        return dataclasses.replace(self, **kw).validate() if kw else self.validate()

    def stage_steps(self) -> list[int]:
        if len(self.split) != 3 or any(f < 0 for f in self.split) or sum(self.split) <= 0:
            raise EdgemmError("distill split must be three non-negative fractions (DPT, SFT, DFT)")
        if self.steps is None:
            raise EdgemmError("distill steps are not resolved yet (DistillConfig.resolved())")
        total = sum(self.split)
        a = round(self.steps * self.split[0] / total)
        b = round(self.steps * (self.split[0] + self.split[1]) / total) - a
        return [a, b, self.steps - a - b]

    def validate(self) -> "DistillConfig":
        if self.steps is not None and self.steps < 1:
            raise EdgemmError("distill steps must be >= 1")
        if self.batch_size is not None and self.batch_size < 1:
            raise EdgemmError("distill batch size must be >= 1")
        if self.temperature <= 0:
            raise EdgemmError("distill temperature must be > 0")
        if self.vit not in ("frozen", "finetune"):
            raise EdgemmError(f"distill vit must be 'frozen' or 'finetune', got {self.vit!r}")
        bad = set(self.dpt_train) - {"projector", "text"}
        if bad or not self.dpt_train:
            raise EdgemmError("distill dpt_train must name projector and/or text")
        if self.steps is not None:
            self.stage_steps()
        return self

    @classmethod
    def from_dict(cls, d: dict) -> "DistillConfig":
        names = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - names)
        if unknown:
            raise EdgemmError(f"unknown distill option {unknown[0]!r} (options: {', '.join(sorted(names))})")
        kw = dict(d)
        for k in ("split", "dpt_train"):
            if k in kw:
                if isinstance(kw[k], str):
                    kw[k] = [x.strip() for x in kw[k].split(",")]
                kw[k] = tuple(float(x) for x in kw[k]) if k == "split" else tuple(kw[k])
        try:
            return cls(**kw).validate()
        except TypeError as e:
            raise EdgemmError(f"bad distill options: {e}") from None


@dataclass
class DistillResult:
    student: EdgeVLM
    processor: Processor
    stages: list[dict] = field(default_factory=list)
    wall_s: float = 0.0
    config: "DistillConfig | None" = None  # as run (budget resolved)


def student_config(spec: str, teacher_cfg: VLMConfig) -> VLMConfig:
    """'demo-small' / 'demo' (the built-in architectures), a config.json file or a checkpoint directory."""
    from ..train.demo import build_config

    if spec in ("demo", "demo-small"):
        cfg = build_config(spec, teacher_cfg.text.vocab_size)
    else:
        p = Path(spec)
        f = p / "config.json" if p.is_dir() else p
        if not f.is_file():
            raise EdgemmError(f"--student-config {spec!r} is neither demo-small, demo, a config.json nor a checkpoint directory")
        try:
            cfg = VLMConfig.from_dict(json.loads(f.read_text()))
        except json.JSONDecodeError as e:
            raise EdgemmError(f"{f} is not valid JSON ({e})") from None
    if cfg.text.vocab_size != teacher_cfg.text.vocab_size:
        raise EdgemmError(f"student vocabulary ({cfg.text.vocab_size}) differs from the teacher's ({teacher_cfg.text.vocab_size}); "
                          "distillation compares their distributions token by token")
    if asdict(cfg.vision) != asdict(teacher_cfg.vision) or cfg.vision_feature_layer != teacher_cfg.vision_feature_layer \
            or cfg.vision_feature_select != teacher_cfg.vision_feature_select:
        raise EdgemmError("the student must use the teacher's vision encoder (same vision config and feature layer): "
                          "it starts from a copy of the teacher's ViT")
    for k in ("image_token_id", "bos_token_id", "eos_token_id", "pad_token_id", "prompt_template"):
        if getattr(cfg, k) != getattr(teacher_cfg, k):
            raise EdgemmError(f"student {k} differs from the teacher's")
    cfg.extras = copy.deepcopy(teacher_cfg.extras)  # e.g. a visual-token setting: same visual positions
    return cfg


def build_student(cfg: VLMConfig, teacher: EdgeVLM, seed: int) -> EdgeVLM:
    from ..train.demo import init_weights

    torch.manual_seed(seed)
    student = EdgeVLM(cfg)
    init_weights(student)
    student.vision.load_state_dict(teacher.vision.state_dict())
    return student


def run_model(model: EdgeVLM, batch, vision=None):
    """Full-sequence forward returning (logits [B, T', V], final hidden [B, T', D], K visual tokens).

    `vision` optionally gives precomputed ViT features (shared frozen encoder)."""
    if vision is not None:
        embeds_img = model.projector(vision)
    else:
        embeds_img = model.encode_image(batch.pixel_values).embeds
    logits, hidden = packed_forward(model, batch, embeds_img, return_hidden=True)
    return logits, hidden, embeds_img.shape[1]


def kd_loss(s_logits, s_hidden, t_logits, t_hidden, batch, k: int, image_token_id: int, cfg: DistillConfig,
            use_kd: bool) -> tuple[torch.Tensor, dict]:
    """CE on the answers, plus (when use_kd) MDist on response + visual positions and RDist."""
    lab = merged_labels(batch.labels, batch.input_ids, image_token_id, k)[:, 1:]
    sl = s_logits[:, :-1]
    ce = F.cross_entropy(sl.float().reshape(-1, sl.shape[-1]), lab.reshape(-1), ignore_index=IGNORE)
    loss = cfg.w_ce * ce
    sel = lab != IGNORE
    pred = sl.argmax(-1)
    metrics = {"ce": ce.detach(), "tok_acc": (pred[sel] == lab[sel]).float().mean()}
    if use_kd and (cfg.mdist or cfg.rdist):
        vis = visual_positions(batch.input_ids, image_token_id, k)
        if cfg.mdist:
            kl_r = kd_kl(sl[sel], t_logits[:, :-1][sel], cfg.temperature)
            gather = lambda x: x.gather(1, vis[..., None].expand(-1, -1, x.shape[-1]))  # noqa: E731
            kl_v = kd_kl(gather(s_logits), gather(t_logits), cfg.temperature)
            loss = loss + cfg.w_response * kl_r + cfg.w_visual * kl_v
            metrics.update(kl_resp=kl_r.detach(), kl_vis=kl_v.detach())
        if cfg.rdist:
            g = lambda x: x.gather(1, vis[..., None].expand(-1, -1, x.shape[-1]))  # noqa: E731
            rd = rdist(g(s_hidden), g(t_hidden))
            loss = loss + cfg.w_rdist * rd
            metrics["rdist"] = rd.detach()
    return loss, metrics


def _trainable(student: EdgeVLM, parts, cfg: DistillConfig) -> list[tuple[list, float]]:
    for p in student.parameters():
        p.requires_grad_(False)
    groups = []
    rest = [p for n, p in student.named_parameters() if n.split(".", 1)[0] in parts]
    for p in rest:
        p.requires_grad_(True)
    groups.append((rest, 1.0))
    if cfg.vit == "finetune":
        vit = [p for i, layer in enumerate(student.vision.layers) if i < student.config.feature_layer_index
               for p in layer.parameters()]
        vit += [p for n, p in student.vision.named_parameters() if not n.startswith("layers.")]
        for p in vit:
            p.requires_grad_(True)
        groups.append((vit, cfg.vit_lr_scale))
    return groups


def distill(teacher: EdgeVLM, processor: Processor, student_cfg: VLMConfig, cfg: DistillConfig,
            work_dir: str | Path | None = None, quiet: bool = False, student: EdgeVLM | None = None) -> DistillResult:
    """Run the three stages; with `work_dir`, every stage checkpoints and a rerun resumes."""
    cfg = cfg.resolved()
    rank, world = dist_info()
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = student if student is not None else build_student(student_cfg, teacher, cfg.seed + 1)
    proc = Processor(processor.tokenizer, student_cfg)
    share_vit = cfg.vit == "frozen" and not student_cfg.extras.get("visual_tokens")
    image_token = student_cfg.image_token_id
    t0 = time.time()
    stages = []
    offset = 0
    for si, (name, steps) in enumerate(zip(STAGES, cfg.stage_steps())):
        if steps == 0:
            continue
        parts = cfg.dpt_train if name == "dpt" else ("projector", "text")
        use_kd = name != "sft"
        groups = _trainable(student, parts, cfg)
        base = offset

        def loss_fn(m, step, base=base, use_kd=use_kd):
            b = make_batch(proc, cfg.batch_size, cfg.seed + 1, base + step, rank, cfg.max_questions)
            vision = None
            if share_vit:
                with torch.no_grad():
                    vision, _ = teacher.vision_features(b.pixel_values)
            need_teacher = use_kd and (cfg.mdist or cfg.rdist)
            t_logits = t_hidden = None
            if need_teacher:
                with torch.no_grad():
                    t_logits, t_hidden, _ = run_model(teacher, b, vision)
            s_logits, s_hidden, k = run_model(m, b, vision)
            return kd_loss(s_logits, s_hidden, t_logits, t_hidden, b, k, image_token, cfg, need_teacher)

        lr = cfg.dft_lr if name == "dft" else cfg.lr
        tcfg = TrainConfig(steps=steps, lr=lr, warmup=min(cfg.warmup, max(1, steps // 10)), weight_decay=cfg.weight_decay,
                           batch_size=cfg.batch_size, seed=cfg.seed + 10 + si, bf16=cfg.bf16, ckpt_every=cfg.ckpt_every,
                           log_every=cfg.log_every)
        ck = Path(work_dir) / f"{si + 1}-{name}" if work_dir else None
        res = train(student, loss_fn, tcfg, ck, desc=f"distill {si + 1}/3 {name.upper()}", quiet=quiet, groups=groups)
        stages.append({"stage": name, "steps": steps, "first_step": base, "lr": lr, "kd": use_kd and (cfg.mdist or cfg.rdist),
                       "trained": list(parts) + (["vision"] if cfg.vit == "finetune" else []),
                       "wall_s": round(res.wall_s, 1), "history": res.history})
        offset += steps
    for p in student.parameters():
        p.requires_grad_(True)
    student.eval()
    return DistillResult(student, proc, stages, round(time.time() - t0, 1), cfg)


def distill_to_checkpoint(teacher_spec: str, student_spec: str, out: str | Path, cfg: DistillConfig,
                          work_dir: str | Path | None = None, quiet: bool = False) -> dict:
    """Load the teacher, distill, write the student checkpoint (+ distill_log.json). Returns the log."""
    from ..fileio import write_json
    from ..models import load_model
    from ..models.checkpoint import save_checkpoint

    lm = load_model(teacher_spec)
    scfg = student_config(student_spec, lm.config)
    out = Path(out)
    work = Path(work_dir) if work_dir else out.parent / f".{out.name}.work"
    res = distill(lm.model, lm.processor, scfg, cfg, work, quiet=quiet)
    rank, _ = dist_info()
    n_params = sum(p.numel() for p in res.student.parameters())
    from ..recipes.runner import fingerprint_model

    log = {"teacher": teacher_spec, "teacher_fingerprint": fingerprint_model(lm), "student_config": student_spec,
           "config": asdict(res.config), "params": n_params,
           "wall_s": sum(s["wall_s"] for s in res.stages), "stages": res.stages,
           "torch_threads": torch.get_num_threads(), "world_size": dist_info()[1]}
    if rank == 0:
        save_checkpoint(res.student, lm.processor, out, metadata={"distilled_from": teacher_spec})
        write_json(out / "distill_log.json", log)
    return log
