"""DIST (Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022)."""
from __future__ import annotations

from dataclasses import dataclass

import agkd_ops

from ..settings import Settings, default_of, setting
from .logit import LogitMethod, LogitTerm, weighted_ce

__all__ = ["DIST", "DISTSettings", "DISTTerm"]


@dataclass
class DISTSettings(Settings, section="dist"):
    """``ce_weight·CE + τ²·(β·(1 − inter-class ρ) + γ·(1 − intra-class ρ))``, the Pearson
    correlations of the softmax rows and class columns (``agkd_ops.dist_loss``). Defaults:
    the paper's ImageNet setting (CE weight 1, β = γ = 1, τ = 1); its CIFAR-100 setting is
    β = γ = 2 with τ = 4."""
    ce_weight: float = setting(1.0, "weight of the cross-entropy with the labels", minimum=0)
    inter_weight: float = setting(default_of(agkd_ops.dist_loss, "inter_weight"), "β: weight of the inter-class "
                                  "(per-sample row) relation", minimum=0)
    intra_weight: float = setting(default_of(agkd_ops.dist_loss, "intra_weight"), "γ: weight of the intra-class "
                                  "(per-class column over the batch) relation", minimum=0)
    temperature: float = setting(default_of(agkd_ops.dist_loss, "temperature"), "softmax temperature τ", above=0)


class DISTTerm(LogitTerm):
    """DIST's loss, the relations through ``agkd_ops.dist_loss`` (fused)."""

    settings_class = DISTSettings

    def __call__(self, student, teacher, targets):
        s = self.settings
        ce = weighted_ce(s.ce_weight, student, targets, self.label_smoothing)
        dist = agkd_ops.dist_loss(student, teacher, inter_weight=s.inter_weight, intra_weight=s.intra_weight,
                                  temperature=s.temperature)
        return {"ce": ce, "dist": dist, "total": ce + dist}


class DIST(LogitMethod):
    """DIST (:class:`DISTSettings` has the loss and its defaults)."""

    settings_class = DISTSettings
    term_class = DISTTerm
