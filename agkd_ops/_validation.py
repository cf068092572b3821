"""Input checks shared by the public functions. Every message starts with the public
function's name and names the argument as written in its signature (docs/design.md, section 3)."""
from __future__ import annotations

import math
import numbers
import warnings

import torch

REDUCTIONS = ("mean", "sum", "none")
KL_REDUCTIONS = ("batchmean", "sum", "none")
MAPS = "(N, C, H, W)"
LOGITS = "(N, K)"
PADDINGS = ("valid", "reflect", "zeros")


def _shape(t: torch.Tensor) -> str:
    return f"({', '.join(map(str, t.shape))})"


# These run on every call, before the kernel: plain attribute reads, no tensor op and
# nothing that reads a device value (benchmarks/test_bench_overhead.py measures the cost).


def check_tensor(fn: str, name: str, t, *, ranks=(4,), min_rank=None, layout=MAPS) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"agkd_ops.{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"agkd_ops.{fn}: {name} must have a floating dtype, got {t.dtype}")
    if min_rank is not None:
        if t.dim() < min_rank:
            raise ValueError(
                f"agkd_ops.{fn}: {name} must have at least {min_rank} dimensions "
                f"(N, ...), got shape {_shape(t)}"
            )
    elif t.dim() not in ranks:
        raise ValueError(
            f"agkd_ops.{fn}: {name} must be a rank-{ranks[0]} {layout} tensor, got shape {_shape(t)}"
        )
    if t.numel() == 0:
        raise ValueError(f"agkd_ops.{fn}: {name} is empty (shape {_shape(t)})")


def check_pair(fn: str, x, y, *, names=("x", "y"), ranks=(4,), min_rank=None,
               same_shape=True, layout=MAPS) -> None:
    a, b = names
    check_tensor(fn, a, x, ranks=ranks, min_rank=min_rank, layout=layout)
    check_tensor(fn, b, y, ranks=ranks, min_rank=min_rank, layout=layout)
    if x.dtype != y.dtype:
        raise TypeError(f"agkd_ops.{fn}: {a} and {b} must have the same dtype, got {x.dtype} and {y.dtype}")
    if x.device != y.device:
        raise ValueError(f"agkd_ops.{fn}: {a} and {b} must be on the same device, got {x.device} and {y.device}")
    if same_shape and x.shape != y.shape:
        raise ValueError(
            f"agkd_ops.{fn}: {a} and {b} must have the same shape, got {a} {_shape(x)} and {b} {_shape(y)}"
        )


def check_scale(fn: str, scale) -> None:
    """The attention losses' ``scale``: None, or "minmax"."""
    if scale is not None and scale != "minmax":
        raise ValueError(f"agkd_ops.{fn}: scale must be None or 'minmax', got {scale!r}")


