"""The public loss functions: validate the arguments, then run the native kernel
(``torch.ops.agkd.*``) or the reference in :mod:`agkd_ops.reference`, as the backend
decides (:mod:`agkd_ops._backend`).

Each function's path, by the name of its op (docs/design.md, section 1, has the table);
C++ files are under csrc/agkd, and each op's autograd is ``autograd/<op>_autograd.cpp``:

* ``ssim``, ``ssim_loss``, ``cosine_loss``, ``hybrid_loss`` -> ``agkd::hybrid_fwd/bwd``:
  ``hybrid.h``, ``cpu/hybrid_cpu.cpp``, ``cuda/hybrid_cuda.cu``, ``math/hybrid.h``;
* ``attention_align_loss`` -> ``agkd::align_fwd/bwd``: ``align.h``, ``cpu/align_cpu.cpp``,
  ``cuda/align_cuda.cu``;
* ``attention_map`` -> ``agkd::attention_map_fwd/bwd``: ``attention_map.h``,
  ``cpu/attention_map_cpu.cpp``, ``cuda/attention_map_cuda.cu``, ``math/attention.h``;
* ``kd_kl_div``, ``kd_loss`` -> ``agkd::kd_fwd``: ``kd.h``, ``cpu/kd_cpu.cpp``,
  ``cuda/kd_cuda.cu``, ``math/kd.h``;
* the logit-KD family — ``kd_kl_div``/``kd_loss`` with ``teacher_temperature``,
  ``standardize`` or a sequence / tensor temperature, ``dkd_loss``, ``ofa_loss``,
  ``dist_loss`` -> ``agkd::kd_family_fwd``, ``dkd_fwd``, ``ofa_fwd``, ``dist_fwd``
  (gradients computed in the forward): ``logit.h``, ``cpu/logit_cpu.cpp``,
  ``cuda/logit_cuda.cu``, ``math/logit.h``, ``autograd/logit_autograd.cpp``.

Every schema is in csrc/agkd/ops.cpp (its C++ signature in ops.h); fake kernels in :mod:`._registrations` (a section
per op); the reference of each function in :mod:`.reference` under the same name; the
module in :mod:`.losses`; defaults in :mod:`._defaults`. A native call is one
``torch.ops.agkd.<op>_fwd`` (reduction included) and, in the backward, one C++ node.

Shapes: maps are ``(N, C, H, W)``; ``reduction="none"`` gives ``(N,)``, ``"mean"`` (over
samples) and ``"sum"`` give a 0-dim tensor, always in the input's dtype. Inside an
autocast region the floating-point inputs are cast to float32 first (as autocast does for
torch's own losses), so bf16/fp16 activations meet float32 loss math and mixed input
dtypes are accepted there. NaN or Inf in a sample makes that sample's value (and its
gradient) non-finite and leaves the other samples untouched.

Every argument is checked before dispatch, with a message naming the function and the
argument. Under ``torch.compile(fullgraph=True)`` the same check runs while the graph is
traced, and dynamo reports the raised error as ``Unsupported: Observed exception`` with
our message quoted in its text (``raised exception ValueError('agkd_ops....')``): a graph
cannot hold a Python exception, so run the call once uncompiled to see it plain.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from . import _backend, reference
from ._defaults import (ATTENTION_P, COSINE_EPS, DIST, DIST_EPS, DKD, HYBRID_COSINE_WEIGHT, HYBRID_SSIM_WEIGHT,
                        KD_TEMPERATURE, KD_WEIGHT, MINMAX_EPS, NORMALIZE_EPS, OFA, SSIM, STANDARDIZE_EPS)
from ._defaults import accumulate_dtype as _accumulate_dtype
from ._defaults import reduce_per_sample as _reduce
from ._validation import (ATTENTION_P_RANGE, REDUCTIONS, check_choice, check_fraction, check_ignore_index,
                          check_ignore_index_type, check_in_range, check_kl_reduction, check_number, check_pair,
                          check_scale,
                          check_flag, check_logits, check_min_classes, check_optional_temperature,
                          check_ssim_options, check_target, check_target_range, check_temperature,
                          check_temperatures, check_tensor, check_window, renamed)

__all__ = ["ssim", "ssim_loss", "cosine_loss", "hybrid_loss", "attention_map",
           "attention_align_loss", "kd_kl_div", "kd_loss", "dkd_loss", "dist_loss", "ofa_loss"]


_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")  # meta tensors have no autocast state


def _float32_under_autocast(fn):
    """Inside an autocast region: the tensor arguments in float32 and the loss computed with
    autocast off (the reference's convolutions and reductions too), as autocast treats
    torch's own losses. Outside one: ``fn`` unchanged."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        first = args[0] if args else None
        if not (isinstance(first, torch.Tensor) and first.device.type in _AUTOCAST_DEVICES
                and torch.is_autocast_enabled(first.device.type)):
            return fn(*args, **kwargs)
        args = tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
        with torch.autocast(first.device.type, enabled=False):
            return fn(*args, **kwargs)

    return wrapper


def _in_dtype(loss: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A native op's loss (accumulate dtype) in the inputs' dtype; no node when they agree."""
    return loss if loss.dtype == dtype else loss.to(dtype)


def _native_hybrid(x, y, alpha, beta, window_size, sigma, c1, c2, padding, eps, reduction):
    """``alpha*(1-SSIM) + beta*(1-cos)`` from agkd::hybrid_fwd, reduced by the op (the
    accumulate dtype: per sample for ``"none"``)."""
    loss, _stats = torch.ops.agkd.hybrid_fwd(x, y, alpha=alpha, beta=beta, window_size=window_size, sigma=sigma,
                                             c1=c1, c2=c2, padding=padding, eps=eps, reduction=reduction)
    return loss


# The checks of each function's options, which need no tensor: the function runs them on
# every call and its module (losses.py) once, at construction, as torch's modules do.

def _ssim_options(fn, window_size, sigma, data_range, k1, k2, padding, reduction):
    """(window_size, sigma, c1, c2)"""
    options = check_ssim_options(fn, window_size, sigma, data_range, k1, k2, padding)
    check_choice(fn, "reduction", reduction, REDUCTIONS)
    return options


def _cosine_options(fn, eps, reduction) -> float:
    eps = check_number(fn, "eps", eps, positive=True)
    check_choice(fn, "reduction", reduction, REDUCTIONS)
    return eps


def _hybrid_options(fn, ssim_weight, cosine_weight, window_size, sigma, data_range, k1, k2, padding, eps,
                    reduction):
    """(ssim_weight, cosine_weight, window_size, sigma, c1, c2, eps)"""
    ssim_weight = check_number(fn, "ssim_weight", ssim_weight, nonnegative=True)
    cosine_weight = check_number(fn, "cosine_weight", cosine_weight, nonnegative=True)
    window_size, sigma, c1, c2 = _ssim_options(fn, window_size, sigma, data_range, k1, k2, padding, reduction)
    return ssim_weight, cosine_weight, window_size, sigma, c1, c2, check_number(fn, "eps", eps, positive=True)


def _kd_kl_div_options(fn, temperature, reduction, teacher_temperature=None, standardize=False):
    """(temperature, teacher_temperature, standardize)"""
    options = _kl_family_options(fn, temperature, teacher_temperature, standardize)
    check_kl_reduction(fn, reduction)
    return options


def _kd_loss_options(fn, temperature, kd_weight, label_smoothing, ignore_index, reduction,
                     teacher_temperature=None, standardize=False, logits=None):
    """(temperature, teacher_temperature, standardize, kd_weight, label_smoothing, ignore_index)"""
    family = _kl_family_options(fn, temperature, teacher_temperature, standardize, logits)
    kd_weight = check_fraction(fn, "kd_weight", kd_weight)
    label_smoothing = check_fraction(fn, "label_smoothing", label_smoothing)
    ignore_index = check_ignore_index_type(fn, ignore_index)
    check_choice(fn, "reduction", reduction, REDUCTIONS)
    return (*family, kd_weight, label_smoothing, ignore_index)


@_float32_under_autocast
def ssim(x: torch.Tensor, y: torch.Tensor, *, window_size: int = SSIM.window_size,
         sigma: float = SSIM.sigma, data_range: float = SSIM.data_range, k1: float = SSIM.k1,
         k2: float = SSIM.k2, padding: str = SSIM.padding, reduction: str = "mean"
) -> torch.Tensor:
    r"""Structural similarity with a Gaussian window (Wang et al. 2004).

    .. math::
        \mathrm{SSIM} = \frac{(2\mu_x\mu_y + C_1)(2\sigma_{xy} + C_2)}
                             {(\mu_x^2 + \mu_y^2 + C_1)(\sigma_x^2 + \sigma_y^2 + C_2)},
        \quad C_1 = (k_1 L)^2,\ C_2 = (k_2 L)^2

    with local moments from a separable, normalised Gaussian of ``window_size`` taps and
    standard deviation ``sigma`` (population variances), ``L = data_range``. A sample's
    value is the mean of its SSIM map over channels and pixels.

    Args:
        x, y: ``(N, C, H, W)`` maps of the same shape, dtype and device.
        window_size: odd number of taps. sigma: Gaussian standard deviation (> 0).
        data_range: the dynamic range ``L`` of the values (1 for [0, 1], 255 for uint8 scale).
        k1, k2: stabilising constants (> 0).
        padding: ``"valid"`` (map ``(H-w+1) x (W-w+1)``; equals pytorch-msssim and
            scikit-image), ``"reflect"`` (same size, torch reflect padding; equals kornia
            ``padding="same"`` with ``eps=0``) or ``"zeros"`` (same size, zero padding).
        reduction: ``"mean"`` over samples, ``"sum"``, or ``"none"`` for ``(N,)``.

    Example:
        >>> import torch, agkd_ops
        >>> x = torch.rand(4, 1, 32, 32)
        >>> agkd_ops.ssim(x, x).item()
        1.0
    """
    fn = "ssim"
    check_pair(fn, x, y)
    window_size, sigma, c1, c2 = _ssim_options(fn, window_size, sigma, data_range, k1, k2, padding, reduction)
    check_window(fn, x, window_size, padding)
    if _backend.use_native(fn, "hybrid_fwd", x):
        # SSIM itself, not a loss: 1 - loss per sample, then reduced (an op reduction would
        # round 1 - mean(loss) differently from mean(1 - loss)).
        per_sample = 1 - _native_hybrid(x, y, 1.0, 0.0, window_size, sigma, c1, c2, padding,
                                        COSINE_EPS, "none")
        return _reduce(per_sample, reduction, x.dtype)
    return reference.ssim(x, y, window_size=window_size, sigma=sigma, data_range=data_range,
                          k1=k1, k2=k2, padding=padding, reduction=reduction)


@_float32_under_autocast
def ssim_loss(x: torch.Tensor, y: torch.Tensor, *, window_size: int = SSIM.window_size,
              sigma: float = SSIM.sigma, data_range: float = SSIM.data_range, k1: float = SSIM.k1,
              k2: float = SSIM.k2, padding: str = SSIM.padding, reduction: str = "mean"
) -> torch.Tensor:
    """``1 - ssim(x, y, ...)`` per sample, then reduced. Same arguments as :func:`ssim`.

    Example:
        >>> import torch, agkd_ops
        >>> x = torch.rand(4, 1, 32, 32, requires_grad=True)
        >>> agkd_ops.ssim_loss(x, torch.rand(4, 1, 32, 32)).backward()
    """
    fn = "ssim_loss"
    check_pair(fn, x, y)
    window_size, sigma, c1, c2 = _ssim_options(fn, window_size, sigma, data_range, k1, k2, padding, reduction)
    check_window(fn, x, window_size, padding)
    if _backend.use_native(fn, "hybrid_fwd", x):
        return _in_dtype(_native_hybrid(x, y, 1.0, 0.0, window_size, sigma, c1, c2, padding,
                                        COSINE_EPS, reduction), x.dtype)
    return reference.ssim_loss(x, y, window_size=window_size, sigma=sigma, data_range=data_range,
                               k1=k1, k2=k2, padding=padding, reduction=reduction)


@_float32_under_autocast
def cosine_loss(x: torch.Tensor, y: torch.Tensor, *, eps: float = COSINE_EPS,
                reduction: str = "mean") -> torch.Tensor:
    r"""Per sample ``1 - cos(flatten(x), flatten(y))``, each norm clamped to ``eps``:

    .. math:: 1 - \frac{x \cdot y}{\max(\lVert x\rVert, \epsilon)\,\max(\lVert y\rVert, \epsilon)}

    equal to ``1 - F.cosine_similarity(x.flatten(1), y.flatten(1), dim=1, eps=eps)``.

    Args:
        x, y: tensors of the same shape ``(N, ...)`` (rank >= 2; all but the batch
            dimension are flattened, so ``(N, D)`` embeddings work).
        eps: norm floor (> 0). reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Example:
        >>> import torch, agkd_ops
        >>> x = torch.randn(2, 8)
        >>> same, opposite = agkd_ops.cosine_loss(x, 3 * x), agkd_ops.cosine_loss(x, -x)
        >>> round(abs(same.item()), 6), round(opposite.item(), 6)
        (0.0, 2.0)
    """
    fn = "cosine_loss"
    check_pair(fn, x, y, min_rank=2)
    eps = _cosine_options(fn, eps, reduction)
    if _backend.use_native(fn, "hybrid_fwd", x):
        # The cosine-only kernel reads the sample as one (1, 1, D) map; a view when possible.
        n = x.shape[0]
        x4, y4 = x.reshape(n, 1, 1, -1), y.reshape(n, 1, 1, -1)
        return _in_dtype(_native_hybrid(x4, y4, 0.0, 1.0, 1, 1.0, 1.0, 1.0, "valid", eps, reduction),
                         x.dtype)
    return reference.cosine_loss(x, y, eps=eps, reduction=reduction)


@_float32_under_autocast
def hybrid_loss(x: torch.Tensor, y: torch.Tensor, *, ssim_weight: float = HYBRID_SSIM_WEIGHT,
                cosine_weight: float = HYBRID_COSINE_WEIGHT, window_size: int = SSIM.window_size,
                sigma: float = SSIM.sigma, data_range: float = SSIM.data_range,
                k1: float = SSIM.k1, k2: float = SSIM.k2, padding: str = SSIM.padding,
                eps: float = COSINE_EPS, reduction: str = "mean", scale: Optional[str] = None,
                alpha: Optional[float] = None, beta: Optional[float] = None) -> torch.Tensor:
    r"""The AGKD hybrid attention loss, fused: per sample

    .. math:: w_s\,(1 - \mathrm{SSIM}(x, y)) + w_c\,(1 - \cos(x, y))

    computed in one pass over ``x`` and ``y`` (all five SSIM moments and the three cosine
    sums), with both gradients from one backward pass. A weight of 0 skips the
    unused half. SSIM arguments as in :func:`ssim`, ``eps`` as in :func:`cosine_loss`.

    Args:
        x, y: ``(N, C, H, W)`` maps, e.g. student and teacher attention maps.
        ssim_weight, cosine_weight: ``w_s`` and ``w_c`` (>= 0). ``alpha`` and ``beta`` are
            their old names, still accepted with a FutureWarning.
        scale: ``"minmax"`` scales every (sample, channel) map of both inputs to [0, 1]
            first (as :func:`minmax_scale` does, inside the fused kernels), the scale SSIM's
            ``data_range=1`` expects of attention maps; ``None`` (default) compares them as
            given.

    Example:
        >>> import torch, agkd_ops
        >>> student = torch.rand(8, 1, 28, 28, requires_grad=True)
        >>> teacher = torch.rand(8, 1, 28, 28)
        >>> loss = agkd_ops.hybrid_loss(student, teacher, ssim_weight=0.5, cosine_weight=0.5)
        >>> loss.backward()
        >>> student.grad.shape
        torch.Size([8, 1, 28, 28])
    """
    fn = "hybrid_loss"
    check_pair(fn, x, y)
    check_scale(fn, scale)
    ssim_weight = renamed(fn, "ssim_weight", ssim_weight, HYBRID_SSIM_WEIGHT, "alpha", alpha)
    cosine_weight = renamed(fn, "cosine_weight", cosine_weight, HYBRID_COSINE_WEIGHT, "beta", beta)
    ssim_weight, cosine_weight, window_size, sigma, c1, c2, eps = _hybrid_options(
        fn, ssim_weight, cosine_weight, window_size, sigma, data_range, k1, k2, padding, eps, reduction)
    check_window(fn, x, window_size, padding)
    if scale is not None and _backend.use_native(fn, "align_fwd", x):
        # The alignment kernels scale inside: at equal sizes their resampling is the identity.
        loss, _stats = torch.ops.agkd.align_fwd(x, y, alpha=ssim_weight, beta=cosine_weight, gamma=0.0,
                                                window_size=window_size, sigma=sigma, c1=c1, c2=c2, padding=padding,
                                                eps=eps, align_corners=False, reduction=reduction,
                                                minmax_eps=MINMAX_EPS)
        return _in_dtype(loss, x.dtype)
    if scale is None and _backend.use_native(fn, "hybrid_fwd", x):
        return _in_dtype(_native_hybrid(x, y, ssim_weight, cosine_weight, window_size, sigma, c1, c2, padding, eps,
                                        reduction), x.dtype)
    return reference.hybrid_loss(x, y, ssim_weight=ssim_weight, cosine_weight=cosine_weight, window_size=window_size,
                                 sigma=sigma, data_range=data_range, k1=k1, k2=k2,
                                 padding=padding, eps=eps, reduction=reduction, scale=scale)


_KD_NAMES = ("student_logits", "teacher_logits")


def _grad_needed(t: torch.Tensor) -> bool:
    return t.requires_grad and torch.is_grad_enabled()


def _temperature_tensor(temperature, like: torch.Tensor) -> torch.Tensor:
    """A checked temperature (float, tuple or tensor) as the (N, M) columns the native
    family ops read, in the accumulate dtype; a tensor stays differentiable."""
    acc = _accumulate_dtype(like.dtype)
    n = like.shape[0]
    if isinstance(temperature, torch.Tensor):
        return temperature.to(acc).reshape(-1, 1).expand(n, 1)
    values = (temperature,) if isinstance(temperature, float) else temperature
    return torch.tensor(values, dtype=acc, device=like.device).expand(n, len(values))


def _native_kl_family(student, teacher, temperature, teacher_temperature, standardize, reduction):
    """Σ_m τ_m²·KL per row from agkd::kd_family_fwd (loss only; the gradients it returns
    are its autograd's business)."""
    tau = _temperature_tensor(temperature, student)
    tau_t = None if teacher_temperature is None else _temperature_tensor(teacher_temperature, student).expand_as(tau)
    loss, *_grads = torch.ops.agkd.kd_family_fwd(
        student, teacher, tau, tau_t, standardize=standardize, standardize_eps=STANDARDIZE_EPS, reduction=reduction,
        needs_grad_student=_grad_needed(student), needs_grad_teacher=_grad_needed(teacher),
        needs_grad_temperature=_grad_needed(tau))
    return loss


def _is_plain_kd(temperature, teacher_temperature, standardize) -> bool:
    """Hinton's KD at one float temperature: the agkd::kd_fwd kernel serves it."""
    return isinstance(temperature, float) and teacher_temperature is None and not standardize


@_float32_under_autocast
def kd_kl_div(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
              temperature=KD_TEMPERATURE, teacher_temperature: Optional[float] = None,
              standardize: bool = False, reduction: str = "batchmean") -> torch.Tensor:
    r"""Temperature-scaled KL divergence of the student from the teacher (Hinton et al.):

    .. math:: \tau^2\,\mathrm{KL}\big(\mathrm{softmax}(\tilde t/\tau_t)\,\big\|\,
              \mathrm{softmax}(\tilde s/\tau)\big)
              = \tau^2 \sum_k p_{t,k} \log\frac{p_{t,k}}{p_{s,k}}

    per row, fused. ``τ²`` keeps the gradient scale independent of ``τ``. With the default
    options this is ``τ**2 * F.kl_div(F.log_softmax(s / τ, 1), F.log_softmax(t / τ, 1),
    log_target=True, reduction="batchmean")``: one pass over both logit rows gives the loss
    and, for the logits that require grad, their gradients, which the backward hands over.
    Stable for any logits (max-shifted exponents; logits of ±1e4 are fine; a teacher logit
    of ``-inf`` contributes 0).

    The logit-KD family's options (their gradients are computed in the same pass as the
    loss, so the backward only scales them):

    * ``teacher_temperature=τ_t``: the teacher's softmax at its own temperature (transformed
      teacher matching, Zheng & Yang 2024: the student at ``τ = 1``, the teacher at ``1/γ``).
    * ``standardize=True``: ``s̃, t̃`` are each row's z-score ``(z − mean) / (std + 1e-7)``
      (std with Bessel's correction; logit standardization, Sun et al. 2024, as their
      ``normalize``); otherwise ``s̃ = s``, ``t̃ = t``.
    * ``temperature=(τ_1, …, τ_M)``: the sum of the loss at each temperature (the instance
      term of multi-level logit distillation, Jin et al. 2023), from one read of the logits.
    * ``temperature=tensor``: 0-dim or ``(N,)``, which may require grad: the backward gives
      ``dL/dτ`` (CTKD's learnable temperature, Li et al. 2023). The ``τ²`` factor is the
      student's temperature, and with ``teacher_temperature=None`` the teacher shares it.

    Args:
        student_logits, teacher_logits: ``(N, K)`` logits of the same shape and dtype, or a
            float16/bfloat16 teacher with a float32 student (computed in float32). The
            teacher gets a gradient too if it requires one.
        temperature: ``τ`` in ``[1e-3, 1e3]``: a number, a sequence, or a tensor (above).
            A tensor's values are checked on the CPU; on CUDA a row with a bad value is NaN.
        teacher_temperature: ``τ_t`` in ``[1e-3, 1e3]``, or ``None`` for ``τ``.
        standardize: z-score each row of both logits first (needs ``K ≥ 2``).
        reduction: ``"batchmean"`` (sum over classes, mean over samples), ``"sum"`` or
            ``"none"`` for ``(N,)``. ``"mean"`` is rejected: in ``torch.nn.KLDivLoss`` it
            divides by ``N·K``, a known trap in KD code.

    Example:
        >>> import torch, agkd_ops
        >>> student = torch.randn(8, 10, requires_grad=True)
        >>> teacher = torch.randn(8, 10)
        >>> agkd_ops.kd_kl_div(student, teacher, temperature=4.0).backward()
        >>> student.grad.shape
        torch.Size([8, 10])
        >>> agkd_ops.kd_kl_div(student, teacher, temperature=(2.0, 3.0, 4.0), standardize=True).shape
        torch.Size([])
        >>> tau = torch.tensor(4.0, requires_grad=True)  # a learnable temperature
        >>> agkd_ops.kd_kl_div(student, teacher, temperature=tau).backward()
        >>> tau.grad.shape
        torch.Size([])
    """
    fn = "kd_kl_div"
    teacher_logits = check_logits(fn, student_logits, teacher_logits)
    temperature, teacher_temperature, standardize = _kl_family_options(
        fn, temperature, teacher_temperature, standardize, student_logits)
    check_kl_reduction(fn, reduction)
    op_reduction = "mean" if reduction == "batchmean" else reduction
    if _is_plain_kd(temperature, teacher_temperature, standardize):
        if _backend.use_native(fn, "kd_fwd", student_logits):
            loss, *_ = torch.ops.agkd.kd_fwd(student_logits, teacher_logits, None, temperature=temperature,
                                             ce_weight=0.0, kl_weight=1.0, label_smoothing=0.0,
                                             ignore_index=None, reduction=op_reduction,
                                             needs_grad_student=_grad_needed(student_logits),
                                             needs_grad_teacher=_grad_needed(teacher_logits))
            return _in_dtype(loss, student_logits.dtype)
    elif _backend.use_native(fn, "kd_family_fwd", student_logits):
        return _in_dtype(_native_kl_family(student_logits, teacher_logits, temperature, teacher_temperature,
                                           standardize, op_reduction), student_logits.dtype)
    return reference.kd_kl_div(student_logits, teacher_logits, temperature=temperature,
                               teacher_temperature=teacher_temperature, standardize=standardize,
                               reduction=reduction)


@_float32_under_autocast
def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, *,
            temperature=KD_TEMPERATURE, kd_weight: float = KD_WEIGHT,
            label_smoothing: float = 0.0, ignore_index: Optional[int] = None,
            teacher_temperature: Optional[float] = None, standardize: bool = False,
            reduction: str = "mean", alpha: Optional[float] = None) -> torch.Tensor:
    r"""Hinton's knowledge-distillation loss, fused: per row

    .. math:: (1 - w)\,\mathrm{CE}(s, y) + w\,\tau^2\,
              \mathrm{KL}\big(\mathrm{softmax}(\tilde t/\tau_t)\,\big\|\,\mathrm{softmax}(\tilde s/\tau)\big)

    with the cross-entropy at temperature 1 on the raw student logits, exactly as
    ``F.cross_entropy(s, y, label_smoothing=ε)`` defines it: ``CE = -Σ_k q'_k log
    softmax(s)_k`` with the smoothed target ``q' = (1 - ε)·q + ε/K``, where ``q`` is the
    one-hot row of a class index or a given probability row (mixup / cutmix targets; used
    as given, as torch does). The KL term is :func:`kd_kl_div`'s, with the same
    ``temperature``, ``teacher_temperature`` and ``standardize`` options. With the default
    options the loss comes from one pass over the logits and both gradients from one
    backward pass, keeping seven numbers per row; with a family option it is the fused
    cross-entropy plus the fused family KL (two passes over the student).

    ``ignore_index=i``: rows whose class target is ``i`` contribute nothing to either
    term, get a zero gradient, and are left out of the ``"mean"`` denominator (as in
    ``F.cross_entropy``); with ``"none"`` their entry is 0. A batch with every row ignored
    has loss 0 and zero gradients under ``"mean"``, where ``F.cross_entropy`` gives NaN
    (0/0): a NaN there would turn every weight into NaN at the next optimiser step, and
    there is nothing in such a batch to learn from.

    Args:
        student_logits, teacher_logits: ``(N, K)`` logits of the same shape and dtype, or a
            float16/bfloat16 teacher with a float32 student.
        target: ``(N,)`` class indices (int64 or int32) in ``[0, K)``. An out-of-range
            value (``-100`` included: there is no ``ignore_index``) is a ``ValueError`` on
            the CPU and with the reference; the CUDA kernels, which never sync the device to
            look, give that row a NaN loss instead (never an out-of-bounds read). Or
            ``(N, K)`` probabilities in the logits' dtype; a negative entry is a
            ``ValueError`` on the CPU and a NaN row on CUDA.
        temperature: ``τ``: a number in ``[1e-3, 1e3]``, a sequence or a tensor, as in
            :func:`kd_kl_div`.
        kd_weight: ``w``, the weight of the KL term, in ``[0, 1]`` (the cross-entropy gets
            ``1 - w``). ``alpha`` is its old name, still accepted with a FutureWarning.
        label_smoothing: ``ε`` in ``[0, 1]``, applied to the cross-entropy's target.
        ignore_index: a class index whose rows are skipped, or ``None`` (every row counts;
            class-index targets only).
        teacher_temperature, standardize: as in :func:`kd_kl_div`.
        reduction: ``"mean"`` over samples, ``"sum"`` or ``"none"`` for ``(N,)``.

    Example:
        >>> import torch, agkd_ops
        >>> student = torch.randn(8, 10, requires_grad=True)
        >>> loss = agkd_ops.kd_loss(student, torch.randn(8, 10), torch.randint(0, 10, (8,)),
        ...                         label_smoothing=0.1)
        >>> loss.backward()
        >>> mixed = torch.softmax(torch.randn(8, 10), 1)  # e.g. mixup's targets
        >>> agkd_ops.kd_loss(student, torch.randn(8, 10), mixed).shape
        torch.Size([])
    """
    fn = "kd_loss"
    teacher_logits = check_logits(fn, student_logits, teacher_logits)
    target = check_target(fn, target, student_logits)
    kd_weight = renamed(fn, "kd_weight", kd_weight, KD_WEIGHT, "alpha", alpha)
    temperature, teacher_temperature, standardize, kd_weight, label_smoothing, ignore_index = _kd_loss_options(
        fn, temperature, kd_weight, label_smoothing, ignore_index, reduction, teacher_temperature, standardize,
        student_logits)
    check_ignore_index(fn, ignore_index, target)
    if _is_plain_kd(temperature, teacher_temperature, standardize):
        if _backend.use_native(fn, "kd_fwd", student_logits):
            # Target values are checked by the kernels, with no device-to-host sync: a
            # ValueError before any logit is read on the CPU, a NaN loss for that row on CUDA.
            loss, *_ = torch.ops.agkd.kd_fwd(student_logits, teacher_logits, target, temperature=temperature,
                                             ce_weight=1.0 - kd_weight, kl_weight=kd_weight,
                                             label_smoothing=label_smoothing, ignore_index=ignore_index,
                                             reduction=reduction, needs_grad_student=_grad_needed(student_logits),
                                             needs_grad_teacher=_grad_needed(teacher_logits))
            return _in_dtype(loss, student_logits.dtype)
    elif _backend.use_native(fn, "kd_family_fwd", student_logits) and _backend.use_native(
            fn, "kd_fwd", student_logits):
        return _in_dtype(_native_kd_family_loss(student_logits, teacher_logits, target, temperature, kd_weight,
                                                label_smoothing, ignore_index, teacher_temperature, standardize,
                                                reduction), student_logits.dtype)
    check_target_range(fn, target, student_logits.shape[1], ignore_index)
    return reference.kd_loss(student_logits, teacher_logits, target, temperature=temperature,
                             kd_weight=kd_weight, label_smoothing=label_smoothing,
                             ignore_index=ignore_index, teacher_temperature=teacher_temperature,
                             standardize=standardize, reduction=reduction)


def _native_kd_family_loss(student, teacher, target, temperature, kd_weight, label_smoothing, ignore_index,
                           teacher_temperature, standardize, reduction):
    """kd_loss with a family option: agkd::kd_fwd's cross-entropy (its target rules, the
    smoothing and ignore_index) plus agkd::kd_family_fwd's KL, per row, then reduced."""
    if kd_weight < 1.0:
        # The cross-entropy alone does not depend on the teacher: it gets no gradient here.
        ce, *_ = torch.ops.agkd.kd_fwd(student, teacher.detach(), target, temperature=1.0, ce_weight=1.0 - kd_weight,
                                       kl_weight=0.0, label_smoothing=label_smoothing,
                                       ignore_index=ignore_index, reduction="none",
                                       needs_grad_student=_grad_needed(student), needs_grad_teacher=False)
    else:  # no cross-entropy to compute, but a bad target is still an error
        check_target_range("kd_loss", target, student.shape[1], ignore_index)
        ce = None
    kl = kd_weight * _native_kl_family(student, teacher, temperature, teacher_temperature, standardize, "none")
    per_sample = kl if ce is None else ce + kl
    if ignore_index is None:
        return _reduce(per_sample, reduction, per_sample.dtype)
    counts = target != ignore_index
    per_sample = torch.where(counts, per_sample, 0.0)
    if reduction == "mean":
        return per_sample.sum() / counts.sum().clamp_min(1)
    return _reduce(per_sample, reduction, per_sample.dtype)


def _kl_family_options(fn, temperature, teacher_temperature, standardize, logits=None):
    """(temperature, teacher_temperature, standardize) of the logit-KD family, checked. A
    temperature tensor is checked against the logits when they are given (a module checks
    it at each call)."""
    if isinstance(temperature, torch.Tensor) and logits is None:
        if not temperature.is_floating_point():
            raise TypeError(f"agkd_ops.{fn}: temperature must be a floating tensor, got {temperature.dtype}")
    else:
        temperature = check_temperatures(fn, temperature, logits)
    teacher_temperature = check_optional_temperature(fn, "teacher_temperature", teacher_temperature)
    standardize = check_flag(fn, "standardize", standardize)
    if standardize and logits is not None:
        check_min_classes(fn, logits, 2, "standardize=True takes each row's std with Bessel's correction")
    return temperature, teacher_temperature, standardize


def _class_target(fn, target, logits):
    """Class indices (N,) as int64: the targets of dkd_loss and ofa_loss."""
    target = check_target(fn, target, logits)
    if target.is_floating_point():
        raise TypeError(f"agkd_ops.{fn}: target must hold integer class indices (int64 or int32); "
                        f"probability targets are for kd_loss only, got {target.dtype}")
    return target


def _dkd_options(fn, tckd_weight, nckd_weight, temperature, reduction):
    """(tckd_weight, nckd_weight, temperature)"""
    tckd_weight = check_number(fn, "tckd_weight", tckd_weight, nonnegative=True)
    nckd_weight = check_number(fn, "nckd_weight", nckd_weight, nonnegative=True)
    temperature = check_temperature(fn, "temperature", temperature)
    check_choice(fn, "reduction", reduction, REDUCTIONS)
    return tckd_weight, nckd_weight, temperature


def _dist_options(fn, inter_weight, intra_weight, temperature):
    """(inter_weight, intra_weight, temperature)"""
    return (check_number(fn, "inter_weight", inter_weight, nonnegative=True),
            check_number(fn, "intra_weight", intra_weight, nonnegative=True),
            check_temperature(fn, "temperature", temperature))


# OFA raises probabilities to the power eps: beyond this range (p + m)^eps under- or
# overflows float32 for ordinary probabilities.
OFA_EPS_RANGE = (1e-3, 16.0)


def _ofa_options(fn, eps, temperature, reduction):
    """(eps, temperature)"""
    eps = check_in_range(fn, "eps", eps, OFA_EPS_RANGE, "the teacher's probabilities are raised to this power")
    temperature = check_temperature(fn, "temperature", temperature)
    check_choice(fn, "reduction", reduction, REDUCTIONS)
    return eps, temperature


@_float32_under_autocast
def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, *,
             tckd_weight: float = DKD.tckd_weight, nckd_weight: float = DKD.nckd_weight,
             temperature: float = DKD.temperature, reduction: str = "mean") -> torch.Tensor:
    r"""Decoupled knowledge distillation (Zhao et al., CVPR 2022), fused: per row

    .. math:: \tau^2\big(\alpha\,\mathrm{KL}(b_t \,\|\, b_s) + \beta\,\mathrm{KL}(q_t \,\|\, q_s)\big)

    with ``p = softmax(z/τ)``, the binary target / non-target split ``b = [p_y, 1 − p_y]``
    (TCKD) and ``q`` the softmax over the classes other than ``y`` (NCKD), ``α =
    tckd_weight``, ``β = nckd_weight``. As mdistiller's ``DKD.py`` computes it, except that
    the target class is excluded from ``q`` exactly (mdistiller subtracts 1000 from its
    logit) and ``log(1 − p_y)`` is a log-sum-exp over the other classes, so no probability
    underflows to ``log 0``. With ``K = 2`` the NCKD term is 0. mdistiller's DKD adds the
    cross-entropy separately (and warms the KD term up over its first epochs).

    One pass over both logit rows gives the loss and both gradients; the backward only
    scales them.

    Args:
        student_logits, teacher_logits: ``(N, K)`` logits, ``K ≥ 2``, of the same shape and
            dtype, or a float16/bfloat16 teacher with a float32 student.
        target: ``(N,)`` class indices (int64 or int32) in ``[0, K)`` (a ``ValueError``
            otherwise, whatever the weights).
        tckd_weight, nckd_weight: ``α, β ≥ 0`` (mdistiller's CIFAR-100 values: 1 and 8).
        temperature: ``τ`` in ``[1e-3, 1e3]``.
        reduction: ``"mean"`` over samples, ``"sum"`` or ``"none"`` for ``(N,)``.

    Example:
        >>> import torch, agkd_ops
        >>> student = torch.randn(8, 100, requires_grad=True)
        >>> loss = agkd_ops.dkd_loss(student, torch.randn(8, 100), torch.randint(0, 100, (8,)))
        >>> loss.backward()
        >>> loss.shape
        torch.Size([])
    """
    fn = "dkd_loss"
    teacher_logits = check_logits(fn, student_logits, teacher_logits)
    target = _class_target(fn, target, student_logits)
    tckd_weight, nckd_weight, temperature = _dkd_options(fn, tckd_weight, nckd_weight, temperature, reduction)
    check_min_classes(fn, student_logits, 2, "the target / non-target split needs a non-target class")
    if _backend.use_native(fn, "dkd_fwd", student_logits):
        loss, *_grads = torch.ops.agkd.dkd_fwd(student_logits, teacher_logits, target, temperature=temperature,
                                               tckd_weight=tckd_weight, nckd_weight=nckd_weight, reduction=reduction,
                                               needs_grad_student=_grad_needed(student_logits),
                                               needs_grad_teacher=_grad_needed(teacher_logits))
        return _in_dtype(loss, student_logits.dtype)
    check_target_range(fn, target, student_logits.shape[1])
    return reference.dkd_loss(student_logits, teacher_logits, target, tckd_weight=tckd_weight,
                              nckd_weight=nckd_weight, temperature=temperature, reduction=reduction)


@_float32_under_autocast
def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
              inter_weight: float = DIST.inter_weight, intra_weight: float = DIST.intra_weight,
              temperature: float = DIST.temperature) -> torch.Tensor:
    r"""DIST, distillation from a stronger teacher (Huang et al., NeurIPS 2022), fused:

    .. math:: \tau^2\Big(\beta\big(1 - \tfrac1N\textstyle\sum_i \rho(p_s[i,:], p_t[i,:])\big)
              + \gamma\big(1 - \tfrac1K\textstyle\sum_j \rho(p_s[:,j], p_t[:,j])\big)\Big)

    with ``p = softmax(z/τ)`` per row and ``ρ(a, b) = Σ(a−ā)(b−b̄) / (‖a−ā‖·‖b−b̄‖ + 1e-8)``
    the Pearson correlation, over each row (inter-class relation) and each class column of
    the batch (intra-class relation), ``β = inter_weight``, ``γ = intra_weight``; as the
    DIST authors' ``DIST`` module computes it. The intra term couples the rows, so the
    result is one 0-dim tensor (no ``reduction``).

    One pass over the rows, one over the class columns and one more over the rows give the
    loss and both gradients; the backward only scales them.

    Args:
        student_logits, teacher_logits: ``(N, K)`` logits of the same shape and dtype, or a
            float16/bfloat16 teacher with a float32 student.
        inter_weight, intra_weight: ``β, γ ≥ 0``.
        temperature: ``τ`` in ``[1e-3, 1e3]``.

    Example:
        >>> import torch, agkd_ops
        >>> student = torch.randn(8, 100, requires_grad=True)
        >>> loss = agkd_ops.dist_loss(student, torch.randn(8, 100))
        >>> loss.backward()
        >>> loss.shape
        torch.Size([])
    """
    fn = "dist_loss"
    teacher_logits = check_logits(fn, student_logits, teacher_logits)
    inter_weight, intra_weight, temperature = _dist_options(fn, inter_weight, intra_weight, temperature)
    if _backend.use_native(fn, "dist_fwd", student_logits):
        loss, *_grads = torch.ops.agkd.dist_fwd(student_logits, teacher_logits, temperature=temperature,
                                                inter_weight=inter_weight, intra_weight=intra_weight, eps=DIST_EPS,
                                                needs_grad_student=_grad_needed(student_logits),
                                                needs_grad_teacher=_grad_needed(teacher_logits))
        return _in_dtype(loss, student_logits.dtype)
    return reference.dist_loss(student_logits, teacher_logits, inter_weight=inter_weight,
                               intra_weight=intra_weight, temperature=temperature)


