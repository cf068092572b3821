"""Fake (meta) kernels for the native ops, so that ``torch.compile(fullgraph=True)`` and
``torch.library.opcheck`` can trace them. Imported by ``agkd_ops`` only when the compiled
library loaded.

Autograd is not here: each op's ``torch::autograd::Function`` is C++, registered at the
Autograd key (csrc/agkd/autograd/<op>_autograd.cpp), so no Python runs per eager call.
Every loss op has the same shape (csrc/agkd/ops.cpp): ``<op>_fwd(a, b, *more_tensors,
*params) -> (per_sample_loss, stats)`` and ``<op>_bwd(grad_loss, a, b, *more_tensors,
stats, *params, needs_grad_a, needs_grad_b) -> (grad_a, grad_b)``.
"""
from __future__ import annotations

import torch

from ._backend import _C
from ._defaults import accumulate_dtype as _accumulate_dtype

# Widths of the saved stats, owned by the C++ side (csrc/agkd/math/hybrid.h and kd.h).
_HYBRID_STATS: int = _C.hybrid_stats
_KD_STATS: int = _C.kd_stats


def _loss_and_stats(like: torch.Tensor, reduction: str, n_stats: int):
    """A loss forward's outputs: the loss, (N,) or 0-dim as ``reduction`` says, and the
    (N, n_stats) stats, both in the accumulate dtype."""
    acc = _accumulate_dtype(like.dtype)
    n = like.shape[0]
    return (like.new_empty((n,) if reduction == "none" else (), dtype=acc),
            like.new_empty((n, n_stats), dtype=acc))


def _grad_or_empty(like: torch.Tensor, needed: bool) -> torch.Tensor:
    # The kernels return contiguous gradients, and an empty tensor where none is needed.
    return like.new_empty(like.shape) if needed else like.new_empty((0,))


# ---------------------------------------------------------------- agkd::hybrid_fwd/bwd

@torch.library.register_fake("agkd::hybrid_fwd")
def _hybrid_fwd_fake(x, y, alpha, beta, window_size, sigma, c1, c2, padding, eps, reduction):
    return _loss_and_stats(x, reduction, _HYBRID_STATS)


@torch.library.register_fake("agkd::hybrid_bwd")
def _hybrid_bwd_fake(grad_loss, x, y, stats, alpha, beta, window_size, sigma, c1, c2, padding,
                     eps, needs_grad_x, needs_grad_y):
    return _grad_or_empty(x, needs_grad_x), _grad_or_empty(y, needs_grad_y)


# ---------------------------------------------------------------- agkd::minmax_scale_*

@torch.library.register_fake("agkd::minmax_scale_fwd")
def _minmax_scale_fwd_fake(maps, eps):
    n, c = maps.shape[:2]
    return (maps.new_empty(maps.shape).contiguous(),
            maps.new_empty((n, c, 2), dtype=_accumulate_dtype(maps.dtype)))


@torch.library.register_fake("agkd::minmax_scale_bwd")
def _minmax_scale_bwd_fake(grad_scaled, maps, range, eps):
    return maps.new_empty(maps.shape).contiguous()


# ----------------------------------------------------------------------- agkd::kd_fwd

@torch.library.register_fake("agkd::kd_fwd")
def _kd_fwd_fake(student, teacher, target, temperature, ce_weight, kl_weight, label_smoothing,
                 ignore_index, reduction, needs_grad_student=False, needs_grad_teacher=False):
    loss, stats = _loss_and_stats(student, reduction, _KD_STATS)
    acc = _accumulate_dtype(student.dtype)
    return (loss, stats, _forward_grad(student, needs_grad_student, acc),
            _forward_grad(teacher, needs_grad_teacher, acc))


# ------------------------------------------- the logit-KD family (gradients in the forward)

def _loss(like: torch.Tensor, reduction: str):
    return like.new_empty((like.shape[0],) if reduction == "none" else (), dtype=_accumulate_dtype(like.dtype))


def _forward_grad(like: torch.Tensor, needed: bool, dtype: torch.dtype) -> torch.Tensor:
    # The gradients these ops return with the loss are contiguous, in the accumulate dtype.
    return like.new_empty(like.shape if needed else (0,), dtype=dtype)


@torch.library.register_fake("agkd::kd_family_fwd")
def _kd_family_fwd_fake(student, teacher, temperature, teacher_temperature, standardize, standardize_eps, reduction,
                        needs_grad_student, needs_grad_teacher, needs_grad_temperature):
    acc = _accumulate_dtype(student.dtype)
    return (_loss(student, reduction), _forward_grad(student, needs_grad_student, acc),
            _forward_grad(teacher, needs_grad_teacher, acc), _forward_grad(temperature, needs_grad_temperature, acc))


@torch.library.register_fake("agkd::dkd_fwd")
def _dkd_fwd_fake(student, teacher, target, temperature, tckd_weight, nckd_weight, reduction,
                  needs_grad_student, needs_grad_teacher):
    acc = _accumulate_dtype(student.dtype)
    return (_loss(student, reduction), _forward_grad(student, needs_grad_student, acc),
            _forward_grad(teacher, needs_grad_teacher, acc))


@torch.library.register_fake("agkd::ofa_fwd")
def _ofa_fwd_fake(student, teacher, target, temperature, eps, reduction, needs_grad_student, needs_grad_teacher):
    acc = _accumulate_dtype(student.dtype)
    return (_loss(student, reduction), _forward_grad(student, needs_grad_student, acc),
            _forward_grad(teacher, needs_grad_teacher, acc))


@torch.library.register_fake("agkd::dist_fwd")
def _dist_fwd_fake(student, teacher, temperature, inter_weight, intra_weight, eps, needs_grad_student,
                   needs_grad_teacher):
    acc = _accumulate_dtype(student.dtype)
    return (_loss(student, "mean"), _forward_grad(student, needs_grad_student, acc),
            _forward_grad(teacher, needs_grad_teacher, acc))


# ------------------------------------------------------------ agkd::align_fwd/bwd

@torch.library.register_fake("agkd::align_fwd")
def _align_fwd_fake(student, teacher, alpha, beta, gamma, window_size, sigma, c1, c2, padding, eps,
                    align_corners, reduction, minmax_eps=None):
    return _loss_and_stats(student, reduction, _HYBRID_STATS)


@torch.library.register_fake("agkd::align_bwd")
def _align_bwd_fake(grad_loss, student, teacher, stats, alpha, beta, gamma, window_size, sigma, c1,
                    c2, padding, eps, align_corners, needs_grad_student, needs_grad_teacher, minmax_eps=None):
    return _grad_or_empty(student, needs_grad_student), _grad_or_empty(teacher, needs_grad_teacher)


# ---------------------------------------------------- agkd::attention_map_fwd/bwd

@torch.library.register_fake("agkd::attention_map_fwd")
def _attention_map_fwd_fake(features, p, normalize, eps):
    n, _c, h, w = features.shape
    return (features.new_empty((n, 1, h, w)),
            features.new_empty((n,), dtype=_accumulate_dtype(features.dtype)))


@torch.library.register_fake("agkd::attention_map_bwd")
def _attention_map_bwd_fake(grad_map, features, amap, norm, p, normalize, eps):
    return features.new_empty(features.shape)
