"""Hinton's logit distillation."""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

import agkd_ops

from ..models.student import StudentOutput
from .base import Distiller

__all__ = ["LogitKD"]


class LogitKD(Distiller):
    """Hinton KD: ``(1-α)·CE + α·τ²·KL`` through ``agkd_ops.kd_loss``."""

    def __init__(self, teacher: nn.Module, student: nn.Module, *, temperature: float = 4.0,
                 alpha: float = 0.9):
        super().__init__(teacher, student)
        self.temperature, self.alpha = temperature, alpha

    def loss_terms(self, s: StudentOutput, t, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        kd = agkd_ops.kd_loss(s.logits, t.logits, targets, temperature=self.temperature, alpha=self.alpha,
                              label_smoothing=self.label_smoothing)
        return {"kd": kd, "total": kd}
