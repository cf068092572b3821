"""Curriculum temperature KD (CTKD; Li et al., "Curriculum Temperature for Knowledge
Distillation", AAAI 2023): Hinton KD whose temperature is learned adversarially, through a
gradient-reversal layer whose strength follows a cosine curriculum."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

import agkd_ops

from ..settings import Settings, setting
from .logit import LogitMethod, LogitTerm, weighted_ce

__all__ = ["CTKD", "CTKDSettings", "CTKDTerm", "reversal_strength"]


@dataclass
class CTKDSettings(Settings, section="ctkd"):
    """``ce_weight·CE + kd_weight·τ²·KL(softmax(t/τ) ‖ softmax(s/τ))`` with one learnable
    temperature ``τ = temperature_min + temperature_span·sigmoid(θ)``: the student descends
    the loss, θ ascends it (its gradient reversed and scaled by ``λ_e``), and ``λ_e`` rises
    from 0 to ``max_reversal`` along a half cosine over the first ``curriculum_epochs``
    epochs, so the task gets harder as the student learns. θ is trained by the main
    optimizer, as the authors train their global temperature with the student's SGD.
    Defaults: the authors' CIFAR-100 script (``-r 0.1 -a 0.9 --t_start 1 --t_end 20
    --cosine_decay 1 --decay_max 0 --decay_min -1 --decay_loops 10``), θ starting at 1 as
    their global temperature's parameter does (τ ≈ 15.6 at the start)."""
    ce_weight: float = setting(0.1, "weight of the cross-entropy with the labels (the authors' -r)", minimum=0)
    kd_weight: float = setting(0.9, "weight of the τ²·KL term (the authors' -a)", minimum=0)
    temperature_min: float = setting(1.0, "the lowest temperature (the authors' --t_start)", minimum=1e-3)
    temperature_span: float = setting(20.0, "the temperature's range above temperature_min (the authors' --t_end)",
                                      minimum=0)
    initial_logit: float = setting(1.0, "θ at the start (τ = temperature_min + temperature_span·sigmoid(θ))")
    curriculum_epochs: int = setting(10, "epochs over which the reversal's strength rises to max_reversal (the "
                                     "authors' --decay_loops)", minimum=1)
    max_reversal: float = setting(1.0, "the reversal's strength at the end of the curriculum (minus the authors' "
                                  "--decay_min)", minimum=0)


def reversal_strength(epoch: int, settings: CTKDSettings) -> float:
    """λ of the trainer's epoch ``epoch`` (from 0): ``max·(1 − cos(π·i/n))/2`` with the
    authors' 1-based epoch ``i`` capped at ``n = curriculum_epochs``."""
    i = min(epoch + 1, settings.curriculum_epochs)
    return settings.max_reversal * (1.0 - math.cos(math.pi * i / settings.curriculum_epochs)) / 2.0


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by −λ."""

    @staticmethod
    def forward(ctx, x, strength: float):
        ctx.strength = strength
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.strength * grad, None


class CTKDTerm(LogitTerm):
    """CTKD's loss; the temperature is a tensor, so ``agkd_ops.kd_loss`` returns dL/dτ
    from its fused pass. Holds θ (``logit``, a parameter of the distiller)."""

    settings_class = CTKDSettings

    def __init__(self, settings, *, label_smoothing: float = 0.0):
        super().__init__(settings, label_smoothing=label_smoothing)
        self.logit = nn.Parameter(torch.tensor(float(settings.initial_logit)))
        self.strength = reversal_strength(0, settings)

    def start_epoch(self, epoch: int, batches: int) -> None:
        self.strength = reversal_strength(epoch, self.settings)

    def temperature(self) -> torch.Tensor:
        s = self.settings
        theta = _ReverseGradient.apply(self.logit, self.strength)
        return s.temperature_min + s.temperature_span * torch.sigmoid(theta)

    def __call__(self, student, teacher, targets):
        s = self.settings
        tau = self.temperature()
        ce = weighted_ce(s.ce_weight, student, targets, self.label_smoothing)
        kd = s.kd_weight * agkd_ops.kd_kl_div(student, teacher, temperature=tau.to(student.device))
        # The temperature is logged with the terms (train_temperature in metrics.jsonl): not a loss.
        return {"ce": ce, "kd": kd, "total": ce + kd, "temperature": tau.detach()}


class CTKD(LogitMethod):
    """Curriculum temperature KD (:class:`CTKDSettings` has the loss and its defaults);
    θ is trained with the student and kept in checkpoints."""

    settings_class = CTKDSettings
    term_class = CTKDTerm
    # The reversal's strength is a Python number that changes every curriculum epoch: a
    # compiled loss path would recompile each time, so only the student is compiled.
    compiles_whole = False

    def __init__(self, teacher, student, settings=None, *, label_smoothing: float = 0.0, **changes):
        super().__init__(teacher, student, settings, label_smoothing=label_smoothing, **changes)
        self.temperature_logit = self.term.logit  # a parameter of the module: moved, saved, optimised

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.student.parameters()
        yield self.temperature_logit
