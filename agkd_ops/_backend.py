"""Loading the compiled kernels (``agkd_ops._C``) and choosing a backend per call.

``"auto"`` (default) uses a native kernel where one is compiled for the tensor's device
and dtype and falls back to the pure-PyTorch reference elsewhere; ``"native"`` insists
and raises ``NotImplementedError`` where no kernel can serve; ``"reference"`` always
uses :mod:`agkd_ops.reference`. The environment variable ``AGKD_OPS_BACKEND`` sets the
starting value.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch

_BACKENDS = ("auto", "native", "reference")



def _cuda_emulation_requested() -> bool:
    value = os.environ.get("AGKD_OPS_CUDA_EMULATION", "0").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"AGKD_OPS_CUDA_EMULATION must be 0 or 1, got {value!r}")
    return value == "1"


# With AGKD_OPS_CUDA_EMULATION=1 the package loads _C_cuda_emu instead of _C: the same
# schemas, with the CUDA kernels (cuda/*.cu) compiled for the CPU emulator and registered
# for CPU tensors, so every native call on the CPU runs the CUDA code. It is a test
# build (setup.py, AGKD_CUDA_EMULATION=1); the real CPU kernels are not loaded beside it.
_CUDA_EMULATION = _cuda_emulation_requested()
_LOAD_ERROR: Optional[BaseException] = None
if _CUDA_EMULATION:
    try:
        from . import _C_cuda_emu as _C  # type: ignore[attr-defined]
    except ImportError as exc:
        raise ImportError(
            "agkd_ops: AGKD_OPS_CUDA_EMULATION=1, but this install has no CUDA emulation build "
            f"(agkd_ops._C_cuda_emu: {exc}); rebuild with AGKD_CUDA_EMULATION=1 pip install "
            "--no-build-isolation -e ."
        ) from exc
else:
    try:  # importing _C runs the C++ TORCH_LIBRARY registrations
        from . import _C  # type: ignore[attr-defined]
    except ImportError as exc:  # pure-Python install (AGKD_NO_EXT=1) or a broken build
        _C = None
        _LOAD_ERROR = exc

# Dtypes the native kernels are compiled for, per device type.
_NATIVE_DTYPES = {
    "cpu": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
    "cuda": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
}


def _initial_backend():
    """(backend, None), or (None, why) for an AGKD_OPS_BACKEND that names no backend. The
    import does not fail on it (a program that imports agkd_ops could not say what is
    wrong in its own words); every call does, until set_backend chooses one."""
    name = os.environ.get("AGKD_OPS_BACKEND", "auto").strip().lower() or "auto"
    if name not in _BACKENDS:
        return None, f"AGKD_OPS_BACKEND={name!r} is not a backend; choose one of {', '.join(_BACKENDS)}"
    return name, None


_backend, _BACKEND_ERROR = _initial_backend()


def check_backend() -> None:
    """A ValueError when ``AGKD_OPS_BACKEND`` named no backend and none was set since."""
    if _backend is None:
        raise ValueError(f"agkd_ops: {_BACKEND_ERROR}")


def set_backend(name: str) -> None:
    """Select ``"auto"``, ``"native"`` or ``"reference"`` for every later call."""
    global _backend
    if not isinstance(name, str) or name.lower() not in _BACKENDS:
        raise ValueError(
            f"agkd_ops.set_backend: name must be one of {', '.join(map(repr, _BACKENDS))}, "
            f"got {name!r}"
        )
    _backend = name.lower()


def get_backend() -> str:
    """The backend set by :func:`set_backend` (or ``AGKD_OPS_BACKEND``)."""
    check_backend()
    return _backend


def _kernel_table():
    """(op, device type) pairs with a compiled kernel, for every op the library declares
    (csrc/agkd/ops.cpp). Read once at import: the kernels register when _C loads, and a
    plain set lookup stays traceable by torch.compile."""
    if _C is None:
        return frozenset()
    ops = [name for name in torch._C._dispatch_get_all_op_names() if name.startswith("agkd::")]
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return frozenset(
        (op.removeprefix("agkd::"), device) for op in ops for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
        if has(op, key)
    )


_KERNELS = _kernel_table()


def _has_kernel(op: str, device_type: str) -> bool:
    return (op, device_type) in _KERNELS


def native_available(device: Any = "cpu", dtype: Optional[torch.dtype] = None) -> bool:
    """Whether the native kernels are compiled for ``device`` (and ``dtype``, if given)."""
    device_type = torch.device(device).type
    if not _has_kernel("hybrid_fwd", device_type):
        return False
    return dtype is None or dtype in _NATIVE_DTYPES.get(device_type, ())


def use_native(function: str, op: str, tensor: torch.Tensor) -> bool:
    """Decide for one call; raises under ``"native"`` where no kernel can serve."""
    if _backend == "reference":
        return False
    if _backend is None:
        check_backend()
    device_type = tensor.device.type
    ok = _has_kernel(op, device_type) and tensor.dtype in _NATIVE_DTYPES.get(device_type, ())
    if not ok and _backend == "native":
        why = f" ({_LOAD_ERROR})" if _C is None else ""
        raise NotImplementedError(
            f"agkd_ops.{function}: the native backend has no kernel agkd::{op} for device "
            f"{tensor.device.type!r} and dtype {tensor.dtype}{why}; use "
            f"agkd_ops.set_backend('auto') to fall back to the reference implementation"
        )
    return ok


def build_info() -> Dict[str, Any]:
    """What was compiled, and against what."""
    info: Dict[str, Any] = {
        "compiled": _C is not None,
        "load_error": None if _LOAD_ERROR is None else str(_LOAD_ERROR),
        "cpu": _has_kernel("hybrid_fwd", "cpu"),
        "cuda": _has_kernel("hybrid_fwd", "cuda"),
        "cuda_archs": None,
        "openmp": None,
        "compiled_torch_version": None,
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "cuda_device_available": torch.cuda.is_available(),
        "num_threads": torch.get_num_threads(),
        "backend": _backend,
        "backend_error": _BACKEND_ERROR if _backend is None else None,
        "cuda_emulation": _CUDA_EMULATION,
    }
    if _C is not None:
        info["cuda_archs"] = _C.cuda_archs or None
        info["openmp"] = bool(_C.openmp)
        info["compiled_torch_version"] = _C.torch_version
    return info