@_float32_under_autocast
def ofa_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, *,
             eps: float = OFA.eps, temperature: float = OFA.temperature, reduction: str = "mean"
) -> torch.Tensor:
    r"""The OFA loss for heterogeneous architectures (Hao et al., NeurIPS 2023), fused: per row

    .. math:: -\sum_k \big((p_{t,k} + m_k)^{\varepsilon} - m_k\big)\,\log p_{s,k}

    with ``p = softmax(z/τ)`` and ``m`` the one-hot target: a cross-entropy with the
    teacher's soft targets in which the target class is raised by the exponent ``ε``
    (``ε = 1``: the soft target plus the one-hot; ``ε > 1`` weights the target class more
    where the teacher is confident). As the OFA authors' ``ofa_loss`` computes it, with
    ``log_softmax`` for ``log p_s``; no ``τ²`` factor.

    One pass over both logit rows gives the loss and both gradients; the backward only
    scales them.

    Args:
        student_logits, teacher_logits: ``(N, K)`` logits of the same shape and dtype, or a
            float16/bfloat16 teacher with a float32 student.
        target: ``(N,)`` class indices (int64 or int32) in ``[0, K)``.
        eps: ``ε`` in ``[1e-3, 16]``.
        temperature: ``τ`` in ``[1e-3, 1e3]``.
        reduction: ``"mean"`` over samples, ``"sum"`` or ``"none"`` for ``(N,)``.

    Example:
        >>> import torch, agkd_ops
        >>> student = torch.randn(8, 100, requires_grad=True)
        >>> loss = agkd_ops.ofa_loss(student, torch.randn(8, 100), torch.randint(0, 100, (8,)), eps=1.5)
        >>> loss.backward()
        >>> loss.shape
        torch.Size([])
    """
    fn = "ofa_loss"
    teacher_logits = check_logits(fn, student_logits, teacher_logits)
    target = _class_target(fn, target, student_logits)
    eps, temperature = _ofa_options(fn, eps, temperature, reduction)
    if _backend.use_native(fn, "ofa_fwd", student_logits):
        loss, *_grads = torch.ops.agkd.ofa_fwd(student_logits, teacher_logits, target, temperature=temperature,
                                               eps=eps, reduction=reduction,
                                               needs_grad_student=_grad_needed(student_logits),
                                               needs_grad_teacher=_grad_needed(teacher_logits))
        return _in_dtype(loss, student_logits.dtype)
    check_target_range(fn, target, student_logits.shape[1])
    return reference.ofa_loss(student_logits, teacher_logits, target, eps=eps, temperature=temperature,
                              reduction=reduction)



