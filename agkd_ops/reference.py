"""Pure-PyTorch reference implementations: the fallback backend and the test oracle.

Written plainly from the definitions (docs/design.md, section 3), with PyTorch ops only,
so they run on any device and dtype, differentiate through autograd, and need no compiled
code. Inputs are assumed valid: :mod:`agkd_ops.functional` validates before calling them.
Half and bfloat16 inputs are computed in float32 and the result is cast back.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._defaults import (MINMAX_EPS, ATTENTION_P, COSINE_EPS, DIST, DIST_EPS, DKD, HYBRID_COSINE_WEIGHT, HYBRID_SSIM_WEIGHT,
                        KD_TEMPERATURE, KD_WEIGHT, NORMALIZE_EPS, OFA, SSIM, STANDARDIZE_EPS, accumulate_dtype)
from ._defaults import reduce_per_sample as _reduce
from ._validation import TEMPERATURE_RANGE, renamed

__all__ = ["ssim", "ssim_loss", "cosine_loss", "hybrid_loss", "attention_map",
           "attention_align_loss", "kd_kl_div", "kd_loss", "dkd_loss", "dist_loss", "ofa_loss",
           "standardize_logits", "gaussian_window"]


def gaussian_window(window_size: int, sigma: float, dtype=torch.float64, device=None
) -> torch.Tensor:
    """Normalised 1-D Gaussian of odd length ``window_size`` centred on its middle tap."""
    coords = torch.arange(window_size, dtype=torch.float64) - (window_size // 2)
    taps = torch.exp(-(coords**2) / (2.0 * float(sigma) ** 2))
    return (taps / taps.sum()).to(dtype=dtype, device=device)


def _blur(t: torch.Tensor, taps: torch.Tensor, padding: str) -> torch.Tensor:
    """Separable Gaussian blur of every (N, C) plane with the contract's padding."""
    n, c, h, w = t.shape
    k = taps.numel()
    planes = t.reshape(n * c, 1, h, w)
    if padding != "valid":
        p = k // 2
        mode = "reflect" if padding == "reflect" else "constant"
        planes = F.pad(planes, (p, p, p, p), mode=mode)
    planes = F.conv2d(planes, taps.view(1, 1, k, 1))
    planes = F.conv2d(planes, taps.view(1, 1, 1, k))
    return planes.reshape(n, c, planes.shape[-2], planes.shape[-1])


def _ssim_per_sample(x, y, window_size, sigma, data_range, k1, k2, padding):
    dtype = accumulate_dtype(x.dtype)
    x, y = x.to(dtype), y.to(dtype)
    taps = gaussian_window(window_size, sigma, dtype=dtype, device=x.device)
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    mu_x, mu_y = _blur(x, taps, padding), _blur(y, taps, padding)
    var_x = _blur(x * x, taps, padding) - mu_x * mu_x
    var_y = _blur(y * y, taps, padding) - mu_y * mu_y
    cov_xy = _blur(x * y, taps, padding) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
        (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    )
    return ssim_map.flatten(1).mean(1)


def _cosine_per_sample(x, y, eps):
    dtype = accumulate_dtype(x.dtype)
    x, y = x.to(dtype).flatten(1), y.to(dtype).flatten(1)
    norm_x = torch.linalg.vector_norm(x, dim=1).clamp_min(eps)
    norm_y = torch.linalg.vector_norm(y, dim=1).clamp_min(eps)
    return (x * y).sum(1) / (norm_x * norm_y)


def ssim(x: torch.Tensor, y: torch.Tensor, *, window_size: int = SSIM.window_size,
         sigma: float = SSIM.sigma, data_range: float = SSIM.data_range, k1: float = SSIM.k1,
         k2: float = SSIM.k2, padding: str = SSIM.padding, reduction: str = "mean"
) -> torch.Tensor:
    """Gaussian-window SSIM; see :func:`agkd_ops.ssim`."""
    per_sample = _ssim_per_sample(x, y, window_size, sigma, data_range, k1, k2, padding)
    return _reduce(per_sample, reduction, x.dtype)


def ssim_loss(x: torch.Tensor, y: torch.Tensor, *, window_size: int = SSIM.window_size,
              sigma: float = SSIM.sigma, data_range: float = SSIM.data_range, k1: float = SSIM.k1,
              k2: float = SSIM.k2, padding: str = SSIM.padding, reduction: str = "mean"
) -> torch.Tensor:
    """``1 - ssim``; see :func:`agkd_ops.ssim_loss`."""
    per_sample = 1 - _ssim_per_sample(x, y, window_size, sigma, data_range, k1, k2, padding)
    return _reduce(per_sample, reduction, x.dtype)


