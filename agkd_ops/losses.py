"""``nn.Module`` wrappers of :mod:`agkd_ops.functional`: hyper-parameters in ``__init__``
(same names and defaults as the functions, checked there by the function's own option
checks, so a bad value fails at construction), tensors in ``forward``."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import functional as F
from ._defaults import (COSINE_EPS, DIST, DKD, HYBRID_COSINE_WEIGHT, HYBRID_SSIM_WEIGHT, KD_TEMPERATURE, KD_WEIGHT,
                        OFA, SSIM)
from ._validation import check_scale, renamed

__all__ = ["SSIMLoss", "CosineLoss", "HybridLoss", "AttentionAlignLoss", "KDKLDivLoss", "KDLoss",
           "DKDLoss", "DISTLoss", "OFALoss"]


class SSIMLoss(nn.Module):
    """``1 - SSIM``; see :func:`agkd_ops.ssim_loss`.

    Example:
        >>> import torch, agkd_ops
        >>> criterion = agkd_ops.SSIMLoss(window_size=7, padding="reflect")
        >>> criterion(torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16)).shape
        torch.Size([])
    """

    def __init__(self, *, window_size: int = SSIM.window_size, sigma: float = SSIM.sigma,
                 data_range: float = SSIM.data_range, k1: float = SSIM.k1, k2: float = SSIM.k2,
                 padding: str = SSIM.padding, reduction: str = "mean") -> None:
        super().__init__()
        F._ssim_options("ssim_loss", window_size, sigma, data_range, k1, k2, padding, reduction)
        self.window_size, self.sigma, self.data_range = window_size, sigma, data_range
        self.k1, self.k2, self.padding, self.reduction = k1, k2, padding, reduction

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.ssim_loss(x, y, window_size=self.window_size, sigma=self.sigma,
                           data_range=self.data_range, k1=self.k1, k2=self.k2,
                           padding=self.padding, reduction=self.reduction)

    def extra_repr(self) -> str:
        return (f"window_size={self.window_size}, sigma={self.sigma}, data_range={self.data_range}, "
                f"padding={self.padding!r}, reduction={self.reduction!r}")


class CosineLoss(nn.Module):
    """``1 - cos`` of the flattened samples; see :func:`agkd_ops.cosine_loss`.

    Example:
        >>> import torch, agkd_ops
        >>> agkd_ops.CosineLoss()(torch.ones(2, 4), -torch.ones(2, 4)).item()
        2.0
    """

    def __init__(self, *, eps: float = COSINE_EPS, reduction: str = "mean") -> None:
        super().__init__()
        F._cosine_options("cosine_loss", eps, reduction)
        self.eps, self.reduction = eps, reduction

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cosine_loss(x, y, eps=self.eps, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, reduction={self.reduction!r}"


class HybridLoss(nn.Module):
    """``ssim_weight * (1 - SSIM) + cosine_weight * (1 - cos)`` in one fused pass; see
    :func:`agkd_ops.hybrid_loss`.

    Example:
        >>> import torch, agkd_ops
        >>> criterion = agkd_ops.HybridLoss(ssim_weight=0.5, cosine_weight=0.5)
        >>> student = torch.rand(8, 1, 28, 28, requires_grad=True)
        >>> criterion(student, torch.rand(8, 1, 28, 28)).backward()
    """

    def __init__(self, *, ssim_weight: float = HYBRID_SSIM_WEIGHT, cosine_weight: float = HYBRID_COSINE_WEIGHT,
                 window_size: int = SSIM.window_size, sigma: float = SSIM.sigma,
                 data_range: float = SSIM.data_range, k1: float = SSIM.k1, k2: float = SSIM.k2,
                 padding: str = SSIM.padding, eps: float = COSINE_EPS, reduction: str = "mean",
                 scale: Optional[str] = None, alpha: Optional[float] = None, beta: Optional[float] = None) -> None:
        super().__init__()
        check_scale("HybridLoss", scale)
        self.scale = scale
        ssim_weight = renamed("HybridLoss", "ssim_weight", ssim_weight, HYBRID_SSIM_WEIGHT, "alpha", alpha, 3)
        cosine_weight = renamed("HybridLoss", "cosine_weight", cosine_weight, HYBRID_COSINE_WEIGHT, "beta", beta, 3)
        F._hybrid_options("hybrid_loss", ssim_weight, cosine_weight, window_size, sigma, data_range, k1, k2,
                          padding, eps, reduction)
        self.ssim_weight, self.cosine_weight = ssim_weight, cosine_weight
        self.window_size, self.sigma, self.data_range = window_size, sigma, data_range
        self.k1, self.k2, self.padding = k1, k2, padding
        self.eps, self.reduction = eps, reduction

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.hybrid_loss(x, y, ssim_weight=self.ssim_weight, cosine_weight=self.cosine_weight,
                             window_size=self.window_size, sigma=self.sigma,
                             data_range=self.data_range, k1=self.k1, k2=self.k2,
                             padding=self.padding, eps=self.eps, reduction=self.reduction, scale=self.scale)

    def extra_repr(self) -> str:
        return (f"ssim_weight={self.ssim_weight}, cosine_weight={self.cosine_weight}, window_size={self.window_size}, "
                f"sigma={self.sigma}, padding={self.padding!r}, reduction={self.reduction!r}")


class AttentionAlignLoss(nn.Module):
    """Student map resized to the teacher's and compared, fused; see
    :func:`agkd_ops.attention_align_loss`.

    Example:
        >>> import torch, agkd_ops
        >>> criterion = agkd_ops.AttentionAlignLoss(loss="hybrid", ssim_weight=0.5, cosine_weight=0.5,
        ...                                         padding="reflect")
        >>> student = torch.rand(8, 1, 28, 28, requires_grad=True)
        >>> criterion(student, torch.rand(8, 1, 56, 56)).backward()
    """

    def __init__(self, *, loss: str = "mse", align_corners: bool = False, reduction: str = "mean",
                 scale: Optional[str] = None, **loss_kwargs) -> None:
        super().__init__()
        check_scale("AttentionAlignLoss", scale)
        self.scale = scale
        loss_kwargs = F._renamed_align_kwargs("AttentionAlignLoss", loss, loss_kwargs, stacklevel=4)
        F._align_options("attention_align_loss", loss, align_corners, reduction, loss_kwargs)
        self.loss, self.align_corners, self.reduction = loss, align_corners, reduction
        self.loss_kwargs = dict(loss_kwargs)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return F.attention_align_loss(student, teacher, loss=self.loss, align_corners=self.align_corners,
                                      reduction=self.reduction, scale=self.scale, **self.loss_kwargs)

    def extra_repr(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.loss_kwargs.items())
        return (f"loss={self.loss!r}, align_corners={self.align_corners}, reduction={self.reduction!r}, "
                f"scale={self.scale!r}{extra}")


class KDKLDivLoss(nn.Module):
    """``τ²·KL(softmax(t̃/τ_t) ‖ softmax(s̃/τ))`` and the logit-KD family's options; see
    :func:`agkd_ops.kd_kl_div`.

    Example:
        >>> import torch, agkd_ops
        >>> criterion = agkd_ops.KDKLDivLoss(temperature=4.0)
        >>> criterion(torch.randn(8, 10), torch.randn(8, 10)).shape
        torch.Size([])
        >>> lskd = agkd_ops.KDKLDivLoss(temperature=2.0, standardize=True)  # logit standardization
        >>> ttm = agkd_ops.KDKLDivLoss(temperature=1.0, teacher_temperature=1 / 0.2)  # TTM, γ = 0.2
    """

    def __init__(self, *, temperature=KD_TEMPERATURE, teacher_temperature: Optional[float] = None,
                 standardize: bool = False, reduction: str = "batchmean") -> None:
        super().__init__()
        F._kd_kl_div_options("kd_kl_div", temperature, reduction, teacher_temperature, standardize)
        self.temperature, self.teacher_temperature = temperature, teacher_temperature
        self.standardize, self.reduction = standardize, reduction

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return F.kd_kl_div(student_logits, teacher_logits, temperature=self.temperature,
                           teacher_temperature=self.teacher_temperature, standardize=self.standardize,
                           reduction=self.reduction)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, teacher_temperature={self.teacher_temperature}, "
                f"standardize={self.standardize}, reduction={self.reduction!r}")


class KDLoss(nn.Module):
    """Hinton's ``(1-w)·CE + w·τ²·KL`` (``w = kd_weight``) with ``F.cross_entropy``'s options
    and the logit-KD family's; see :func:`agkd_ops.kd_loss`.

    Example:
        >>> import torch, agkd_ops
        >>> criterion = agkd_ops.KDLoss(temperature=4.0, kd_weight=0.5, label_smoothing=0.1)
        >>> student = torch.randn(8, 10, requires_grad=True)
        >>> criterion(student, torch.randn(8, 10), torch.randint(0, 10, (8,))).backward()
    """

    def __init__(self, *, temperature=KD_TEMPERATURE, kd_weight: float = KD_WEIGHT,
                 label_smoothing: float = 0.0, ignore_index: Optional[int] = None,
                 teacher_temperature: Optional[float] = None, standardize: bool = False,
                 reduction: str = "mean", alpha: Optional[float] = None) -> None:
        super().__init__()
        kd_weight = renamed("KDLoss", "kd_weight", kd_weight, KD_WEIGHT, "alpha", alpha, 3)
        F._kd_loss_options("kd_loss", temperature, kd_weight, label_smoothing, ignore_index, reduction,
                           teacher_temperature, standardize)
        self.temperature, self.kd_weight, self.reduction = temperature, kd_weight, reduction
        self.label_smoothing, self.ignore_index = label_smoothing, ignore_index
        self.teacher_temperature, self.standardize = teacher_temperature, standardize

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                target: torch.Tensor) -> torch.Tensor:
        return F.kd_loss(student_logits, teacher_logits, target, temperature=self.temperature,
                         kd_weight=self.kd_weight, label_smoothing=self.label_smoothing,
                         ignore_index=self.ignore_index, teacher_temperature=self.teacher_temperature,
                         standardize=self.standardize, reduction=self.reduction)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, kd_weight={self.kd_weight}, "
                f"label_smoothing={self.label_smoothing}, ignore_index={self.ignore_index}, "
                f"teacher_temperature={self.teacher_temperature}, standardize={self.standardize}, "
                f"reduction={self.reduction!r}")


class DKDLoss(nn.Module):
    """Decoupled KD, ``τ²·(α·TCKD + β·NCKD)``; see :func:`agkd_ops.dkd_loss`.

    Example:
        >>> import torch, agkd_ops
        >>> criterion = agkd_ops.DKDLoss(tckd_weight=1.0, nckd_weight=8.0, temperature=4.0)
        >>> criterion(torch.randn(8, 100), torch.randn(8, 100), torch.randint(0, 100, (8,))).shape
        torch.Size([])
    """

    def __init__(self, *, tckd_weight: float = DKD.tckd_weight, nckd_weight: float = DKD.nckd_weight,
                 temperature: float = DKD.temperature, reduction: str = "mean") -> None:
        super().__init__()
        F._dkd_options("dkd_loss", tckd_weight, nckd_weight, temperature, reduction)
        self.tckd_weight, self.nckd_weight = tckd_weight, nckd_weight
        self.temperature, self.reduction = temperature, reduction

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                target: torch.Tensor) -> torch.Tensor:
        return F.dkd_loss(student_logits, teacher_logits, target, tckd_weight=self.tckd_weight,
                          nckd_weight=self.nckd_weight, temperature=self.temperature, reduction=self.reduction)

    def extra_repr(self) -> str:
        return (f"tckd_weight={self.tckd_weight}, nckd_weight={self.nckd_weight}, "
                f"temperature={self.temperature}, reduction={self.reduction!r}")


class DISTLoss(nn.Module):
    """DIST's inter- and intra-class Pearson relations; see :func:`agkd_ops.dist_loss`.

    Example:
        >>> import torch, agkd_ops
        >>> agkd_ops.DISTLoss(inter_weight=1.0, intra_weight=1.0)(torch.randn(8, 100), torch.randn(8, 100)).shape
        torch.Size([])
    """

    def __init__(self, *, inter_weight: float = DIST.inter_weight, intra_weight: float = DIST.intra_weight,
                 temperature: float = DIST.temperature) -> None:
        super().__init__()
        F._dist_options("dist_loss", inter_weight, intra_weight, temperature)
        self.inter_weight, self.intra_weight, self.temperature = inter_weight, intra_weight, temperature

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return F.dist_loss(student_logits, teacher_logits, inter_weight=self.inter_weight,
                           intra_weight=self.intra_weight, temperature=self.temperature)

    def extra_repr(self) -> str:
        return (f"inter_weight={self.inter_weight}, intra_weight={self.intra_weight}, "
                f"temperature={self.temperature}")


class OFALoss(nn.Module):
    """OFA's target-enhanced soft cross-entropy; see :func:`agkd_ops.ofa_loss`.

    Example:
        >>> import torch, agkd_ops
        >>> criterion = agkd_ops.OFALoss(eps=1.5)
        >>> criterion(torch.randn(8, 100), torch.randn(8, 100), torch.randint(0, 100, (8,))).shape
        torch.Size([])
    """

    def __init__(self, *, eps: float = OFA.eps, temperature: float = OFA.temperature,
                 reduction: str = "mean") -> None:
        super().__init__()
        F._ofa_options("ofa_loss", eps, temperature, reduction)
        self.eps, self.temperature, self.reduction = eps, temperature, reduction

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                target: torch.Tensor) -> torch.Tensor:
        return F.ofa_loss(student_logits, teacher_logits, target, eps=self.eps, temperature=self.temperature,
                          reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, temperature={self.temperature}, reduction={self.reduction!r}"