@_float32_under_autocast
def attention_map(features: torch.Tensor, *, p: float = ATTENTION_P, normalize: bool = True
) -> torch.Tensor:
    r"""Attention-transfer map of a feature tensor (Zagoruyko & Komodakis):

    .. math:: A = \frac{1}{C}\sum_c |F_c|^p, \qquad A \leftarrow \frac{A}{\max(\lVert A\rVert_2, 10^{-12})}

    per sample, from one pass over the features (backward: one more). Equal to
    ``F.normalize(features.abs().pow(p).mean(1).flatten(1), dim=1)`` reshaped to
    ``(N, 1, H, W)``. ``|F|`` rather than ``F``, so odd ``p`` is right; the gradient of
    ``|F|^p`` at ``F = 0`` is taken as 0 for every ``p``.

    Args:
        features: ``(N, C, H, W)`` feature maps, any strides.
        p: exponent (> 0). normalize: L2-normalise each sample's ``H·W`` map.

    Returns:
        ``(N, 1, H, W)`` in the features' dtype.

    Example:
        >>> import torch, agkd_ops
        >>> amap = agkd_ops.attention_map(torch.randn(2, 320, 7, 7))
        >>> amap.shape, round(amap[0].norm().item(), 4)
        (torch.Size([2, 1, 7, 7]), 1.0)
    """
    fn = "attention_map"
    check_tensor(fn, "features", features)
    p = check_in_range(fn, "p", p, ATTENTION_P_RANGE, "beyond that range |F|^p overflows or vanishes in float32")
    if not isinstance(normalize, bool):
        raise TypeError(f"agkd_ops.{fn}: normalize must be a bool, got {type(normalize).__name__}")
    if _backend.use_native(fn, "attention_map_fwd", features):
        amap, _norm = torch.ops.agkd.attention_map_fwd(features, p=p, normalize=normalize, eps=NORMALIZE_EPS)
        return amap
    return reference.attention_map(features, p=p, normalize=normalize, eps=NORMALIZE_EPS)


