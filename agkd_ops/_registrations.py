"""Fake (meta) kernels and autograd for the native ops, so that they work under
``torch.compile(fullgraph=True)`` and ``loss.backward()``. Imported by ``agkd_ops`` only
when the compiled library loaded."""
from __future__ import annotations

import torch


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- agkd::hybrid_fwd/bwd

@torch.library.register_fake("agkd::hybrid_fwd")
def _hybrid_fwd_fake(x, y, alpha, beta, window_size, sigma, c1, c2, padding, eps):
    acc = _accumulate_dtype(x.dtype)
    n = x.shape[0]
    return x.new_empty((n,), dtype=acc), x.new_empty((n, 3), dtype=acc)


@torch.library.register_fake("agkd::hybrid_bwd")
def _hybrid_bwd_fake(grad_loss, x, y, stats, alpha, beta, window_size, sigma, c1, c2, padding,
                     eps, needs_grad_x, needs_grad_y):
    def grad(needed):
        return x.new_empty(x.shape) if needed else x.new_empty((0,))

    return grad(needs_grad_x), grad(needs_grad_y)


def _hybrid_setup_context(ctx, inputs, output):
    x, y, *params = inputs
    _loss, stats = output
    ctx.save_for_backward(x, y, stats)
    ctx.params = params
    ctx.mark_non_differentiable(stats)


def _hybrid_backward(ctx, grad_loss, _grad_stats):
    x, y, stats = ctx.saved_tensors
    needs_x, needs_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_x, grad_y = torch.ops.agkd.hybrid_bwd(
        grad_loss.contiguous(), x, y, stats, *ctx.params, needs_x, needs_y
    )
    return (grad_x if needs_x else None, grad_y if needs_y else None) + (None,) * len(ctx.params)


torch.library.register_autograd(
    "agkd::hybrid_fwd", _hybrid_backward, setup_context=_hybrid_setup_context
)


def _no_double_backward(ctx, *grads):
    raise NotImplementedError(
        "agkd_ops: double backward (a gradient of a gradient) of the SSIM/cosine/hybrid "
        "losses is not implemented; use agkd_ops.set_backend('reference') for it"
    )


def _bwd_setup_context(ctx, inputs, output):
    pass


torch.library.register_autograd(
    "agkd::hybrid_bwd", _no_double_backward, setup_context=_bwd_setup_context
)
