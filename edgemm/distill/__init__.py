"""LLaVA-KD-style distillation (MDist + RDist, three stages) of a teacher EdgeVLM into a smaller student.

`edgemm distill TEACHER --student-config demo-small -o OUT`; from Python:
`edgemm.distill.distill_to_checkpoint("demo", "demo-small", "out/kd", DistillConfig())`.
"""

from __future__ import annotations


def __getattr__(name):  # lazy: importing edgemm.distill must not import torch
    if name in ("DistillConfig", "distill", "distill_to_checkpoint", "student_config", "build_student", "kd_loss", "run_model"):
        from . import trainer

        return getattr(trainer, name)
    if name in ("kd_kl", "rdist", "self_similarity"):
        from . import losses

        return getattr(losses, name)
    raise AttributeError(name)


__all__ = ["DistillConfig", "distill", "distill_to_checkpoint", "student_config", "kd_kl", "rdist", "self_similarity"]