ALIGN_LOSSES = ("mse", "cosine", "ssim", "hybrid")
# The keyword arguments each comparison takes, with their defaults: those of cosine_loss,
# ssim_loss and hybrid_loss.
_ALIGN_DEFAULTS = {
    "mse": {},
    "cosine": dict(eps=COSINE_EPS),
    "ssim": SSIM._asdict(),
    "hybrid": dict(ssim_weight=HYBRID_SSIM_WEIGHT, cosine_weight=HYBRID_COSINE_WEIGHT, **SSIM._asdict(),
                   eps=COSINE_EPS),
}


def _renamed_align_kwargs(fn, loss, loss_kwargs, stacklevel=4):
    """``loss_kwargs`` with the hybrid loss's old weight names (``alpha``, ``beta``) given
    their new ones, with a FutureWarning."""
    if loss != "hybrid" or not ({"alpha", "beta"} & set(loss_kwargs)):
        return loss_kwargs
    kwargs = dict(loss_kwargs)
    for old, new in (("alpha", "ssim_weight"), ("beta", "cosine_weight")):
        if old in kwargs:
            default = _ALIGN_DEFAULTS["hybrid"][new]
            kwargs[new] = renamed(fn, new, kwargs.get(new, default), default, old, kwargs.pop(old), stacklevel)
    return kwargs