def cosine_loss(x: torch.Tensor, y: torch.Tensor, *, eps: float = COSINE_EPS,
                reduction: str = "mean") -> torch.Tensor:
    """``1 - cos(flatten(x), flatten(y))`` per sample; see :func:`agkd_ops.cosine_loss`."""
    return _reduce(1 - _cosine_per_sample(x, y, eps), reduction, x.dtype)


def hybrid_loss(x: torch.Tensor, y: torch.Tensor, *, ssim_weight: float = HYBRID_SSIM_WEIGHT,
                cosine_weight: float = HYBRID_COSINE_WEIGHT, window_size: int = SSIM.window_size,
                sigma: float = SSIM.sigma, data_range: float = SSIM.data_range,
                k1: float = SSIM.k1, k2: float = SSIM.k2, padding: str = SSIM.padding,
                eps: float = COSINE_EPS, reduction: str = "mean", scale: Optional[str] = None,
                alpha: Optional[float] = None, beta: Optional[float] = None) -> torch.Tensor:
    """``ssim_weight * ssim_loss + cosine_weight * cosine_loss``; see
    :func:`agkd_ops.hybrid_loss` (``alpha``/``beta``: the old names, with a FutureWarning;
    ``scale="minmax"``: both maps through :func:`minmax_scale` first)."""
    x, y = _scaled(x, scale), _scaled(y, scale)
    ssim_weight = renamed("hybrid_loss", "ssim_weight", ssim_weight, HYBRID_SSIM_WEIGHT, "alpha", alpha)
    cosine_weight = renamed("hybrid_loss", "cosine_weight", cosine_weight, HYBRID_COSINE_WEIGHT, "beta", beta)
    per_sample = 0
    if ssim_weight != 0:
        per_sample = ssim_weight * (
            1 - _ssim_per_sample(x, y, window_size, sigma, data_range, k1, k2, padding)
        )
    if cosine_weight != 0:
        per_sample = per_sample + cosine_weight * (1 - _cosine_per_sample(x, y, eps))
    if not torch.is_tensor(per_sample):  # both weights 0
        per_sample = torch.zeros(x.shape[0], dtype=accumulate_dtype(x.dtype), device=x.device)
        per_sample = per_sample + 0 * (x.sum() + y.sum())  # keep both inputs in the graph
    return _reduce(per_sample, reduction, x.dtype)


# ------------------------------------------------------------------------------ KD


def _kl_per_sample(student_logits, teacher_logits, temperature):
    """KL(softmax(t/τ) ‖ softmax(s/τ)) per row, in the compute dtype."""
    dtype = accumulate_dtype(student_logits.dtype)
    log_p_s = torch.log_softmax(student_logits.to(dtype) / temperature, dim=1)
    log_p_t = torch.log_softmax(teacher_logits.to(dtype) / temperature, dim=1)
    p_t = log_p_t.exp()
    # 0·log 0 = 0: a class the teacher rules out (logit -inf) contributes nothing. Masking
    # the log-ratio rather than the product keeps its gradient finite too; only an exact 0
    # is masked, so a NaN teacher row stays NaN in the loss and in the gradient.
    log_ratio = torch.where(p_t == 0, torch.zeros_like(p_t), log_p_t - log_p_s)
    return (p_t * log_ratio).sum(dim=1)


def standardize_logits(logits: torch.Tensor) -> torch.Tensor:
    """Each row as ``(z - mean(z)) / (std(z) + 1e-7)``, std with Bessel's correction (the
    logit-standardization authors' ``normalize``)."""
    std, mean = torch.std_mean(logits, dim=1, keepdim=True)
    return (logits - mean) / (std + STANDARDIZE_EPS)


