"""Hinton's logit distillation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import nn

import agkd_ops

from ..models.student import StudentOutput
from ..settings import Settings, default_of, setting
from .base import Distiller

__all__ = ["LogitKD", "LogitKDSettings"]


@dataclass
class LogitKDSettings(Settings, section="logit"):
    """The Hinton term ``(1-α)·CE + α·τ²·KL`` (``agkd_ops.kd_loss``); AGKD's logit term too.

    ``kd_weight`` defaults to Hinton's 0.9, as ``agkd_ops.kd_loss`` does; the presets set
    0.5, which was as good with a strong teacher and far safer with a modest one in the
    digits budget study (``docs/results/digits/budget.md``)."""
    temperature: float = setting(default_of(agkd_ops.kd_loss, "temperature"), "softmax temperature τ of the KD "
                                 "term", above=0)
    kd_weight: float = setting(default_of(agkd_ops.kd_loss, "kd_weight"), "weight α of the KL term in "
                               "(1-α)·CE + α·τ²·KL (the CE gets 1-α)", minimum=0, maximum=1)

    renamed = {"kd_alpha": "kd_weight"}


class LogitKD(Distiller):
    """Hinton KD: ``(1-α)·CE + α·τ²·KL`` through ``agkd_ops.kd_loss``.

    ``LogitKD(teacher, student, LogitKDSettings(temperature=2))``, or the same with the
    settings as keywords: ``LogitKD(teacher, student, temperature=2)``."""

    settings_class = LogitKDSettings

    def __init__(self, teacher: nn.Module, student: nn.Module, settings: Optional[LogitKDSettings] = None, *,
                 label_smoothing: float = 0.0, **changes):
        super().__init__(teacher, student, label_smoothing=label_smoothing)
        self.settings = self.settings_from(settings, changes)

    def loss_terms(self, s: StudentOutput, t, targets: torch.Tensor, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        kd = agkd_ops.kd_loss(s.logits, t.logits, targets, temperature=self.settings.temperature,
                              kd_weight=self.settings.kd_weight, label_smoothing=self.label_smoothing)
        return {"kd": kd, "total": kd}
