"""The student (EfficientNet-B0 by default): logits, plus attention maps and feature maps
of chosen intermediate stages, captured by forward hooks during the one normal forward."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

import agkd_ops

from .teacher import create_timm_model

__all__ = ["Student", "StudentOutput"]


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
        stages: indices into ``model.blocks`` whose outputs give attention maps.
        feature_stage: the stage whose feature map CAKD projects (default: the last of
            ``stages``); it is recorded even when not in ``stages``.
        weights / pretrained: as for :func:`agkd_models.teacher.create_timm_model`.
        p: exponent of the attention maps.
    """

    def __init__(self, num_classes: int, *, name: str = "efficientnet_b0",
                 stages: Sequence[int] = (3, 4, 5), feature_stage: Optional[int] = None,
                 weights: Optional[str] = None, pretrained: bool = False, p: float = 2.0,
                 **kwargs: Any):
        super().__init__()
        self.model = create_timm_model(name, num_classes, pretrained=pretrained, weights=weights, **kwargs)
        if not hasattr(self.model, "blocks"):
            raise ValueError(f"Student: timm model {name!r} has no 'blocks' stage list to tap")
        n_blocks = len(self.model.blocks)
        self.stages = [int(s) for s in stages]
        self.feature_stage = int(feature_stage if feature_stage is not None else self.stages[-1])
        for s in self.stages + [self.feature_stage]:
            if not 0 <= s < n_blocks:
                raise ValueError(f"Student: stage {s} out of range for {name!r} with {n_blocks} blocks")
        self.p = p
        self._captured: Dict[int, torch.Tensor] = {}
        for s in sorted(set(self.stages) | {self.feature_stage}):
            self.model.blocks[s].register_forward_hook(self._capture(s))

    def _capture(self, stage: int):
        def hook(_module, _inputs, output):
            self._captured[stage] = output
        return hook

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
