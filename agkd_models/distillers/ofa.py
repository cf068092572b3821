"""OFA (Hao et al., "One-for-All: Bridge the Gap Between Heterogeneous Architectures in
Knowledge Distillation", NeurIPS 2023): the OFA loss on the student's logits and on light
branches that map chosen student stages into the logit space."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

import torch
from torch import nn

import agkd_ops

from ..models.student import StudentOutput
from ..settings import ConfigError, Settings, default_of, setting
from .base import Distiller, ModelFacts
from .logit import class_targets, weighted_ce

__all__ = ["OFA", "OFASettings", "OFABranch", "check_ofa_settings"]


@dataclass
class OFASettings(Settings, section="ofa"):
    """``ce_weight·CE + kd_weight·OFA(s) + branch_weight·Σ_stages OFA(branch_stage)`` with
    ``OFA`` the loss of ``agkd_ops.ofa_loss`` (the teacher's soft targets with the target
    class raised to the power ε). Each branch reads one student stage and ends in the logit
    space: as the authors build them for CNN students, one depthwise-separable block per
    halving of the resolution down to the last stage's (a 1×1 convolution where there is
    none), then global pooling and a linear classifier. The branches are trained with the
    student and dropped afterwards. Defaults: the authors' weights 1, 1, 1 and τ = 1; ε = 1
    (their scripts use 1 to 1.5)."""
    ce_weight: float = setting(1.0, "weight of the cross-entropy with the labels (the authors' --gt-loss-weight)",
                               minimum=0)
    kd_weight: float = setting(1.0, "weight of the OFA loss on the student's logits (--kd-loss-weight)", minimum=0)
    branch_weight: float = setting(1.0, "weight of the branches' OFA losses (--ofa-loss-weight)", minimum=0)
    eps: float = setting(default_of(agkd_ops.ofa_loss, "eps"), "ε, the target-enhancing exponent (--ofa-eps)",
                         minimum=1e-3, maximum=16)
    temperature: float = setting(default_of(agkd_ops.ofa_loss, "temperature"), "softmax temperature τ "
                                 "(--ofa-temperature)", above=0)
    stages: Optional[List[int]] = setting(None, "student stages that get a branch (null: the student's attention "
                                          "stages, student.stages)", minimum=0)


def check_ofa_settings(settings: OFASettings, facts: ModelFacts) -> None:
    """Every branch stage must be one of the chosen student's (before any work)."""
    bad = [s for s in settings.stages or () if not 0 <= s < facts.student_stages]
    if bad:
        raise ConfigError(f"ofa.stages: stage {bad[0]} does not exist in {facts.student!r}, which has "
                          f"{facts.student_stages} stages (0 to {facts.student_stages - 1})")


def _separable(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """A depthwise-separable pair: depthwise 3×3 (stride), pointwise, BN, ReLU, twice."""
    return nn.Sequential(
        nn.Conv2d(in_channels, in_channels, 3, stride, 1, groups=in_channels, bias=False),
        nn.Conv2d(in_channels, in_channels, 1, bias=False), nn.BatchNorm2d(in_channels), nn.ReLU(),
        nn.Conv2d(in_channels, in_channels, 3, 1, 1, groups=in_channels, bias=False),
        nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU())


class OFABranch(nn.Sequential):
    """From one stage's features (``channels``, ``halvings`` times the last stage's
    resolution) to ``num_classes`` logits: ``halvings`` stride-2 separable blocks doubling
    the channels (the last one to ``width``), or a 1×1 convolution to ``width`` if none,
    then global average pooling and a linear layer."""

    def __init__(self, channels: int, halvings: int, width: int, num_classes: int):
        blocks: List[nn.Module] = []
        if halvings == 0:
            blocks.append(nn.Conv2d(channels, width, 1))
        for i in range(halvings):
            out = width if i == halvings - 1 else channels * 2
            blocks.append(_separable(channels, out, stride=2))
            channels = out
        super().__init__(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


class OFA(Distiller):
    """OFA (:class:`OFASettings` has the loss and its defaults)."""

    settings_class = OFASettings
    _PROBE = (64, 64)  # an input size at which every stage's resolution ratio shows

    def __init__(self, teacher, student, settings=None, *, label_smoothing: float = 0.0, **changes):
        super().__init__(teacher, student, label_smoothing=label_smoothing)
        self.settings = settings = self.settings_from(settings, changes)
        self.branch_stages = list(settings.stages if settings.stages is not None else student.stages)
        grids = student.stage_grids(self._PROBE)
        final = grids[-1][0]
        width = student.model.num_features
        num_classes = student.model.num_classes
        self.branches = nn.ModuleDict()
        for stage in self.branch_stages:
            student.tap(stage)
            halvings = max(0, round(math.log2(grids[stage][0] / final)))
            self.branches[str(stage)] = OFABranch(student.stage_channels(stage), halvings, width, num_classes)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.student.parameters()
        yield from self.branches.parameters()

    def loss_terms(self, s: StudentOutput, t, targets: torch.Tensor, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        settings = self.settings
        classes = class_targets(targets)

        def ofa(logits: torch.Tensor) -> torch.Tensor:
            return agkd_ops.ofa_loss(logits.float(), t.logits, classes, eps=settings.eps,
                                     temperature=settings.temperature)

        ce = weighted_ce(settings.ce_weight, s.logits, targets, self.label_smoothing)
        kd = settings.kd_weight * ofa(s.logits)
        branches = settings.branch_weight * sum(ofa(self.branches[str(stage)](s.features[stage]))
                                                for stage in self.branch_stages)
        return {"ce": ce, "ofa": kd, "ofa_branches": branches, "total": ce + kd + branches}