def _temperature_columns(temperature, like: torch.Tensor) -> torch.Tensor:
    """A temperature as (N, M) columns in ``like``'s dtype: a number (M = 1), a sequence (M =
    its length) or a 0-dim / (N,) tensor (M = 1, differentiable). A value outside the
    accepted range (a tensor's values are checked only on the CPU) becomes NaN, so that row
    is NaN rather than a number."""
    n = like.shape[0]
    if torch.is_tensor(temperature):
        tau = temperature.to(like.dtype).reshape(-1, 1).expand(n, 1)
    else:
        values = (temperature,) if isinstance(temperature, float) else tuple(temperature)
        tau = torch.tensor(values, dtype=like.dtype, device=like.device).expand(n, len(values))
    low, high = TEMPERATURE_RANGE
    return torch.where((tau >= low) & (tau <= high), tau, torch.nan)


def _kl_family_per_sample(student_logits, teacher_logits, temperature, teacher_temperature, standardize):
    """Σ_m τ_m²·KL(softmax(t̃/τ_t,m) ‖ softmax(s̃/τ_m)) per row, with s̃, t̃ the logits or
    their standardized rows, and τ_t,m = teacher_temperature or τ_m."""
    dtype = accumulate_dtype(student_logits.dtype)
    s, t = student_logits.to(dtype), teacher_logits.to(dtype)
    if standardize:
        s, t = standardize_logits(s), standardize_logits(t)
    tau = _temperature_columns(temperature, s)
    tau_t = tau if teacher_temperature is None else _temperature_columns(teacher_temperature, s).expand_as(tau)
    total = torch.zeros(s.shape[0], dtype=dtype, device=s.device)
    for m in range(tau.shape[1]):
        log_p_s = torch.log_softmax(s / tau[:, m:m + 1], dim=1)
        log_p_t = torch.log_softmax(t / tau_t[:, m:m + 1], dim=1)
        total = total + tau[:, m] ** 2 * _xlogx_ratio(log_p_t, log_p_s)
    return total


def _xlogx_ratio(log_p, log_q):
    """Σ_k p_k (log p_k − log q_k) per row with 0·log 0 = 0, masking the log-ratio rather
    than the product so that the gradient stays finite where p_k = 0 (only an exact 0 is
    masked: a NaN row stays NaN)."""
    p = log_p.exp()
    return (p * torch.where(p == 0, torch.zeros_like(p), log_p - log_q)).sum(dim=1)


def _plain_temperature(temperature, teacher_temperature, standardize) -> bool:
    return isinstance(temperature, float) and teacher_temperature is None and not standardize


def _kl_rows(student_logits, teacher_logits, temperature, teacher_temperature, standardize):
    """τ²·KL per row, summed over the temperatures."""
    if _plain_temperature(temperature, teacher_temperature, standardize):
        return temperature**2 * _kl_per_sample(student_logits, teacher_logits, temperature)
    return _kl_family_per_sample(student_logits, teacher_logits, temperature, teacher_temperature, standardize)


