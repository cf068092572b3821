"""FitNets (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015): the student's
intermediate features, through a regressor, fit the teacher's."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..models.student import StudentOutput
from ..settings import ConfigError, Settings, setting
from .base import Distiller, ModelFacts
from .logit import weighted_ce

__all__ = ["FitNet", "FitNetSettings", "check_fitnet_settings"]

_PROBE = (64, 64)  # an input size every supported CNN takes, to read the teacher's channels


@dataclass
class FitNetSettings(Settings, section="fitnet"):
    """``ce_weight·CE + hint_weight·MSE(r(F_s), F_t)``: the hint of FitNets. ``F_s`` is one
    student stage's feature map; ``r`` a 1×1 convolution (the paper's regressor, trained
    with the student and dropped afterwards) to the channels of ``F_t``, the teacher's last
    convolutional feature map (the hybrid teacher's CNN branch); ``r(F_s)`` is resized
    bilinearly to ``F_t``'s grid. Defaults: mdistiller's CIFAR-100 FitNet (CE weight 1,
    feature weight 100, trained jointly, as most comparisons do, where the paper first
    trains the hint alone); the guided stage is the last of the student's attention stages
    (the paper guides the student's middle layer with the teacher's)."""
    ce_weight: float = setting(1.0, "weight of the cross-entropy with the labels (mdistiller CFG.FITNET.LOSS.CE_WEIGHT)",
                               minimum=0)
    hint_weight: float = setting(100.0, "weight of the hint's mean squared error (mdistiller "
                                 "CFG.FITNET.LOSS.FEAT_WEIGHT)", minimum=0)
    stage: Optional[int] = setting(None, "student stage the regressor reads (null: the last of student.stages)",
                                   minimum=0)


def check_fitnet_settings(settings: FitNetSettings, facts: ModelFacts) -> None:
    """The guided stage must be one of the chosen student's (before any work)."""
    if settings.stage is not None and not 0 <= settings.stage < facts.student_stages:
        raise ConfigError(f"fitnet.stage: stage {settings.stage} does not exist in {facts.student!r}, which has "
                          f"{facts.student_stages} stages (0 to {facts.student_stages - 1})")


class FitNet(Distiller):
    """FitNets' hint (:class:`FitNetSettings` has the loss and its defaults). Reads the
    teacher's feature map, so it distils from the teacher itself, not from a cache."""

    settings_class = FitNetSettings

    def __init__(self, teacher, student, settings=None, *, label_smoothing: float = 0.0, **changes):
        super().__init__(teacher, student, label_smoothing=label_smoothing)
        self.settings = settings = self.settings_from(settings, changes)
        self.stage = settings.stage if settings.stage is not None else student.stages[-1]
        student.tap(self.stage)
        with torch.no_grad():
            probe = torch.zeros(1, 3, *_PROBE, device=next(teacher.parameters()).device)
            teacher_channels = teacher.cnn.forward_features(probe).shape[1]
        self.regressor = nn.Conv2d(student.stage_channels(self.stage), teacher_channels, kernel_size=1)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.student.parameters()
        yield from self.regressor.parameters()

    def loss_terms(self, s: StudentOutput, t, targets: torch.Tensor, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        settings = self.settings
        target = t.cnn_features.float()
        hint = F.interpolate(self.regressor(s.features[self.stage]).float(), size=target.shape[-2:],
                             mode="bilinear", align_corners=False)
        ce = weighted_ce(settings.ce_weight, s.logits, targets, self.label_smoothing)
        fit = settings.hint_weight * F.mse_loss(hint, target)
        return {"ce": ce, "hint": fit, "total": ce + fit}
