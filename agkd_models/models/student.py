"""The student (EfficientNet-B0 by default): logits, plus attention maps and feature maps
of chosen intermediate stages, captured by forward hooks during the one normal forward."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn

import agkd_ops

from .teacher import create_timm_model

__all__ = ["Student", "StudentOutput", "StudentTeacher", "StudentTeacherOutput"]


@dataclass
class StudentOutput:
    logits: torch.Tensor                 # (B, K)
    attention: List[torch.Tensor]        # per chosen stage: (B, 1, h_i, w_i), unit L2 norm
    features: Dict[int, torch.Tensor]    # stage index -> (B, C_i, h_i, w_i)


class Student(nn.Module):
    """A timm CNN with stage taps.

    Args:
        num_classes: output classes.
        name: timm model name with a ``blocks`` stage list (EfficientNet/MobileNet family).
        stages: indices into ``model.blocks`` whose outputs give attention maps (their
            feature maps are in the output too; :meth:`tap` adds feature-only stages).
        weights / pretrained: as for :func:`agkd_models.teacher.create_timm_model`.
        p: exponent of the attention maps.
    """

    def __init__(self, num_classes: int, *, name: str = "efficientnet_b0",
                 stages: Sequence[int] = (3, 4, 5),
                 weights: Optional[str] = None, pretrained: bool = False, p: float = 2.0,
                 **kwargs: Any):
        super().__init__()
        self.model = create_timm_model(name, num_classes, pretrained=pretrained, weights=weights,
                                       weights_setting="student.weights", **kwargs)
        if not hasattr(self.model, "blocks"):
            raise ValueError(f"Student: timm model {name!r} has no 'blocks' stage list to tap")
        self.name = name
        self.stages = [int(s) for s in stages]
        self.p = p
        self._captured: Dict[int, torch.Tensor] = {}
        self._tapped: Set[int] = set()
        for s in self.stages:
            self.tap(s)

    @property
    def num_stages(self) -> int:
        return len(self.model.blocks)

    def tap(self, stage: int) -> None:
        """Record ``stage``'s feature map in :attr:`StudentOutput.features` (a distiller
        that projects a stage's features, such as CAKD, taps it)."""
        if not 0 <= stage < self.num_stages:
            raise ValueError(f"Student: stage {stage} out of range for {self.name!r} with {self.num_stages} "
                             f"stages (0 to {self.num_stages - 1})")
        if stage in self._tapped:
            return
        self._tapped.add(stage)
        # A bound method, not a closure: a deep copy of the student then records into its own dict.
        self.model.blocks[stage].register_forward_hook(functools.partial(self._record, stage))

    def _record(self, stage: int, _module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        self._captured[stage] = output

    @torch.no_grad()
    def stage_grids(self, image_size: Tuple[int, int]) -> List[Tuple[int, int]]:
        """The (height, width) of every stage's feature map for an input of ``image_size``,
        from one forward pass of a blank image in eval mode (no statistics change)."""
        grids: List[Tuple[int, int]] = [(0, 0)] * self.num_stages
        handles = [block.register_forward_hook(lambda _m, _i, out, i=i: grids.__setitem__(i, tuple(out.shape[-2:])))
                   for i, block in enumerate(self.model.blocks)]
        was_training = self.training
        try:
            self.eval()
            reference = next(self.model.parameters())
            self.model(reference.new_zeros(1, 3, *image_size))
        finally:
            self.train(was_training)
            for h in handles:
                h.remove()
        return grids

    def stage_channels(self, stage: int) -> int:
        block = self.model.blocks[stage][-1]
        for attr in ("conv_pwl", "conv_pw", "conv"):
            if hasattr(block, attr):
                return getattr(block, attr).out_channels
        raise ValueError(f"Student: cannot tell the channels of stage {stage}")

    def forward(self, images: torch.Tensor) -> StudentOutput:
        self._captured = {}
        logits = self.model(images)
        features = dict(self._captured)
        attention = [agkd_ops.attention_map(features[s].float(), p=self.p) for s in self.stages]
        return StudentOutput(logits=logits, attention=attention, features=features)


@dataclass
class StudentTeacherOutput:
    """What a trained student gives as a teacher: the outputs the logit methods and AGKD read."""
    logits: torch.Tensor     # (B, K)
    attention: torch.Tensor  # (B, 1, h, w): the attention map of its last stage in ``stages``


class StudentTeacher(nn.Module):
    """A trained :class:`Student` standing in for the hybrid teacher of a later run (a
    teacher assistant, a born-again generation's parent): its logits and, as the teacher
    attention map AGKD aligns to, the map of its last chosen stage. It serves the methods
    that read only the teacher's outputs (those a teacher cache can serve)."""

    def __init__(self, student: Student):
        super().__init__()
        if not student.stages:
            raise ValueError("StudentTeacher: the student has no attention stage to give a teacher map from")
        self.student = student

    @property
    def name(self) -> str:
        return self.student.name

    def forward(self, images: torch.Tensor) -> StudentTeacherOutput:
        out = self.student(images)
        return StudentTeacherOutput(logits=out.logits, attention=out.attention[-1])