def _align_options(fn, loss, align_corners, reduction, loss_kwargs):
    """The fused kernel's (alpha, beta, gamma, window_size, sigma, c1, c2, padding, eps):
    alpha, beta and gamma weigh 1 - SSIM, 1 - cos and MSE. ``loss_kwargs`` carry the new
    names (:func:`_renamed_align_kwargs` first)."""
    check_choice(fn, "loss", loss, ALIGN_LOSSES)
    accepted = _ALIGN_DEFAULTS[loss]
    unknown = sorted(set(loss_kwargs) - set(accepted))
    if unknown:
        takes = ", ".join(accepted) if accepted else "no keyword arguments"
        raise TypeError(f"agkd_ops.{fn}: loss={loss!r} got unexpected keyword argument(s) "
                        f"{', '.join(unknown)}; it takes {takes}")
    if not isinstance(align_corners, bool):
        raise TypeError(f"agkd_ops.{fn}: align_corners must be a bool, got {type(align_corners).__name__}")
    check_choice(fn, "reduction", reduction, REDUCTIONS)
    kw = {**accepted, **loss_kwargs}
    if loss == "hybrid":
        alpha = check_number(fn, "ssim_weight", kw["ssim_weight"], nonnegative=True)
        beta = check_number(fn, "cosine_weight", kw["cosine_weight"], nonnegative=True)
    else:
        alpha, beta = float(loss == "ssim"), float(loss == "cosine")
    gamma = float(loss == "mse")
    window_size, sigma, c1, c2, padding = 1, 1.0, 1.0, 1.0, "valid"  # unused without SSIM
    if loss in ("ssim", "hybrid"):
        padding = kw["padding"]
        window_size, sigma, c1, c2 = check_ssim_options(fn, kw["window_size"], kw["sigma"], kw["data_range"],
                                                        kw["k1"], kw["k2"], padding)
    eps = check_number(fn, "eps", kw["eps"], positive=True) if "eps" in kw else COSINE_EPS
    return alpha, beta, gamma, window_size, sigma, c1, c2, padding, eps


