"""Several trained teachers as one (multi-teacher distillation, You et al., "Learning from
Multiple Teacher Networks", KDD 2017): their soft targets and attention maps combined by
a weighted average, so that every method that reads only a teacher's outputs, and the
teacher cache, see one teacher."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MultiTeacher", "MultiTeacherOutput", "TEACHER_AVERAGES"]

# How the teachers' logits are combined (distill.teacher_average).
TEACHER_AVERAGES = ("probabilities", "logits")


@dataclass
class MultiTeacherOutput:
    """The combined teacher: what the logit methods and AGKD read."""
    logits: torch.Tensor     # (B, K)
    attention: torch.Tensor  # (B, C, H, W), at the first teacher's map size


class MultiTeacher(nn.Module):
    """``teachers`` (each with ``.logits`` and ``.attention`` outputs, the same classes and
    attention channels) combined with ``weights`` (non-negative, summing to 1):

    * ``average="probabilities"`` (You et al.): the logits are ``log Σ_i w_i softmax(z_i)``,
      whose softmax is the weighted mean of the teachers' predictions; a method's
      temperature then softens that mixture like any teacher's output;
    * ``average="logits"``: ``Σ_i w_i z_i`` (the normalised weighted geometric mean of the
      predictions at every temperature);
    * the attention map is ``Σ_i w_i A_i``, each ``A_i`` resized bilinearly to the first
      teacher's map size.
    """

    def __init__(self, teachers: Sequence[nn.Module], weights: Sequence[float], average: str = "probabilities"):
        super().__init__()
        if len(teachers) < 2:
            raise ValueError(f"MultiTeacher: give at least two teachers, got {len(teachers)}")
        if len(weights) != len(teachers):
            raise ValueError(f"MultiTeacher: {len(weights)} weights for {len(teachers)} teachers")
        if any(not w >= 0 for w in weights) or abs(sum(weights) - 1) > 1e-6:
            raise ValueError(f"MultiTeacher: weights must be non-negative and sum to 1, got {list(weights)}")
        if average not in TEACHER_AVERAGES:
            raise ValueError(f"MultiTeacher: average must be one of {', '.join(TEACHER_AVERAGES)}, got {average!r}")
        self.teachers = nn.ModuleList(teachers)
        self.weights = [float(w) for w in weights]
        self.average = average

    def forward(self, images: torch.Tensor) -> MultiTeacherOutput:
        outs = [teacher(images) for teacher in self.teachers]
        classes = {tuple(o.logits.shape[1:]) for o in outs}
        channels = {o.attention.shape[1] for o in outs}
        if len(classes) > 1 or len(channels) > 1:
            raise ValueError(f"MultiTeacher: the teachers disagree in classes {sorted(classes)} or attention "
                             f"channels {sorted(channels)}")
        logits = [o.logits.float() for o in outs]
        if self.average == "logits":
            combined = sum(w * z for w, z in zip(self.weights, logits))
        else:  # log Σ w_i p_i, computed stably; a weight of 0 drops its teacher (log 0 = -inf)
            log_weights = torch.log(torch.tensor(self.weights, device=logits[0].device))
            combined = torch.logsumexp(torch.stack([lw + F.log_softmax(z, 1) for lw, z in zip(log_weights, logits)]),
                                       0)
        size = outs[0].attention.shape[-2:]
        attention = sum(w * (o.attention.float() if o.attention.shape[-2:] == size else
                             F.interpolate(o.attention.float(), size=size, mode="bilinear", align_corners=False))
                        for w, o in zip(self.weights, outs))
        return MultiTeacherOutput(logits=combined, attention=attention)
