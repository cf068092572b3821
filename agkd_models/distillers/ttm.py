"""Transformed teacher matching (TTM; Zheng & Yang, "Knowledge Distillation Based on
Transformed Teacher Matching", ICLR 2024): the KL to the teacher's power-transformed
distribution, with no temperature on the student."""
from __future__ import annotations

from dataclasses import dataclass

import agkd_ops

from ..settings import Settings, setting
from .logit import LogitMethod, LogitTerm, weighted_ce

__all__ = ["TTM", "TTMSettings", "TTMTerm"]


@dataclass
class TTMSettings(Settings, section="ttm"):
    """``ce_weight·CE + kd_weight·KL(p_t^γ / Σ p_t^γ ‖ softmax(s))``. The power transform
    of the teacher's probabilities is the teacher at temperature 1/γ
    (``agkd_ops.kd_kl_div(temperature=1, teacher_temperature=1/γ)``), and the student keeps
    temperature 1, so there is no τ² factor. Defaults: the authors' example run on CIFAR-100
    (``--distill ttm --ttm_l 0.1 -r 1 -b 45``); the KL to so flat a target is small, hence
    the weight."""
    ce_weight: float = setting(1.0, "weight of the cross-entropy with the labels (the authors' -r)", minimum=0)
    kd_weight: float = setting(45.0, "weight of the KL to the transformed teacher (the authors' -b)", minimum=0)
    gamma: float = setting(0.1, "γ, the exponent of the teacher's power transform (the authors' --ttm_l); its "
                           "temperature is 1/γ", minimum=1e-3, maximum=1e3)


class TTMTerm(LogitTerm):
    """TTM's loss, the KL through ``agkd_ops.kd_kl_div`` with a teacher temperature (fused)."""

    settings_class = TTMSettings

    def transformed_kl(self, student, teacher, reduction: str):
        return agkd_ops.kd_kl_div(student, teacher, temperature=1.0, teacher_temperature=1.0 / self.settings.gamma,
                                  reduction=reduction)

    def __call__(self, student, teacher, targets):
        s = self.settings
        ce = weighted_ce(s.ce_weight, student, targets, self.label_smoothing)
        ttm = s.kd_weight * self.transformed_kl(student, teacher, "batchmean")
        return {"ce": ce, "ttm": ttm, "total": ce + ttm}


class TTM(LogitMethod):
    """Transformed teacher matching (:class:`TTMSettings` has the loss and its defaults)."""

    settings_class = TTMSettings
    term_class = TTMTerm
