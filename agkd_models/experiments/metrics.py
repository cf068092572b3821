"""Evaluation metrics of the KD review (plain functions on tensors) and CAKD's
transferability."""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["topk_accuracy", "relative_error", "distillation_factor", "count_parameters",
           "teacher_student_kl", "probability_correlation", "transferability"]


@torch.no_grad()
def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> Tuple[float, ...]:
    """Fractions of samples whose target is among the top-k logits, for each k (k is
    capped at the number of classes)."""
    k_max = min(max(ks), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices
    hits = top == targets.unsqueeze(1)
    return tuple(hits[:, :min(k, k_max)].any(dim=1).float().mean().item() for k in ks)


def relative_error(student_error: float, teacher_error: float) -> float:
    """``E_s / E_t`` (error rates, e.g. 1 - top-1 accuracy); inf when the teacher makes none."""
    return float("inf") if teacher_error == 0 else student_error / teacher_error


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def distillation_factor(teacher: nn.Module, student: nn.Module) -> float:
    """``P_t / P_s``: how many times fewer parameters the student has."""
    return count_parameters(teacher) / count_parameters(student)


@torch.no_grad()
def teacher_student_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       temperature: float = 1.0) -> float:
    """Mean over samples of ``KL(softmax(t/τ) ‖ softmax(s/τ))`` (no τ² factor)."""
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean").item()


@torch.no_grad()
def probability_correlation(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> float:
    """Mean over samples of the Pearson correlation of the two probability vectors."""
    p_s = F.softmax(student_logits.float(), dim=1)
    p_t = F.softmax(teacher_logits.float(), dim=1)
    p_s = p_s - p_s.mean(dim=1, keepdim=True)
    p_t = p_t - p_t.mean(dim=1, keepdim=True)
    return F.cosine_similarity(p_s, p_t, dim=1).mean().item()


@torch.no_grad()
def transferability(student_features: torch.Tensor, teacher_features: torch.Tensor,
                    projection: nn.Module) -> float:
    """CAKD's transferability: mean cosine similarity between the linearly projected
    student features and the teacher's, per sample (features flattened)."""
    projected = projection(student_features)
    return F.cosine_similarity(projected.flatten(1).float(), teacher_features.flatten(1).float(), dim=1).mean().item()
