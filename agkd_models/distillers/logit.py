"""Hinton's logit distillation, and what every logit method shares: a :class:`LogitTerm` (a
logit loss with its settings, which AGKD can take as its logit term) and
:class:`LogitMethod` (a distiller whose whole loss is one logit term)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Dict, Optional, Type

import torch
import torch.nn.functional as F
from torch import nn

import agkd_ops

from ..models.student import StudentOutput
from ..settings import Settings, default_of, setting
from .base import Distiller

__all__ = ["LogitKD", "LogitKDSettings", "LogitTerm", "KDTerm", "LogitMethod", "weighted_ce", "class_targets"]


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


def weighted_ce(weight: float, logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """``weight·CE(logits, targets)`` (class or mixed probability targets), in float32."""
    return weight * F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


def class_targets(targets: torch.Tensor) -> torch.Tensor:
    """The class indices a target-split loss (DKD, OFA) needs: of mixed (probability)
    targets (train.mixup / train.cutmix), the dominant class, as the OFA authors take it."""
    return targets.argmax(1) if targets.is_floating_point() else targets


class LogitTerm:
    """A logit-distillation loss with its settings: what a logit method minimises, and what
    AGKD adds to its attention term (``agkd.logit_loss``). ``__call__`` returns the named
    terms, the loss under ``"total"``; ``start_epoch`` hears the trainer's epochs, for
    terms on a schedule."""

    settings_class: ClassVar[Type[Settings]]

    def __init__(self, settings: Settings, *, label_smoothing: float = 0.0):
        self.settings, self.label_smoothing = settings, float(label_smoothing)

    def start_epoch(self, epoch: int, batches: int) -> None:
        pass

    def __call__(self, student: torch.Tensor, teacher: torch.Tensor,
                 targets: torch.Tensor) -> Dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


class KDTerm(LogitTerm):
    """Hinton KD, ``(1-α)·CE + α·τ²·KL``, fused in ``agkd_ops.kd_loss``."""

    settings_class = LogitKDSettings

    def __call__(self, student, teacher, targets):
        s = self.settings
        kd = agkd_ops.kd_loss(student, teacher, targets, temperature=s.temperature, kd_weight=s.kd_weight,
                              label_smoothing=self.label_smoothing)
        return {"kd": kd, "total": kd}


class LogitMethod(Distiller):
    """A distiller whose loss is one :class:`LogitTerm` of the student's and the teacher's
    logits: ``Method(teacher, student, settings)``, or the settings as keywords."""

    term_class: ClassVar[Type[LogitTerm]]

    def __init__(self, teacher: nn.Module, student: nn.Module, settings: Optional[Settings] = None, *,
                 label_smoothing: float = 0.0, **changes):
        super().__init__(teacher, student, label_smoothing=label_smoothing)
        self.settings = self.settings_from(settings, changes)
        self.term = self.term_class(self.settings, label_smoothing=label_smoothing)

    def start_epoch(self, epoch: int, batches: int) -> None:
        self.term.start_epoch(epoch, batches)

    def loss_terms(self, s: StudentOutput, t, targets: torch.Tensor, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.term(s.logits, t.logits, targets)


class LogitKD(LogitMethod):
    """Hinton KD: ``(1-α)·CE + α·τ²·KL`` through ``agkd_ops.kd_loss``.

    ``LogitKD(teacher, student, LogitKDSettings(temperature=2))``, or the same with the
    settings as keywords: ``LogitKD(teacher, student, temperature=2)``."""

    settings_class = LogitKDSettings
    term_class = KDTerm
