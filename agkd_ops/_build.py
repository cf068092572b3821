"""How the native kernels are compiled: their sources and flags, written once for both
ways they get built — ahead of time by ``setup.py`` and, for an install that has no
compiled kernels, on first use by :mod:`agkd_ops._backend` through
``torch.utils.cpp_extension.load``.

This module imports nothing from the package (``setup.py`` loads it by path, before the
package exists) and only the standard library.
"""
from __future__ import annotations

import glob
import os
import platform
from typing import List, Tuple

# -fno-trapping-math: the kernels never read FP exception flags, and without it GCC will
# not if-convert float compares (clamps, NaN masks) in lane loops, so they stay scalar.
# It changes no rounding.
CXX_FLAGS = ["-O3", "-std=c++20", "-fvisibility=hidden", "-fno-trapping-math"]
NVCC_FLAGS = ["-O3", "-std=c++20", "-lineinfo"]
OPENMP = platform.system() != "Darwin"  # Apple clang ships without libomp


def cxx_flags() -> List[str]:
    return CXX_FLAGS + (["-fopenmp"] if OPENMP else [])


def link_flags() -> List[str]:
    return ["-fopenmp"] if OPENMP else []


def _sorted(csrc: str, pattern: str) -> List[str]:
    return sorted(glob.glob(os.path.join(csrc, "agkd", pattern)))


def autograd_sources(csrc: str) -> List[str]:
    """Each op's C++ autograd: device-independent, in every build."""
    return _sorted(csrc, os.path.join("autograd", "*.cpp"))


def cpu_sources(csrc: str) -> List[str]:
    """The schemas (ops.cpp), the autograd and the CPU kernels."""
    return [os.path.join(csrc, "agkd", "ops.cpp")] + autograd_sources(csrc) + _sorted(csrc, os.path.join("cpu", "*.cpp"))


def cuda_sources(csrc: str) -> List[str]:
    return _sorted(csrc, os.path.join("cuda", "*.cu"))


def defines(cuda_archs: str, torch_version: str) -> List[Tuple[str, str]]:
    """The build facts ops.cpp hands to :func:`agkd_ops.build_info`."""
    return [("AGKD_CUDA_ARCHS", f'"{cuda_archs}"'), ("AGKD_TORCH_VERSION", f'"{torch_version}"')]


def has_sources(csrc: str) -> bool:
    return os.path.isfile(os.path.join(csrc, "agkd", "ops.cpp"))