def check_number(fn: str, name: str, value, *, positive=False, nonnegative=False) -> float:
    if type(value) is not float:  # the common case skips the (slower) ABC check
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"agkd_ops.{fn}: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    # Not math.isfinite: under torch.compile a float that changed between calls becomes
    # symbolic, which math.isfinite cannot take; a comparison can (and is False for NaN).
    if not abs(value) < math.inf:
        raise ValueError(f"agkd_ops.{fn}: {name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"agkd_ops.{fn}: {name} must be > 0, got {value}")
    if nonnegative and value < 0:
        raise ValueError(f"agkd_ops.{fn}: {name} must be >= 0, got {value}")
    return value


# Temperatures outside this range are refused rather than computed: at 1e-300 the scaled
# logits overflow float32 (a NaN loss), at 1e300 the τ² factor overflows; in between every
# value gives finite losses and gradients for finite logits.
TEMPERATURE_RANGE = (1e-3, 1e3)


def check_temperature(fn: str, name: str, value) -> float:
    return check_in_range(fn, name, value, TEMPERATURE_RANGE,
                          "beyond that range the temperature-scaled logits or the τ² factor overflow")


def check_temperatures(fn: str, temperature, logits, name: str = "temperature"):
    """The logit-KD family's temperature: a number (returned as a float), a non-empty
    sequence of numbers (a tuple of floats: the loss is summed over them), or a floating
    tensor, 0-dim or (N,), on the logits' device (one per row; it may require grad). Every
    number must be in TEMPERATURE_RANGE; a tensor's values are checked where that costs no
    device sync (on the CPU), and elsewhere a row with a bad temperature is NaN. ``logits``
    (N, K) is needed for a tensor only."""
    if isinstance(temperature, torch.Tensor):
        n = logits.shape[0]
        if not temperature.is_floating_point():
            raise TypeError(f"agkd_ops.{fn}: {name} must be a floating tensor, got {temperature.dtype}")
        if temperature.shape not in ((), (n,)):
            raise ValueError(f"agkd_ops.{fn}: a {name} tensor must be 0-dim or ({n},) (one per row), "
                             f"got shape {_shape(temperature)}")
        if temperature.device != logits.device:
            raise ValueError(f"agkd_ops.{fn}: {name} must be on the logits' device {logits.device}, "
                             f"got {temperature.device}")
        if temperature.device.type == "cpu" and not torch.compiler.is_compiling():
            low, high = TEMPERATURE_RANGE
            values = temperature.detach()
            bad = ~((values >= low) & (values <= high))
            if bool(bad.any()):
                raise ValueError(f"agkd_ops.{fn}: {name} must hold values in [{low:g}, {high:g}], got "
                                 f"{float(values.reshape(-1)[bad.reshape(-1)][0]):g}")
        return temperature
    if isinstance(temperature, (list, tuple)):
        if len(temperature) == 0:
            raise ValueError(f"agkd_ops.{fn}: {name} is an empty sequence; give at least one temperature")
        return tuple(check_temperature(fn, f"{name}[{i}]", value) for i, value in enumerate(temperature))
    return check_temperature(fn, name, temperature)


def check_optional_temperature(fn: str, name: str, value):
    return None if value is None else check_temperature(fn, name, value)


def check_flag(fn: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"agkd_ops.{fn}: {name} must be True or False, got {type(value).__name__}")
    return value


# A half-precision teacher (a float16 or bfloat16 teacher cache) beside a float32 student is
# the one dtype mix the logit losses take: the teacher is computed in float32.
_HALF_TEACHER = (torch.float16, torch.bfloat16)


def check_logits(fn: str, student, teacher, names=("student_logits", "teacher_logits")) -> torch.Tensor:
    """Two (N, K) logit tensors of one shape and device, of one dtype or a half-precision
    teacher with a float32 student; returns the teacher in the student's dtype."""
    if (isinstance(student, torch.Tensor) and isinstance(teacher, torch.Tensor)
            and student.dtype == torch.float32 and teacher.dtype in _HALF_TEACHER):
        check_tensor(fn, names[1], teacher, ranks=(2,), layout=LOGITS)
        teacher = teacher.to(torch.float32)
    check_pair(fn, student, teacher, names=names, ranks=(2,), layout=LOGITS)
    return teacher


def check_min_classes(fn: str, logits: torch.Tensor, minimum: int, why: str) -> None:
    if logits.shape[1] < minimum:
        raise ValueError(f"agkd_ops.{fn}: needs at least {minimum} classes ({why}), got K={logits.shape[1]}")


# The attention map's exponent: |F|^p overflows float32 for |F| > 3.4e38^(1/p), so a large
# p turns ordinary activations into inf (a NaN map) or, below 1, into 0 (a map of zeros).
ATTENTION_P_RANGE = (1e-3, 16.0)
# SSIM's Gaussian σ: below this its 2σ² underflows (0/0 at the window's centre).
SIGMA_RANGE = (1e-3, math.inf)


def check_in_range(fn: str, name: str, value, bounds, why: str) -> float:
    """A finite real number in ``[low, high]``, or a ValueError saying why not."""
    value = check_number(fn, name, value, positive=True)
    low, high = bounds
    if not low <= value <= high:
        shown = f">= {low:g}" if high == math.inf else f"in [{low:g}, {high:g}]"
        raise ValueError(f"agkd_ops.{fn}: {name} must be {shown}, got {value:g}; {why}")
    return value


def renamed(fn: str, new: str, value, default, old: str, old_value, stacklevel: int = 4):
    """The value of keyword ``new``, which was called ``old``: an old keyword still given
    is used, with a FutureWarning naming the new one; both at once is a TypeError."""
    if old_value is None:
        return value
    if value != default:
        raise TypeError(f"agkd_ops.{fn}: {old} is the old name of {new}; give {new} alone")
    warnings.warn(f"agkd_ops.{fn}: {old} is deprecated, call it {new}", FutureWarning, stacklevel=stacklevel)
    return old_value


def check_fraction(fn: str, name: str, value) -> float:
    """A real number in [0, 1]."""
    value = check_number(fn, name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"agkd_ops.{fn}: {name} must be in [0, 1], got {value}")
    return value


def check_kl_reduction(fn: str, reduction) -> str:
    if reduction == "mean":
        raise ValueError(
            f"agkd_ops.{fn}: reduction='mean' is not accepted: torch's 'mean' for KL divides by "
            f"N*K, not by the batch size; use reduction='batchmean' (sum over classes, mean "
            f"over samples), 'sum' or 'none'"
        )
    return check_choice(fn, "reduction", reduction, KL_REDUCTIONS)


def check_target(fn: str, target, logits: torch.Tensor, name: str = "target") -> torch.Tensor:
    """Class indices (N,) (returned as int64) or probabilities (N, K) in the logits' dtype,
    for (N, K) logits. Their values are checked by :func:`check_target_range` (reference
    path) or by the native kernels."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"agkd_ops.{fn}: {name} must be a torch.Tensor of class indices or "
                        f"probabilities, got {type(target).__name__}")
    n, k = logits.shape
    if target.is_floating_point():
        if target.shape != logits.shape:
            raise ValueError(
                f"agkd_ops.{fn}: {name} is floating ({target.dtype}), and probability targets must "
                f"have the logits' shape ({n}, {k}), got {_shape(target)}; class indices are an "
                f"integer ({n},) tensor"
            )
        if target.dtype != logits.dtype:
            raise TypeError(f"agkd_ops.{fn}: {name} holds probabilities and must have the logits' "
                            f"dtype {logits.dtype}, got {target.dtype}")
    elif target.dtype not in (torch.int64, torch.int32):
        raise TypeError(
            f"agkd_ops.{fn}: {name} must hold integer class indices (int64 or int32) or floating "
            f"probabilities, got {target.dtype}"
        )
    elif target.shape != (n,):
        raise ValueError(f"agkd_ops.{fn}: {name} must have shape ({n},) to match the logits' "
                         f"batch, got {_shape(target)}")
    if target.device != logits.device:
        raise ValueError(f"agkd_ops.{fn}: {name} must be on the logits' device {logits.device}, "
                         f"got {target.device}")
    return target if target.dtype != torch.int32 else target.long()


def check_ignore_index_type(fn: str, ignore_index):
    """None or an int."""
    if ignore_index is None:
        return None
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"agkd_ops.{fn}: ignore_index must be an int or None, got "
                        f"{type(ignore_index).__name__}")
    return int(ignore_index)


def check_ignore_index(fn: str, ignore_index, target: torch.Tensor):
    """None, or an int for class-index targets."""
    ignore_index = check_ignore_index_type(fn, ignore_index)
    if ignore_index is None:
        return None
    if target.is_floating_point():
        raise ValueError(f"agkd_ops.{fn}: ignore_index applies to class-index targets only; "
                         f"got probability targets (pass ignore_index=None)")
    return int(ignore_index)


def check_target_range(fn: str, target: torch.Tensor, k: int, ignore_index=None,
                       name: str = "target") -> None:
    """Class indices in [0, K) (besides ignore_index), or probabilities >= 0, for the
    reference path (torch's cross-entropy would assert on the device). It reads values on
    the host: a device sync on a GPU, which is why the native kernels check instead
    (csrc/agkd/kd.h)."""
    # A data-dependent check cannot be traced (compiled code runs without it), and meta
    # tensors have no values to check.
    if torch.compiler.is_compiling() or target.device.type == "meta":
        return
    if target.is_floating_point():
        low = float(target.detach().min())
        if low < 0:
            raise ValueError(f"agkd_ops.{fn}: probability targets must be >= 0, got {low}")
        return
    counted = target if ignore_index is None else target[target != ignore_index]
    if counted.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(counted))  # one pass, one sync
    if lo < 0 or hi >= k:
        besides = "there is no ignore_index" if ignore_index is None else f"besides ignore_index={ignore_index}"
        raise ValueError(
            f"agkd_ops.{fn}: {name} must hold class indices in [0, {k}) for K={k} classes, "
            f"got values from {lo} to {hi} ({besides})"
        )


def check_choice(fn: str, name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(
            f"agkd_ops.{fn}: {name} must be one of {', '.join(map(repr, choices))}, got {value!r}"
        )
    return value


# The widest Gaussian window accepted, on every backend alike: the CUDA kernels carry the
# taps in their launch parameters, 127 at most (kMaxTaps in cuda/hybrid_cuda.cu). That is
# far beyond any SSIM in use (11 taps is the standard), and a window of 2**31 - 1 taps is
# refused here instead of exhausting memory.
MAX_WINDOW_SIZE = 127


def check_window_size(fn: str, window_size) -> int:
    """A positive odd int no wider than MAX_WINDOW_SIZE (whatever the map)."""
    if isinstance(window_size, bool) or not isinstance(window_size, numbers.Integral):
        raise TypeError(f"agkd_ops.{fn}: window_size must be an int, got {type(window_size).__name__}")
    window_size = int(window_size)
    if window_size < 1 or window_size % 2 == 0:
        raise ValueError(f"agkd_ops.{fn}: window_size must be a positive odd integer, got {window_size}")
    if window_size > MAX_WINDOW_SIZE:
        raise ValueError(f"agkd_ops.{fn}: window_size must be at most {MAX_WINDOW_SIZE}, got {window_size}")
    return window_size


def check_window(fn: str, x: torch.Tensor, window_size: int, padding: str, names=("x", "y")) -> int:
    """A window_size (already checked by :func:`check_window_size`) must fit the map under
    this padding."""
    h, w = x.shape[-2], x.shape[-1]
    pair = " and ".join(names)
    if padding == "valid" and (h < window_size or w < window_size):
        raise ValueError(
            f"agkd_ops.{fn}: with padding='valid', {pair} must be at least window_size={window_size} "
            f"in H and W, got shape {_shape(x)}; use a smaller window_size or padding='zeros'"
        )
    if padding == "reflect" and (window_size // 2 >= h or window_size // 2 >= w):
        raise ValueError(
            f"agkd_ops.{fn}: with padding='reflect', the pad window_size // 2 = {window_size // 2} "
            f"must be smaller than H and W of {pair}, got shape {_shape(x)}"
        )
    return window_size


# SSIM's stabilising constants are used in float32 (and float64): each must be a normal
# positive float32 number, or flat windows divide 0 by 0 (too small) or every SSIM is 1
# (too large).
_FLOAT32_TINY, _FLOAT32_MAX = 1.1754943508222875e-38, 3.4028234663852886e38


def check_ssim_options(fn, window_size, sigma, data_range, k1, k2, padding):
    """The SSIM keyword arguments, without a map; returns (window_size, sigma, c1, c2)."""
    check_choice(fn, "padding", padding, PADDINGS)
    window_size = check_window_size(fn, window_size)
    sigma = check_in_range(fn, "sigma", sigma, SIGMA_RANGE, "a narrower Gaussian underflows to 0/0")
    data_range = check_number(fn, "data_range", data_range, positive=True)
    k1 = check_number(fn, "k1", k1, positive=True)
    k2 = check_number(fn, "k2", k2, positive=True)
    constants = []
    for k_name, k in (("k1", k1), ("k2", k2)):
        c = (k * data_range) * (k * data_range)  # not **: a float power raises OverflowError
        if not _FLOAT32_TINY <= c <= _FLOAT32_MAX:
            raise ValueError(
                f"agkd_ops.{fn}: data_range={data_range:g} with {k_name}={k:g} gives the SSIM constant "
                f"({k_name}·data_range)² = {c:g}, outside float32's normal range "
                f"[{_FLOAT32_TINY:.3g}, {_FLOAT32_MAX:.3g}]; give data_range on the scale of the data"
            )
        constants.append(c)
    return (window_size, sigma, *constants)
