"""agkd_ops: fused, differentiable loss operators for attention-guided knowledge
distillation, with C++ (CPU) and CUDA kernels and a pure-PyTorch reference.

    >>> import agkd_ops
    >>> criterion = agkd_ops.HybridLoss(ssim_weight=0.5, cosine_weight=0.5)
"""
from . import _backend, reference
from ._backend import build_info, get_backend, native_available, set_backend
from ._validation import PADDINGS
from .functional import (ALIGN_LOSSES, attention_align_loss, attention_map, cosine_loss, dist_loss, dkd_loss,
                         hybrid_loss, kd_kl_div, kd_loss, minmax_scale, ofa_loss, ssim, ssim_loss)
from .losses import (AttentionAlignLoss, CosineLoss, DISTLoss, DKDLoss, HybridLoss, KDKLDivLoss, KDLoss, OFALoss,
                     SSIMLoss)

if _backend._C is not None:
    from . import _registrations  # noqa: F401  (fake + autograd for the native ops)

__version__ = "0.1.0"

__all__ = [
    "ssim", "ssim_loss", "cosine_loss", "hybrid_loss", "attention_map", "minmax_scale", "attention_align_loss",
    "kd_kl_div", "kd_loss", "dkd_loss", "dist_loss", "ofa_loss",
    "SSIMLoss", "CosineLoss", "HybridLoss", "AttentionAlignLoss", "KDKLDivLoss", "KDLoss",
    "DKDLoss", "DISTLoss", "OFALoss",
    "set_backend", "get_backend", "native_available", "build_info",
    "reference", "PADDINGS", "ALIGN_LOSSES",
]
