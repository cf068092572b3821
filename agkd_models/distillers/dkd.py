"""Decoupled knowledge distillation (DKD; Zhao et al., "Decoupled Knowledge Distillation",
CVPR 2022)."""
from __future__ import annotations

from dataclasses import dataclass

import agkd_ops

from ..settings import Settings, default_of, setting
from .logit import LogitMethod, LogitTerm, class_targets, weighted_ce

__all__ = ["DKD", "DKDSettings", "DKDTerm"]


@dataclass
class DKDSettings(Settings, section="dkd"):
    """``ce_weight·CE + w(e)·τ²·(tckd_weight·TCKD + nckd_weight·NCKD)`` with DKD's linear
    warm-up ``w(e) = min(e / warmup_epochs, 1)`` in epoch ``e = 1, 2, ...`` (as mdistiller's
    ``DKD`` counts them). Defaults: mdistiller's CIFAR-100 configuration (``CFG.DKD``: CE
    weight 1, α 1, β 8, T 4, warm-up 20 of its 240 epochs); the paper gives β from 1 to 8
    by teacher–student pair, so β is the one to grid. A short run wants a shorter warm-up
    (the presets scale it to their epoch budget)."""
    ce_weight: float = setting(1.0, "weight of the cross-entropy with the labels (mdistiller CFG.DKD.CE_WEIGHT)",
                               minimum=0)
    tckd_weight: float = setting(default_of(agkd_ops.dkd_loss, "tckd_weight"), "α: weight of the target-class "
                                 "term TCKD", minimum=0)
    nckd_weight: float = setting(default_of(agkd_ops.dkd_loss, "nckd_weight"), "β: weight of the non-target term "
                                 "NCKD", minimum=0)
    temperature: float = setting(default_of(agkd_ops.dkd_loss, "temperature"), "softmax temperature τ", above=0)
    warmup_epochs: int = setting(20, "epochs over which the KD term's weight rises linearly to 1 (mdistiller "
                                 "CFG.DKD.WARMUP)", minimum=1)


class DKDTerm(LogitTerm):
    """DKD's loss, the KD part through ``agkd_ops.dkd_loss`` (fused)."""

    settings_class = DKDSettings

    def __init__(self, settings, *, label_smoothing: float = 0.0):
        super().__init__(settings, label_smoothing=label_smoothing)
        self.warmup = 1.0 / settings.warmup_epochs  # the first epoch's weight, before start_epoch

    def start_epoch(self, epoch: int, batches: int) -> None:
        self.warmup = min((epoch + 1) / self.settings.warmup_epochs, 1.0)  # the trainer counts from 0

    def __call__(self, student, teacher, targets):
        s = self.settings
        ce = weighted_ce(s.ce_weight, student, targets, self.label_smoothing)
        dkd = self.warmup * agkd_ops.dkd_loss(student, teacher, class_targets(targets),
                                              tckd_weight=s.tckd_weight, nckd_weight=s.nckd_weight,
                                              temperature=s.temperature)
        return {"ce": ce, "dkd": dkd, "total": ce + dkd}


class DKD(LogitMethod):
    """Decoupled KD (:class:`DKDSettings` has the loss and its defaults)."""

    settings_class = DKDSettings
    term_class = DKDTerm