def minmax_scale(maps: torch.Tensor) -> torch.Tensor:
    r"""Every (sample, channel) map scaled to [0, 1], fused:

    .. math:: \frac{m - \min m}{\max m - \min m}

    per map ``m`` of ``maps``, and 0 for a map whose range is at most 1e-12 (a constant
    map: a dead stage, a blank image), whose gradient is then 0 as well. At a tie, the
    gradient of the minimum and maximum is shared evenly, as ``torch.amin``/``amax`` share
    it; a NaN makes its map NaN and leaves the others as they are. ``hybrid_loss`` and
    ``attention_align_loss`` take ``scale="minmax"`` to apply it to both their inputs.

    Args:
        maps: ``(N, C, H, W)``, any strides, float32/float64/bfloat16/float16.

    Returns:
        ``(N, C, H, W)`` in ``maps``' dtype.

    Example:
        >>> import torch, agkd_ops
        >>> maps = agkd_ops.attention_map(torch.randn(2, 8, 7, 7))
        >>> scaled = agkd_ops.minmax_scale(maps)
        >>> float(scaled.amin()), float(scaled.amax())
        (0.0, 1.0)
    """
    fn = "minmax_scale"
    check_tensor(fn, "maps", maps)
    if _backend.use_native(fn, "minmax_scale_fwd", maps):
        scaled, _range = torch.ops.agkd.minmax_scale_fwd(maps, eps=MINMAX_EPS)
        return scaled
    return reference.minmax_scale(maps, eps=MINMAX_EPS)


