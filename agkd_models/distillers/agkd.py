"""Attention-guided knowledge distillation (AGKD)."""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

import agkd_ops

from ..models.attention import minmax_normalize
from ..models.student import Student, StudentOutput
from ..models.teacher import HybridTeacher
from .base import Distiller

__all__ = ["AGKD", "ATTENTION_LOSSES"]

ATTENTION_LOSSES = ("mse", "cosine", "ssim", "hybrid", "perceptual")


class AGKD(Distiller):
    """Attention-guided KD: ``α·L_logits + β·L_attention`` (AGKD §III.B).

    ``L_logits`` is the Hinton loss (``agkd_ops.kd_loss``); ``L_attention`` the mean over
    the student's chosen stages of the distance between the student's attention map,
    resized bilinearly to the teacher's ``A_T``, and ``A_T``:

    * ``"mse"``, ``"cosine"``: ``agkd_ops.attention_align_loss`` on the L2-normalised maps;
    * ``"ssim"``, ``"hybrid"`` (``α_h·(1-SSIM) + β_h·(1-cos)``): SSIM's constants assume
      values on a known range, and L2-normalised maps are far below 1, so both maps are
      min–max scaled to [0, 1] per sample first (``data_range=1``); the cosine half is
      scale-invariant, so it sees the same scaled maps;
    * ``"perceptual"``: squared distance of the features of a frozen extractor (default:
      the teacher CNN's first ``perceptual_layers`` modules: of ``.features`` for VGG, else
      its top-level children) applied to the two maps
      (min–max scaled, repeated to 3 channels, student resized to the teacher's size).

    A two-channel ``A_T`` (``combine="concat"``) is compared with the student map
    repeated on both channels.
    """

    def __init__(self, teacher: HybridTeacher, student: Student, *, attention_loss: str = "hybrid",
                 alpha: float = 1.0, beta: float = 1.0, temperature: float = 4.0,
                 kd_alpha: float = 0.9, hybrid_alpha: float = 0.5, hybrid_beta: float = 0.5,
                 window_size: int = 3, padding: str = "zeros",
                 perceptual_extractor: Optional[nn.Module] = None, perceptual_layers: int = 4):
        super().__init__(teacher, student)
        if attention_loss not in ATTENTION_LOSSES:
            raise ValueError(f"AGKD: attention_loss must be one of {ATTENTION_LOSSES}, got {attention_loss!r}")
        self.attention_loss, self.alpha, self.beta = attention_loss, alpha, beta
        self.temperature, self.kd_alpha = temperature, kd_alpha
        self.hybrid_alpha, self.hybrid_beta = hybrid_alpha, hybrid_beta
        self.window_size, self.padding = window_size, padding
        if attention_loss == "perceptual":
            if perceptual_extractor is None:
                # VGG keeps its layers in .features; ResNets and the like list them as children.
                features = getattr(teacher.cnn, "features", teacher.cnn)
                perceptual_extractor = nn.Sequential(*list(features.children())[:perceptual_layers])
            self.perceptual = perceptual_extractor  # shares (frozen) teacher weights by default
            for p in self.perceptual.parameters():
                p.requires_grad_(False)

    def attention_term(self, student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
        if teacher_map.shape[1] != student_map.shape[1]:
            student_map = student_map.expand(-1, teacher_map.shape[1], -1, -1)
        loss = self.attention_loss
        if loss in ("mse", "cosine"):
            return agkd_ops.attention_align_loss(student_map, teacher_map, loss=loss)
        s, t = minmax_normalize(student_map), minmax_normalize(teacher_map)
        if loss == "ssim":
            return agkd_ops.attention_align_loss(s, t, loss="ssim", window_size=self.window_size,
                                                 padding=self.padding)
        if loss == "hybrid":
            return agkd_ops.attention_align_loss(s, t, loss="hybrid", alpha=self.hybrid_alpha,
                                                 beta=self.hybrid_beta, window_size=self.window_size,
                                                 padding=self.padding)
        s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
        as_rgb = lambda m: m.mean(1, keepdim=True).expand(-1, 3, -1, -1)
        return F.mse_loss(self.perceptual(as_rgb(s)), self.perceptual(as_rgb(t)))

    def loss_terms(self, s: StudentOutput, t, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        logits = agkd_ops.kd_loss(s.logits, t.logits, targets, temperature=self.temperature,
                                  alpha=self.kd_alpha, label_smoothing=self.label_smoothing)
        teacher_map = t.attention.to(s.attention[0].dtype)
        attention = torch.stack([self.attention_term(m, teacher_map) for m in s.attention]).mean()
        total = self.alpha * logits + self.beta * attention
        return {"logits_kd": logits, "attention": attention, "total": total}
