"""What every backend of agkd_ops agrees on, declared once: the loss functions' defaults,
the dtype the losses accumulate in, and how per-sample values are reduced.

The functions, the modules and the reference take their defaults from here; the native
kernels receive every value as an argument, so no number below is repeated in C++. The
numbers C++ owns (the widths of the saved ``stats``) are read from the compiled library
in :mod:`agkd_ops._registrations`.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class SSIMDefaults(NamedTuple):
    """The SSIM arguments of Wang et al. (2004): an 11-tap Gaussian window with σ = 1.5,
    ``C1 = (k1·L)²``, ``C2 = (k2·L)²`` for data in ``[0, L]``, no padding."""
    window_size: int = 11
    sigma: float = 1.5
    data_range: float = 1.0
    k1: float = 0.01
    k2: float = 0.03
    padding: str = "valid"


SSIM = SSIMDefaults()
COSINE_EPS = 1e-8        # norm floor of the cosine term, as F.cosine_similarity
NORMALIZE_EPS = 1e-12    # floor of an attention map's norm, as F.normalize
MINMAX_EPS = 1e-12       # a map whose range is at most this is constant: scaled to 0 (scale="minmax")
SCALES = (None, "minmax")  # what the attention losses' `scale` takes
HYBRID_SSIM_WEIGHT = 0.5    # weight of 1 - SSIM in the hybrid loss
HYBRID_COSINE_WEIGHT = 0.5  # weight of 1 - cos
ATTENTION_P = 2.0        # exponent of the attention map, mean_c |F|^p
KD_TEMPERATURE = 4.0
KD_WEIGHT = 0.9          # weight of the KL term in Hinton's loss (the cross-entropy gets 1 - it)
STANDARDIZE_EPS = 1e-7   # added to a row's std by standardize=True, as the logit-standardization code


class DKDDefaults(NamedTuple):
    """Decoupled KD (Zhao et al., CVPR 2022): mdistiller's CIFAR-100 recipe, α = 1 for the
    target-class term, β = 8 for the non-target term, τ = 4."""
    tckd_weight: float = 1.0
    nckd_weight: float = 8.0
    temperature: float = 4.0


class DISTDefaults(NamedTuple):
    """DIST (Huang et al., NeurIPS 2022): the authors' β = γ = 1 and τ = 1 (their ImageNet
    setting)."""
    inter_weight: float = 1.0
    intra_weight: float = 1.0
    temperature: float = 1.0


class OFADefaults(NamedTuple):
    """OFA (Hao et al., NeurIPS 2023): the target-enhancing exponent ε = 1 (plain
    cross-entropy with the teacher's soft targets, the target class raised) and τ = 1."""
    eps: float = 1.0
    temperature: float = 1.0


DKD = DKDDefaults()
DIST = DISTDefaults()
OFA = OFADefaults()
DIST_EPS = 1e-8          # in the Pearson correlation's denominator, as the DIST authors' code


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for every other floating dtype: what the losses
    compute and accumulate in, and the dtype of the native ops' per-sample outputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduce_per_sample(per_sample: torch.Tensor, reduction: str, dtype: torch.dtype) -> torch.Tensor:
    """Per-sample values (in the accumulate dtype) reduced as asked, then cast to ``dtype``."""
    if reduction in ("mean", "batchmean"):
        out = per_sample.mean()
    elif reduction == "sum":
        out = per_sample.sum()
    else:
        out = per_sample
    return out.to(dtype)
