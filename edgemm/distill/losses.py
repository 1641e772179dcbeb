"""The LLaVA-KD losses: MDist (forward KL with temperature) and RDist (relation distillation).

MDist: KL(p_teacher || p_student) of the next-token distributions softened by a temperature T,
averaged over the selected positions and multiplied by T^2 (so its gradient scale does not shrink
with T, as in Hinton et al.); used on the response tokens and on the visual-token positions.
RDist: for each image, the cosine self-similarity matrix R = U U^T of the LLM's outputs (final
normed hidden states) at the K visual positions (U: rows scaled to unit norm), for the student and
the teacher; the loss is 1 - cos(vec R_student, vec R_teacher), averaged over images. Relations do
not depend on the hidden size, so a smaller student can match a larger teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Forward KL, mean over positions: T^2 * mean_i sum_v p_t(v) (log p_t(v) - log p_s(v)), p = softmax(z / T).

    student_logits, teacher_logits: [..., V] (any leading shape; the positions to use already selected)."""
    v = student_logits.shape[-1]
    s = student_logits.float().reshape(-1, v) / temperature
    t = teacher_logits.float().reshape(-1, v) / temperature
    if s.shape[0] == 0:
        return student_logits.float().sum() * 0.0
    log_ps = F.log_softmax(s, dim=-1)
    log_pt = F.log_softmax(t, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    return kl.mean() * temperature**2


def self_similarity(h: torch.Tensor) -> torch.Tensor:
    """h [B, K, D] -> [B, K, K] cosine similarity between the K vectors of each row."""
    u = F.normalize(h.float(), dim=-1, eps=1e-8)
    return u @ u.transpose(-1, -2)


def rdist(student_h: torch.Tensor, teacher_h: torch.Tensor) -> torch.Tensor:
    """1 - cos(vec R_s, vec R_t), mean over the batch; student_h [B, K, D_s], teacher_h [B, K, D_t]."""
    rs = self_similarity(student_h).flatten(1)
    rt = self_similarity(teacher_h).flatten(1)
    return (1.0 - F.cosine_similarity(rs, rt, dim=-1, eps=1e-8)).mean()