def kd_kl_div(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
              temperature=KD_TEMPERATURE, teacher_temperature: Optional[float] = None,
              standardize: bool = False, reduction: str = "batchmean") -> torch.Tensor:
    """``τ²·KL(softmax(t/τ_t) ‖ softmax(s/τ))`` per row (summed over several temperatures);
    ``"batchmean"`` averages the rows. See :func:`agkd_ops.kd_kl_div`."""
    teacher_logits = teacher_logits.to(student_logits.dtype)
    per_sample = _kl_rows(student_logits, teacher_logits, temperature, teacher_temperature, standardize)
    return _reduce(per_sample, reduction, student_logits.dtype)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, *,
            temperature=KD_TEMPERATURE, kd_weight: float = KD_WEIGHT,
            label_smoothing: float = 0.0, ignore_index: Optional[int] = None,
            teacher_temperature: Optional[float] = None, standardize: bool = False,
            reduction: str = "mean", alpha: Optional[float] = None) -> torch.Tensor:
    """Hinton's ``(1-w)·CE + w·τ²·KL`` per row (``w = kd_weight``; ``alpha``: its old name,
    with a FutureWarning); CE at temperature 1 on the raw student logits against the
    smoothed target ``q' = (1-ε)·q + ε/K`` (q: the one-hot of a class index, or the given
    probabilities). Rows whose class is ``ignore_index`` are 0 and leave the "mean"
    denominator, which is at least 1."""
    kd_weight = renamed("kd_loss", "kd_weight", kd_weight, KD_WEIGHT, "alpha", alpha)
    teacher_logits = teacher_logits.to(student_logits.dtype)
    dtype = accumulate_dtype(student_logits.dtype)
    n, k = student_logits.shape
    counts = torch.ones(n, dtype=torch.bool, device=student_logits.device)
    if target.is_floating_point():
        q = target.to(dtype)
    else:
        if ignore_index is not None:
            counts = target != ignore_index
        q = F.one_hot(torch.where(counts, target, 0).long(), k).to(dtype)
    q = (1 - label_smoothing) * q + label_smoothing / k
    ce = -(q * torch.log_softmax(student_logits.to(dtype), dim=1)).sum(dim=1)
    kl = _kl_rows(student_logits, teacher_logits, temperature, teacher_temperature, standardize)
    per_sample = torch.where(counts, (1 - kd_weight) * ce + kd_weight * kl, 0.0)
    if reduction == "mean" and ignore_index is not None:
        mean = per_sample.sum() / counts.sum().clamp_min(1)
        return mean.to(student_logits.dtype)
    return _reduce(per_sample, reduction, student_logits.dtype)


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, *,
             tckd_weight: float = DKD.tckd_weight, nckd_weight: float = DKD.nckd_weight,
             temperature: float = DKD.temperature, reduction: str = "mean") -> torch.Tensor:
    """Decoupled KD per row: ``τ²·(α·KL(b_t ‖ b_s) + β·KL(q_t ‖ q_s))`` with ``b = [p_y, 1 −
    p_y]``, ``p = softmax(z/τ)``, and ``q`` the softmax over the classes other than y (the
    target excluded exactly). See :func:`agkd_ops.dkd_loss`."""
    teacher_logits = teacher_logits.to(student_logits.dtype)
    dtype = accumulate_dtype(student_logits.dtype)
    s, t = student_logits.to(dtype) / temperature, teacher_logits.to(dtype) / temperature
    y = target.long().unsqueeze(1)
    is_target = torch.zeros_like(s, dtype=torch.bool).scatter_(1, y, True)
    s_other, t_other = s.masked_fill(is_target, -torch.inf), t.masked_fill(is_target, -torch.inf)
    lse_s, lse_t = torch.logsumexp(s, 1), torch.logsumexp(t, 1)
    lse_s_other, lse_t_other = torch.logsumexp(s_other, 1), torch.logsumexp(t_other, 1)
    # log b = [log p_y, log(1 − p_y)], the second as a log-sum-exp over the other classes.
    log_b_s = torch.stack([s.gather(1, y)[:, 0] - lse_s, lse_s_other - lse_s], dim=1)
    log_b_t = torch.stack([t.gather(1, y)[:, 0] - lse_t, lse_t_other - lse_t], dim=1)
    tckd = _xlogx_ratio(log_b_t, log_b_s)
    # q over the other classes; the target column is exp(-inf) = 0 and drops out.
    log_q_s = (s_other - lse_s_other.unsqueeze(1)).masked_fill(is_target, 0.0)
    log_q_t = (t_other - lse_t_other.unsqueeze(1)).masked_fill(is_target, -torch.inf)
    nckd = _xlogx_ratio(log_q_t, log_q_s)
    per_sample = temperature**2 * (tckd_weight * tckd + nckd_weight * nckd)
    return _reduce(per_sample, reduction, student_logits.dtype)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each row of a with the same row of b, with DIST's 1e-8 in the
    denominator: Σ(a−ā)(b−b̄) / (‖a−ā‖·‖b−b̄‖ + 1e-8)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + DIST_EPS)


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
              inter_weight: float = DIST.inter_weight, intra_weight: float = DIST.intra_weight,
              temperature: float = DIST.temperature) -> torch.Tensor:
    """DIST: ``τ²·(β·(1 − mean_i ρ(p_s[i], p_t[i])) + γ·(1 − mean_j ρ(p_s[:, j], p_t[:, j])))``
    with ``p = softmax(z/τ)``, a 0-dim tensor. See :func:`agkd_ops.dist_loss`."""
    teacher_logits = teacher_logits.to(student_logits.dtype)
    dtype = accumulate_dtype(student_logits.dtype)
    p_s = torch.softmax(student_logits.to(dtype) / temperature, dim=1)
    p_t = torch.softmax(teacher_logits.to(dtype) / temperature, dim=1)
    inter = 1 - _pearson(p_s, p_t).mean()
    intra = 1 - _pearson(p_s.t(), p_t.t()).mean()
    return (temperature**2 * (inter_weight * inter + intra_weight * intra)).to(student_logits.dtype)