@_float32_under_autocast
def attention_align_loss(student: torch.Tensor, teacher: torch.Tensor, *, loss: str = "mse",
                         align_corners: bool = False, reduction: str = "mean", scale: Optional[str] = None,
                         **loss_kwargs) -> torch.Tensor:
    r"""Compare a student attention map with the teacher's after resizing the student
    bilinearly to the teacher's size, fused: the resized map is sampled on the fly and
    never stored, and the backward gathers its gradient back onto the student's pixels.

    Per sample, with :math:`\tilde s` = ``F.interpolate(student, size=teacher's (H, W),
    mode="bilinear", align_corners=align_corners)`` (identical numbers):

    * ``"mse"``: mean over ``C·H·W`` of :math:`(\tilde s - t)^2`;
    * ``"cosine"``: :math:`1 - \cos(\tilde s, t)` (keyword ``eps``);
    * ``"ssim"``: :math:`1 - \mathrm{SSIM}(\tilde s, t)` (keywords of :func:`ssim`, window
      rules at the teacher's size);
    * ``"hybrid"``: :math:`w_s(1 - \mathrm{SSIM}) + w_c(1 - \cos)` (keywords of
      :func:`hybrid_loss`: ``ssim_weight``, ``cosine_weight``, the SSIM ones and ``eps``).

    Up-sampling, down-sampling, non-integer ratios and equal sizes all work. Gradients flow
    to both maps when they require them.

    Args:
        student: ``(N, C, h, w)`` map. teacher: ``(N, C, H, W)`` map, same ``N`` and ``C``.
        loss: ``"mse"``, ``"cosine"``, ``"ssim"`` or ``"hybrid"``.
        align_corners: as in ``F.interpolate``.
        reduction: ``"mean"`` over samples, ``"sum"`` or ``"none"`` for ``(N,)``.
        scale: ``"minmax"`` scales every (sample, channel) map of both to [0, 1] first
            (:func:`minmax_scale`; the student's at its own size, before resizing), as
            SSIM's ``data_range=1`` expects of attention maps; ``None`` (default): as given.
        **loss_kwargs: the chosen loss's own keyword arguments; any other is a ``TypeError``.

    Example:
        >>> import torch, agkd_ops
        >>> student = torch.rand(8, 1, 28, 28, requires_grad=True)
        >>> teacher = torch.rand(8, 1, 56, 56)
        >>> agkd_ops.attention_align_loss(student, teacher, loss="hybrid", padding="reflect").backward()
        >>> student.grad.shape
        torch.Size([8, 1, 28, 28])
        >>> maps = agkd_ops.attention_map(torch.randn(8, 40, 14, 14))  # unit L2 norm: far below 1
        >>> agkd_ops.attention_align_loss(maps, teacher, loss="hybrid", scale="minmax").shape
        torch.Size([])
    """
    fn = "attention_align_loss"
    check_pair(fn, student, teacher, names=("student", "teacher"), same_shape=False)
    check_scale(fn, scale)
    if student.shape[:2] != teacher.shape[:2]:
        raise ValueError(
            f"agkd_ops.{fn}: student and teacher must have the same batch size and channels, got "
            f"student ({', '.join(map(str, student.shape))}) and teacher "
            f"({', '.join(map(str, teacher.shape))})"
        )
    loss_kwargs = _renamed_align_kwargs(fn, loss, loss_kwargs, stacklevel=5)
    alpha, beta, gamma, window_size, sigma, c1, c2, padding, eps = _align_options(
        fn, loss, align_corners, reduction, loss_kwargs)
    if loss in ("ssim", "hybrid"):
        check_window(fn, teacher, window_size, padding, names=("teacher",))
    if _backend.use_native(fn, "align_fwd", student):
        loss, _stats = torch.ops.agkd.align_fwd(student, teacher, alpha=alpha, beta=beta, gamma=gamma,
                                                window_size=window_size, sigma=sigma, c1=c1, c2=c2, padding=padding,
                                                eps=eps, align_corners=align_corners, reduction=reduction,
                                                minmax_eps=None if scale is None else MINMAX_EPS)
        return _in_dtype(loss, student.dtype)
    return reference.attention_align_loss(student, teacher, loss=loss, align_corners=align_corners,
                                          reduction=reduction, scale=scale, **loss_kwargs)

