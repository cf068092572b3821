"""Attention-guided knowledge distillation (AGKD)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

import agkd_ops

from ..models.student import Student, StudentOutput
from ..models.teacher import HybridTeacher
from ..settings import ConfigError, Settings, default_of, setting
from .base import Distiller
from .dist import DISTTerm
from .dkd import DKDTerm
from .logit import KDTerm, LogitKDSettings
from .lskd import LSKDTerm
from .ttm import TTMTerm

__all__ = ["AGKD", "AGKDSettings", "ATTENTION_LOSSES", "LOGIT_LOSSES"]

ATTENTION_LOSSES = (*agkd_ops.ALIGN_LOSSES, "perceptual")
# AGKD's logit term: Hinton KD with AGKD's own temperature and kd_weight, or another logit
# method's loss with that method's section (agkd.logit_loss=dkd reads dkd.*).
LOGIT_LOSSES = {"kd": KDTerm, "dkd": DKDTerm, "dist": DISTTerm, "lskd": LSKDTerm, "ttm": TTMTerm}


@dataclass
class AGKDSettings(LogitKDSettings, section="agkd"):
    """AGKD's total ``logit_weight·L_logits + attention_weight·L_attention``. With
    ``logit_loss="kd"`` (the paper's) the logit term is Hinton KD with this section's
    ``temperature`` and ``kd_weight`` (those of :class:`LogitKDSettings`); with ``dkd``,
    ``dist``, ``lskd`` or ``ttm`` it is that method's whole loss, configured by its own
    section (``--set agkd.logit_loss=dkd --set dkd.nckd_weight=2``)."""
    attention_loss: str = setting("hybrid", "attention-map loss", choices=ATTENTION_LOSSES)
    logit_loss: str = setting("kd", "the logit term: Hinton KD (kd, with this section's temperature and kd_weight) "
                              "or another logit method's loss with that method's section", choices=tuple(LOGIT_LOSSES))
    logit_weight: float = setting(1.0, "weight of the logit (KD) term", minimum=0)
    attention_weight: float = setting(1.0, "weight of the attention term", minimum=0)
    ssim_weight: float = setting(default_of(agkd_ops.hybrid_loss, "ssim_weight"), "hybrid loss: weight of 1 - SSIM",
                                 minimum=0)
    cosine_weight: float = setting(default_of(agkd_ops.hybrid_loss, "cosine_weight"), "hybrid loss: weight of "
                                   "1 - cos", minimum=0)
    window_size: int = setting(3, "ssim/hybrid: SSIM window", minimum=1, odd=True)
    sigma: float = setting(default_of(agkd_ops.ssim, "sigma"),
                           "ssim/hybrid: the SSIM Gaussian window's standard deviation (1.5 is Wang et al.'s for 11 "
                           "taps; on 3 taps it weighs the centre 1 : 0.80 against its neighbours)", minimum=1e-3)
    padding: str = setting("zeros", "ssim/hybrid: SSIM padding", choices=agkd_ops.PADDINGS)
    perceptual_layers: int = setting(4, "perceptual loss: feature layers of the extractor compared", minimum=1)

    renamed = {"kd_alpha": "kd_weight", "alpha": "logit_weight", "beta": "attention_weight",
               "hybrid_alpha": "ssim_weight", "hybrid_beta": "cosine_weight"}


class AGKD(Distiller):
    """Attention-guided KD: ``logit_weight·L_logits + attention_weight·L_attention``
    (AGKD §III.B, there ``α·L_logits + β·L_attention``).

    ``L_logits`` is the Hinton loss (``agkd_ops.kd_loss``), or the loss of the logit method
    ``logit_loss`` names (DKD, DIST, LSKD, TTM); ``L_attention`` the mean over
    the student's chosen stages of the distance between the student's attention map,
    resized bilinearly to the teacher's ``A_T``, and ``A_T``:

    * ``"mse"``, ``"cosine"``: ``agkd_ops.attention_align_loss`` on the L2-normalised maps;
    * ``"ssim"``, ``"hybrid"`` (``ssim_weight·(1-SSIM) + cosine_weight·(1-cos)``): SSIM's
      constants assume values on a known range, and L2-normalised maps are far below 1, so
      both maps are min–max scaled to [0, 1] per sample first (``data_range=1``); the
      cosine half is scale-invariant, so it sees the same scaled maps;
    * ``"perceptual"``: squared distance of the features of a frozen extractor (default:
      the teacher CNN's first ``perceptual_layers`` modules: of ``.features`` for VGG, else
      its top-level children) applied to the two maps
      (min–max scaled, repeated to 3 channels, student resized to the teacher's size).

    A two-channel ``A_T`` (``combine="concat"``) is compared with the student map
    repeated on both channels. Settings: an :class:`AGKDSettings`, or its fields as
    keywords (``AGKD(teacher, student, attention_loss="mse")``).
    """

    settings_class = AGKDSettings

    def __init__(self, teacher: HybridTeacher, student: Student, settings: Optional[AGKDSettings] = None, *,
                 perceptual_extractor: Optional[nn.Module] = None, label_smoothing: float = 0.0,
                 sections: Optional[Mapping[str, Settings]] = None, **changes):
        super().__init__(teacher, student, label_smoothing=label_smoothing)
        self.settings = settings = self.settings_from(settings, changes)
        term = LOGIT_LOSSES[settings.logit_loss]
        term_settings = settings if settings.logit_loss == "kd" else (sections or {}).get(settings.logit_loss)
        self.logit_term = term(term_settings or term.settings_class(), label_smoothing=label_smoothing)
        if settings.attention_loss == "perceptual":
            if perceptual_extractor is None and not hasattr(teacher, "cnn"):
                raise ConfigError("agkd.attention_loss=perceptual embeds the maps with the hybrid teacher's CNN, "
                                  f"and this run's teacher ({type(teacher).__name__}) has none; choose another "
                                  "attention loss")
            if perceptual_extractor is None:
                # VGG keeps its layers in .features; ResNets and the like list them as children.
                features = getattr(teacher.cnn, "features", teacher.cnn)
                perceptual_extractor = nn.Sequential(*list(features.children())[:settings.perceptual_layers])
            self.perceptual = perceptual_extractor  # shares (frozen) teacher weights by default
            for p in self.perceptual.parameters():
                p.requires_grad_(False)

    def attention_term(self, student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
        if teacher_map.shape[1] != student_map.shape[1]:
            student_map = student_map.expand(-1, teacher_map.shape[1], -1, -1)
        settings = self.settings
        loss = settings.attention_loss
        if loss in ("mse", "cosine"):
            return agkd_ops.attention_align_loss(student_map, teacher_map, loss=loss)
        # SSIM's data_range=1 wants [0, 1] maps: both are min-max scaled inside the fused op
        # (the student's at its own size, before resizing; a constant map becomes 0).
        if loss == "ssim":
            return agkd_ops.attention_align_loss(student_map, teacher_map, loss="ssim", scale="minmax",
                                                 window_size=settings.window_size, sigma=settings.sigma,
                                                 padding=settings.padding)
        if loss == "hybrid":
            return agkd_ops.attention_align_loss(student_map, teacher_map, loss="hybrid", scale="minmax",
                                                 ssim_weight=settings.ssim_weight, cosine_weight=settings.cosine_weight,
                                                 window_size=settings.window_size, sigma=settings.sigma,
                                                 padding=settings.padding)
        s, t = agkd_ops.minmax_scale(student_map), agkd_ops.minmax_scale(teacher_map)
        s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
        as_rgb = lambda m: m.mean(1, keepdim=True).expand(-1, 3, -1, -1)
        return F.mse_loss(self.perceptual(as_rgb(s)), self.perceptual(as_rgb(t)))

    def start_epoch(self, epoch: int, batches: int) -> None:
        self.logit_term.start_epoch(epoch, batches)

    def loss_terms(self, s: StudentOutput, t, targets: torch.Tensor, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        settings = self.settings
        logits = self.logit_term(s.logits, t.logits, targets)["total"]
        teacher_map = t.attention.to(s.attention[0].dtype)
        attention = torch.stack([self.attention_term(m, teacher_map) for m in s.attention]).mean()
        total = settings.logit_weight * logits + settings.attention_weight * attention
        return {"logits_kd": logits, "attention": attention, "total": total}
