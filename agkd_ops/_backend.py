"""Loading the compiled kernels (``agkd_ops._C``) and choosing a backend per call.

``"auto"`` (default) uses a native kernel where one is compiled for the tensor's device
and dtype and falls back to the pure-PyTorch reference elsewhere; ``"native"`` insists
and raises ``NotImplementedError`` where no kernel can serve; ``"reference"`` always
uses :mod:`agkd_ops.reference`. The environment variable ``AGKD_OPS_BACKEND`` sets the
starting value.

Where the install has no compiled kernels (a pure-Python wheel, or kernels built against
another torch that no longer load), the first call that could use them compiles them for
this machine with ``torch.utils.cpp_extension`` from the sources shipped in the package,
says so in one line, and torch caches the build for later processes. ``AGKD_OPS_JIT=0``
turns that off. If they cannot be compiled, the reference serves, with one warning.
:func:`build_info` says which happened (``"kernels"``).
"""
from __future__ import annotations

import os
import sys
import threading
import warnings
from typing import Any, Dict, Optional

import torch

from . import _build

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


def _jit_requested() -> bool:
    value = os.environ.get("AGKD_OPS_JIT", "1").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"AGKD_OPS_JIT must be 0 or 1, got {value!r}")
    return value != "0"


def _kernel_sources() -> Optional[str]:
    """The csrc folder to compile from: shipped in the package (agkd_ops/_csrc) or, in a
    source checkout, beside it."""
    here = os.path.dirname(os.path.abspath(__file__))
    for csrc in (os.path.join(here, "_csrc"), os.path.join(os.path.dirname(here), "csrc")):
        if _build.has_sources(csrc):
            return csrc
    return None


# Where the kernels come from: "prebuilt" (installed with the package), "jit" (compiled on
# first use), "pending" (not compiled yet; the first call that could use them will),
# "none" (the reference serves every call).
if _C is not None:
    _KERNELS_FROM = "prebuilt"
elif not _CUDA_EMULATION and _jit_requested() and _kernel_sources() is not None:
    _KERNELS_FROM = "pending"
else:
    _KERNELS_FROM = "none"
_JIT_LOCK = threading.Lock()
_JIT_NAME = "agkd_ops_jit"  # the module name, which ops.cpp's PyInit_ must carry

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


def _compile_kernels():
    """The kernels built for this machine by torch.utils.cpp_extension.load (CUDA too
    when torch sees a GPU and a toolkit), cached by torch under TORCH_EXTENSIONS_DIR."""
    import logging

    # torch's import-time note that no CUDA runtime is found would be a second line here.
    cpp_logger = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        cpp_logger.setLevel(level)

    csrc = _kernel_sources()
    use_cuda = torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None
    sources = _build.cpu_sources(csrc) + (_build.cuda_sources(csrc) if use_cuda else [])
    defines = _build.defines("detected" if use_cuda else "", torch.__version__)
    defines += [("AGKD_EXTENSION_NAME", _JIT_NAME)] + ([("AGKD_WITH_CUDA", "1")] if use_cuda else [])
    # The flags pass through a shell (ninja), which would strip the string macros' quotes.
    flags = [f"-D{name}={value}".replace('"', '\\"') for name, value in defines]
    print(f"agkd_ops: this install has no compiled kernels; building them for this machine "
          f"({'CPU and CUDA' if use_cuda else 'CPU'}) with torch.utils.cpp_extension: minutes the first time, "
          f"then torch's cache", file=sys.stderr, flush=True)
    return cpp_extension.load(
        name=_JIT_NAME, sources=sources, extra_include_paths=[csrc],
        extra_cflags=_build.cxx_flags() + flags, extra_cuda_cflags=_build.NVCC_FLAGS + flags,
        extra_ldflags=_build.link_flags(), with_cuda=use_cuda, verbose=False)


def ensure_kernels() -> None:
    """Compile the kernels now if they are pending (see the module's docstring); a no-op
    otherwise. If compiling fails the reference serves, and the first call warns why."""
    global _C, _KERNELS, _KERNELS_FROM, _JIT_ERROR
    if _KERNELS_FROM != "pending":
        return
    with _JIT_LOCK:
        if _KERNELS_FROM != "pending":
            return
        try:
            with warnings.catch_warnings():  # the build's own notes; the one line above says it all
                warnings.simplefilter("ignore")
                module = _compile_kernels()
        except Exception as exc:  # no compiler, a failed build: the reference still serves
            _JIT_ERROR, _KERNELS_FROM = exc, "none"
            return
        _C = module
        _KERNELS = _kernel_table()
        from . import _registrations  # noqa: F401  (fake kernels for the ops just loaded)
        _KERNELS_FROM = "jit"


_JIT_ERROR: Optional[BaseException] = None
_WARNED_NO_KERNELS = False


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _why_no_kernels() -> str:
    if _JIT_ERROR is not None:
        errors = [line.strip() for line in str(_JIT_ERROR).splitlines() if "error:" in line]
        return f"compiling them failed: {errors[0] if errors else _first_line(_JIT_ERROR)}"
    if _kernel_sources() is None:
        return "this install ships no kernel sources to compile"
    return "AGKD_OPS_JIT=0 kept them from being compiled"


def _warn_no_kernels() -> None:
    """One warning per process that the reference serves for want of any kernels."""
    global _WARNED_NO_KERNELS
    if _WARNED_NO_KERNELS:
        return
    _WARNED_NO_KERNELS = True
    frame, level = sys._getframe(0), 1  # point the warning at the user's line, not ours
    while frame is not None and frame.f_globals.get("__name__", "").startswith("agkd_ops"):
        frame, level = frame.f_back, level + 1
    warnings.warn(f"agkd_ops: no compiled kernels ({_why_no_kernels()}); the pure-PyTorch reference "
                  f"serves every call, correct but slower", RuntimeWarning, stacklevel=level)


def _has_kernel(op: str, device_type: str) -> bool:
    return (op, device_type) in _KERNELS


def native_available(device: Any = "cpu", dtype: Optional[torch.dtype] = None) -> bool:
    """Whether the native kernels are compiled for ``device`` (and ``dtype``, if given);
    compiles them first where they are pending."""
    ensure_kernels()
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
    if _KERNELS_FROM == "pending":
        ensure_kernels()
    if _C is None and _backend == "auto":  # under "native" the error below says why
        _warn_no_kernels()
    device_type = tensor.device.type
    ok = _has_kernel(op, device_type) and tensor.dtype in _NATIVE_DTYPES.get(device_type, ())
    if not ok and _backend == "native":
        why = f" (no compiled kernels: {_why_no_kernels()})" if _C is None else ""
        raise NotImplementedError(
            f"agkd_ops.{function}: the native backend has no kernel agkd::{op} for device "
            f"{tensor.device.type!r} and dtype {tensor.dtype}{why}; use "
            f"agkd_ops.set_backend('auto') to fall back to the reference implementation"
        )
    return ok


def build_info() -> Dict[str, Any]:
    """What was compiled, and against what. ``"kernels"``: ``"prebuilt"`` (installed with
    the package), ``"jit"`` (compiled on first use), ``"pending"`` (to be compiled on the
    first call that could use them) or ``"none"`` (the reference serves every call)."""
    info: Dict[str, Any] = {
        "kernels": _KERNELS_FROM,
        "compiled": _C is not None,
        "load_error": None if _LOAD_ERROR is None else str(_LOAD_ERROR),
        "compile_error": None if _JIT_ERROR is None else str(_JIT_ERROR),
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
