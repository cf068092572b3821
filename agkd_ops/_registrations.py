"""Fake (meta) kernels and autograd for the native ops, so that they work under
``torch.compile(fullgraph=True)`` and ``loss.backward()``. Imported by ``agkd_ops`` only
when the compiled library loaded.

Every loss op has the same shape (csrc/agkd/ops.cpp): ``<op>_fwd(a, b, *more_tensors,
*params) -> (per_sample_loss, stats)`` and ``<op>_bwd(grad_loss, a, b, *more_tensors,
stats, *params, needs_grad_a, needs_grad_b) -> (grad_a, grad_b)``; :func:`_register_autograd`
wires one such pair.
"""
from __future__ import annotations

import torch

from ._backend import _C
from ._defaults import accumulate_dtype as _accumulate_dtype

# Widths of the saved stats, owned by the C++ side (csrc/agkd/math/hybrid.h and kd.h).
_HYBRID_STATS: int = _C.hybrid_stats
_KD_STATS: int = _C.kd_stats


def _grad_or_empty(like: torch.Tensor, needed: bool) -> torch.Tensor:
    # The kernels return contiguous gradients, and an empty tensor where none is needed.
    return like.new_empty(like.shape) if needed else like.new_empty((0,))


def _register_autograd(op: str, n_tensors: int) -> None:
    """Autograd for ``agkd::<op>_fwd`` whose first ``n_tensors`` inputs are tensors, the
    first two of them differentiable (the others, e.g. class targets, are not)."""

    def setup_context(ctx, inputs, output):
        _loss, stats = output
        ctx.save_for_backward(*inputs[:n_tensors], stats)
        ctx.params = inputs[n_tensors:]
        ctx.mark_non_differentiable(stats)

    def backward(ctx, grad_loss, _grad_stats):
        *tensors, stats = ctx.saved_tensors
        needs_a, needs_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        bwd = getattr(torch.ops.agkd, f"{op}_bwd")
        grad_a, grad_b = bwd(grad_loss.contiguous(), *tensors, stats, *ctx.params, needs_a, needs_b)
        return ((grad_a if needs_a else None, grad_b if needs_b else None)
                + (None,) * (n_tensors - 2 + len(ctx.params)))

    torch.library.register_autograd(f"agkd::{op}_fwd", backward, setup_context=setup_context)
    _forbid_double_backward(op)


def _forbid_double_backward(op: str) -> None:
    def no_double_backward(ctx, *grads):
        raise NotImplementedError(
            f"agkd_ops: double backward (a gradient of a gradient) through agkd::{op} is not "
            f"implemented; use agkd_ops.set_backend('reference') for it"
        )

    torch.library.register_autograd(f"agkd::{op}_bwd", no_double_backward,
                                    setup_context=lambda ctx, inputs, output: None)


# ---------------------------------------------------------------- agkd::hybrid_fwd/bwd

@torch.library.register_fake("agkd::hybrid_fwd")
def _hybrid_fwd_fake(x, y, alpha, beta, window_size, sigma, c1, c2, padding, eps):
    acc = _accumulate_dtype(x.dtype)
    n = x.shape[0]
    return x.new_empty((n,), dtype=acc), x.new_empty((n, _HYBRID_STATS), dtype=acc)


@torch.library.register_fake("agkd::hybrid_bwd")
def _hybrid_bwd_fake(grad_loss, x, y, stats, alpha, beta, window_size, sigma, c1, c2, padding,
                     eps, needs_grad_x, needs_grad_y):
    return _grad_or_empty(x, needs_grad_x), _grad_or_empty(y, needs_grad_y)


_register_autograd("hybrid", n_tensors=2)


# ------------------------------------------------------------------- agkd::kd_fwd/bwd

@torch.library.register_fake("agkd::kd_fwd")
def _kd_fwd_fake(student, teacher, target, temperature, ce_weight, kl_weight):
    acc = _accumulate_dtype(student.dtype)
    n = student.shape[0]
    return student.new_empty((n,), dtype=acc), student.new_empty((n, _KD_STATS), dtype=acc)


@torch.library.register_fake("agkd::kd_bwd")
def _kd_bwd_fake(grad_loss, student, teacher, target, stats, temperature, ce_weight, kl_weight,
                 needs_grad_student, needs_grad_teacher):
    return _grad_or_empty(student, needs_grad_student), _grad_or_empty(teacher, needs_grad_teacher)


_register_autograd("kd", n_tensors=3)


# ------------------------------------------------------------ agkd::align_fwd/bwd

@torch.library.register_fake("agkd::align_fwd")
def _align_fwd_fake(student, teacher, alpha, beta, gamma, window_size, sigma, c1, c2, padding, eps,
                    align_corners):
    acc = _accumulate_dtype(student.dtype)
    n = student.shape[0]
    return student.new_empty((n,), dtype=acc), student.new_empty((n, _HYBRID_STATS), dtype=acc)


@torch.library.register_fake("agkd::align_bwd")
def _align_bwd_fake(grad_loss, student, teacher, stats, alpha, beta, gamma, window_size, sigma, c1,
                    c2, padding, eps, align_corners, needs_grad_student, needs_grad_teacher):
    return _grad_or_empty(student, needs_grad_student), _grad_or_empty(teacher, needs_grad_teacher)


_register_autograd("align", n_tensors=2)


# ---------------------------------------------------- agkd::attention_map_fwd/bwd

@torch.library.register_fake("agkd::attention_map_fwd")
def _attention_map_fwd_fake(features, p, normalize, eps):
    n, _c, h, w = features.shape
    return (features.new_empty((n, 1, h, w)),
            features.new_empty((n,), dtype=_accumulate_dtype(features.dtype)))


@torch.library.register_fake("agkd::attention_map_bwd")
def _attention_map_bwd_fake(grad_map, features, amap, norm, p, normalize, eps):
    return features.new_empty(features.shape)


def _attention_map_setup_context(ctx, inputs, output):
    features, *params = inputs
    amap, norm = output
    ctx.save_for_backward(features, amap, norm)
    ctx.params = params
    ctx.mark_non_differentiable(norm)


def _attention_map_backward(ctx, grad_map, _grad_norm):
    features, amap, norm = ctx.saved_tensors
    grad = torch.ops.agkd.attention_map_bwd(grad_map.contiguous(), features, amap, norm, *ctx.params)
    return (grad,) + (None,) * len(ctx.params)


torch.library.register_autograd("agkd::attention_map_fwd", _attention_map_backward,
                                setup_context=_attention_map_setup_context)
_forbid_double_backward("attention_map")

