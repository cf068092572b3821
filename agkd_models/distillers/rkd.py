"""Relational KD (Park et al., "Relational Knowledge Distillation", CVPR 2019): the student's
embeddings of a batch keep the teacher's distances and angles between samples."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from ..models.student import StudentOutput
from ..settings import Settings, setting
from .base import Distiller
from .logit import weighted_ce

__all__ = ["RKD", "RKDSettings", "rkd_distance_loss", "rkd_angle_loss"]


@dataclass
class RKDSettings(Settings, section="rkd"):
    """``ce_weight·CE + distance_weight·L_D + angle_weight·L_A`` on the penultimate
    embeddings (what each model's classifier reads; the hybrid teacher's is its two
    branches' concatenated). ``L_D`` is the Huber (smooth L1) loss between the batch's
    pairwise distances of student and teacher, each divided by its mean over the distinct
    pairs (the paper's normalisation, so that embeddings of any width and scale compare);
    ``L_A`` the same between the cosines of the angles every triple of samples forms.
    Defaults: the paper's λ_D = 25, λ_A = 50 and CE weight 1 (also mdistiller's)."""
    ce_weight: float = setting(1.0, "weight of the cross-entropy with the labels", minimum=0)
    distance_weight: float = setting(25.0, "λ_D: weight of the distance-wise loss", minimum=0)
    angle_weight: float = setting(50.0, "λ_A: weight of the angle-wise loss", minimum=0)


def _pairwise_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """(N, N) Euclidean distances between the rows of ``e``, divided by their mean over
    distinct pairs (0 on the diagonal; a batch whose rows all coincide stays 0). The
    squared distances are clamped to ``eps`` before the root, so that coinciding rows get a
    zero gradient rather than 0/0."""
    square = e.pow(2).sum(1)
    d = (square.unsqueeze(1) + square.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps).sqrt()
    d = d * (1 - torch.eye(len(e), dtype=d.dtype, device=d.device))
    positive = d[d > 0]
    return d / positive.mean() if positive.numel() else d


def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Huber loss between the normalised pairwise distances of two (N, D_s), (N, D_t)
    embedding batches; the teacher's side carries no gradient."""
    with torch.no_grad():
        t = _pairwise_distances(teacher.float())
    return F.smooth_l1_loss(_pairwise_distances(student.float()), t)


def _angles(e: torch.Tensor) -> torch.Tensor:
    """cos ∠(e_j, e_i, e_k) for every triple: the (N, N, N) cosines between the unit
    vectors from sample i to the others."""
    unit = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
    return torch.bmm(unit, unit.transpose(1, 2))


def rkd_angle_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Huber loss between the angle cosines of every triple of two embedding batches."""
    with torch.no_grad():
        t = _angles(teacher.float())
    return F.smooth_l1_loss(_angles(student.float()), t)


class _Embedding:
    """Records what a classifier layer receives (the penultimate embedding) on each forward."""

    def __init__(self, layer: nn.Module):
        self.value = None
        layer.register_forward_pre_hook(self)

    def __call__(self, _layer, inputs):
        self.value = inputs[0].flatten(1)


class RKD(Distiller):
    """Relational KD (:class:`RKDSettings` has the loss and its defaults). Reads the
    embeddings, so it distils from the teacher itself, not from a cache."""

    settings_class = RKDSettings
    compiles_whole = False  # the embeddings arrive through forward hooks

    def __init__(self, teacher, student, settings=None, *, label_smoothing: float = 0.0, **changes):
        super().__init__(teacher, student, label_smoothing=label_smoothing)
        self.settings = self.settings_from(settings, changes)
        self._student_embedding = _Embedding(student.model.get_classifier())
        self._teacher_embeddings = [_Embedding(teacher.cnn.get_classifier()), _Embedding(teacher.vit.get_classifier())]

    def teacher_embedding(self) -> torch.Tensor:
        return torch.cat([e.value for e in self._teacher_embeddings], dim=1)

    def loss_terms(self, s: StudentOutput, t, targets: torch.Tensor, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        settings = self.settings
        student, teacher = self._student_embedding.value, self.teacher_embedding()
        ce = weighted_ce(settings.ce_weight, s.logits, targets, self.label_smoothing)
        distance = settings.distance_weight * rkd_distance_loss(student, teacher)
        angle = settings.angle_weight * rkd_angle_loss(student, teacher)
        return {"ce": ce, "rkd_distance": distance, "rkd_angle": angle, "total": ce + distance + angle}