def ofa_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, *,
             eps: float = OFA.eps, temperature: float = OFA.temperature, reduction: str = "mean"
) -> torch.Tensor:
    """OFA per row: ``−Σ_k ((p_t,k + m_k)^eps − m_k)·log p_s,k`` with ``p = softmax(z/τ)``
    and ``m`` the one-hot target. See :func:`agkd_ops.ofa_loss`."""
    teacher_logits = teacher_logits.to(student_logits.dtype)
    dtype = accumulate_dtype(student_logits.dtype)
    log_p_s = torch.log_softmax(student_logits.to(dtype) / temperature, dim=1)
    p_t = torch.softmax(teacher_logits.to(dtype) / temperature, dim=1)
    m = F.one_hot(target.long(), student_logits.shape[1]).to(dtype)
    weight = (p_t + m).pow(eps) - m
    per_sample = -(weight * log_p_s).sum(dim=1)
    return _reduce(per_sample, reduction, student_logits.dtype)


# ---------------------------------------------------------------------- attention


def attention_map(features: torch.Tensor, *, p: float = ATTENTION_P, normalize: bool = True,
                  eps: float = NORMALIZE_EPS) -> torch.Tensor:
    """``mean_c |F|^p`` per pixel, ``(N, C, H, W) -> (N, 1, H, W)``, then divided by
    ``max(‖·‖₂, eps)`` per sample (as ``F.normalize``). The gradient of ``|F|^p`` at
    ``F = 0`` is taken as 0 for every ``p`` (autograd of ``abs().pow(p)`` gives NaN there
    for ``p < 1``)."""
    dtype = accumulate_dtype(features.dtype)
    magnitude = features.to(dtype).abs()
    zero = magnitude == 0
    safe = torch.where(zero, torch.ones_like(magnitude), magnitude)
    powered = torch.where(zero, torch.zeros_like(magnitude), safe.pow(p))
    amap = powered.mean(dim=1, keepdim=True)
    if normalize:
        norm = torch.linalg.vector_norm(amap.flatten(1), dim=1).clamp_min(eps)
        amap = amap / norm.view(-1, 1, 1, 1)
    return amap.to(features.dtype)


def minmax_scale(maps: torch.Tensor, eps: float = MINMAX_EPS) -> torch.Tensor:
    """Each (sample, channel) map of ``(N, C, H, W)`` maps as ``(m - min) / (max - min)``;
    a map whose range is at most ``eps`` becomes 0 (with a zero gradient). The plain
    composition, with the gradients torch.amin/amax give at ties; a NaN keeps its map NaN."""
    flat = maps.flatten(2)
    low, high = flat.amin(2, keepdim=True), flat.amax(2, keepdim=True)
    spread = high - low
    constant = spread <= eps  # False for NaN: a NaN map stays NaN
    scaled = (flat - low) / torch.where(constant, torch.ones_like(spread), spread)
    return torch.where(constant, torch.zeros_like(scaled), scaled).view_as(maps)


def _scaled(maps: torch.Tensor, scale: Optional[str]) -> torch.Tensor:
    return maps if scale is None else minmax_scale(maps)


def attention_align_loss(student: torch.Tensor, teacher: torch.Tensor, *, loss: str = "mse",
                         align_corners: bool = False, reduction: str = "mean", scale: Optional[str] = None,
                         **loss_kwargs) -> torch.Tensor:
    """Resize ``student`` bilinearly to the teacher's ``(H, W)`` (``F.interpolate``) and
    compare with ``loss``: ``"mse"`` (mean of squared differences over C·H·W per sample),
    ``"cosine"``, ``"ssim"`` (``1 - SSIM``) or ``"hybrid"``, with that loss's keywords.
    ``scale="minmax"``: both maps through :func:`minmax_scale` first, the student's at its
    own size."""
    student, teacher = _scaled(student, scale), _scaled(teacher, scale)
    resized = F.interpolate(student, size=tuple(teacher.shape[-2:]), mode="bilinear",
                            align_corners=align_corners)
    if loss == "mse":
        dtype = accumulate_dtype(student.dtype)
        per_sample = (resized.to(dtype) - teacher.to(dtype)).pow(2).flatten(1).mean(dim=1)
        return _reduce(per_sample, reduction, student.dtype)
    compare = {"cosine": cosine_loss, "ssim": ssim_loss, "hybrid": hybrid_loss}[loss]
    return compare(resized, teacher, reduction=reduction, **loss_kwargs)

