"""Logit-standardized KD (LSKD; Sun et al., "Logit Standardization in Knowledge
Distillation", CVPR 2024): Hinton KD on per-row z-scored logits."""
from __future__ import annotations

from dataclasses import dataclass

import agkd_ops

from ..settings import ConfigError, Settings, setting
from .logit import LogitMethod, LogitTerm

__all__ = ["LSKD", "LSKDSettings", "LSKDTerm", "check_lskd_settings"]


@dataclass
class LSKDSettings(Settings, section="lskd"):
    """``ce_weight·CE + kd_weight·τ²·KL(softmax(z(t)/τ) ‖ softmax(z(s)/τ))`` with ``z`` the
    row's z-score (``standardize=True``). Defaults: the authors' recipe for KD on CIFAR-100
    (``tools/train.py --logit-stand --base-temp 2 --kd-weight 9``, with mdistiller's KD CE
    weight 0.1): the z-score makes the logits' scale O(1), hence the small base temperature
    and the large weight; they use base temperatures 2 to 3 by pair."""
    ce_weight: float = setting(0.1, "weight of the cross-entropy with the labels (mdistiller CFG.KD.LOSS.CE_WEIGHT)",
                               minimum=0)
    kd_weight: float = setting(9.0, "weight of the KL term on standardized logits (the authors' --kd-weight)",
                               minimum=0)
    temperature: float = setting(2.0, "base temperature τ (the authors' --base-temp)", above=0)


def check_lskd_settings(settings: LSKDSettings, facts=None) -> None:
    """The two weights may not both be 0 (the loss would be 0; before any work)."""
    if settings.ce_weight + settings.kd_weight <= 0:
        raise ConfigError("lskd.ce_weight and lskd.kd_weight are both 0: the loss would be 0")


class LSKDTerm(LogitTerm):
    """``ce_weight·CE + kd_weight·τ²·KL`` is ``(ce_weight + kd_weight)`` times the convex
    mix ``agkd_ops.kd_loss`` fuses, with ``kd_weight / (ce_weight + kd_weight)`` as its
    weight: one fused call for both terms."""

    settings_class = LSKDSettings

    def __init__(self, settings, *, label_smoothing: float = 0.0):
        check_lskd_settings(settings)
        super().__init__(settings, label_smoothing=label_smoothing)

    def __call__(self, student, teacher, targets):
        s = self.settings
        scale = s.ce_weight + s.kd_weight
        loss = scale * agkd_ops.kd_loss(student, teacher, targets, temperature=s.temperature,
                                        kd_weight=s.kd_weight / scale, standardize=True,
                                        label_smoothing=self.label_smoothing)
        return {"lskd": loss, "total": loss}


class LSKD(LogitMethod):
    """Logit-standardized KD (:class:`LSKDSettings` has the loss and its defaults)."""

    settings_class = LSKDSettings
    term_class = LSKDTerm
