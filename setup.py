"""Builds agkd_ops._C, the native kernels. Everything else lives in pyproject.toml.

Environment switches:
  AGKD_NO_EXT=1   install pure Python (the reference backend serves every call)
  AGKD_CUDA=1     compile the CUDA kernels even when no GPU is visible (compile-only machines)
  AGKD_CUDA=0     never compile CUDA
  (unset)         compile CUDA when torch sees a GPU and a CUDA toolkit is found
  TORCH_CUDA_ARCH_LIST   CUDA archs; defaults to "8.0;9.0" when no GPU is visible
  AGKD_CUDA_EMULATION=1      also build agkd_ops._C_cuda_emu, a test-only extension that
                             compiles the same cuda/*.cu sources with the host compiler and
                             runs them on the CPU emulator in csrc/agkd/cuda_emu (select it
                             with AGKD_OPS_CUDA_EMULATION=1 at import)
  AGKD_CUDA_EMULATION=asan   the same, built with AddressSanitizer (run python with libasan
                             and libstdc++ in LD_PRELOAD; see the README)
"""
import glob
import os
import platform
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg):
    print(f"[agkd setup] {msg}", file=sys.stderr, flush=True)


def _resolve_cuda_home():
    """torch guesses CUDA_HOME as nvcc's grandparent folder; where nvcc on PATH is a
    wrapper or symlink (/usr/local/bin/nvcc) that guess has no headers or libraries.
    Take the first candidate that is a real toolkit."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = home
            return


def _autograd_sources():
    """Each op's C++ autograd (csrc/agkd/autograd): device-independent, in every build."""
    return sorted(glob.glob("csrc/agkd/autograd/*.cpp"))


def _extensions():
    if os.environ.get("AGKD_NO_EXT", "0") == "1":
        _log("AGKD_NO_EXT=1: pure-Python install, no native kernels")
        return [], {}

    _resolve_cuda_home()
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    want = os.environ.get("AGKD_CUDA")
    if want == "0":
        use_cuda, why = False, "AGKD_CUDA=0"
    elif want == "1":
        if CUDA_HOME is None:
            raise RuntimeError("AGKD_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME)")
        use_cuda, why = True, "AGKD_CUDA=1"
    else:
        use_cuda = torch.cuda.is_available() and CUDA_HOME is not None
        why = f"torch.cuda.is_available()={torch.cuda.is_available()}, CUDA_HOME={CUDA_HOME}"
    if use_cuda and not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "detected") if use_cuda else ""

    sources = ["csrc/agkd/ops.cpp"] + _autograd_sources() + sorted(glob.glob("csrc/agkd/cpu/*.cpp"))
    # -fno-trapping-math: the kernels never read FP exception flags, and without it GCC
    # will not if-convert float compares (clamps, NaN masks) in lane loops, so they stay
    # scalar. It changes no rounding.
    cxx = ["-O3", "-std=c++20", "-fvisibility=hidden", "-fno-trapping-math"]
    defines = [
        ("AGKD_CUDA_ARCHS", f'"{archs}"'),
        ("AGKD_TORCH_VERSION", f'"{torch.__version__}"'),
    ]
    link = []
    if platform.system() != "Darwin":
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if use_cuda:
        sources += sorted(glob.glob("csrc/agkd/cuda/*.cu"))
        defines.append(("AGKD_WITH_CUDA", "1"))
        ext_cls = CUDAExtension
        extra = {"cxx": cxx, "nvcc": ["-O3", "-std=c++20", "-lineinfo"]}
    else:
        ext_cls = CppExtension
        extra = {"cxx": cxx}
    _log(f"CPU kernels: yes (OpenMP: {'-fopenmp' in cxx}); CUDA kernels: "
         f"{'yes, archs ' + archs if use_cuda else 'no'} ({why})")
    ext = ext_cls(
        name="agkd_ops._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=defines,
        extra_compile_args=extra,
        extra_link_args=link,
        py_limited_api=True,
    )
    extensions = [ext]
    emulation = os.environ.get("AGKD_CUDA_EMULATION", "0")
    if emulation not in ("0", "1", "asan"):
        raise RuntimeError(f"AGKD_CUDA_EMULATION must be 0, 1 or asan, got {emulation!r}")
    if emulation != "0":
        extensions.append(_cuda_emulation_extension(CppExtension, cxx, defines, link, emulation == "asan"))
    return extensions, {"build_ext": BuildExtension}


def _cuda_emulation_extension(CppExtension, cxx, defines, link, asan):
    """agkd_ops._C_cuda_emu: the schemas and the unmodified cuda/*.cu kernels, compiled by
    the host compiler against csrc/agkd/cuda_emu (CUDA keywords, fibers for threads, shim
    c10/cuda headers) and registered for CPU tensors. Test-only: wheels never build it."""
    wrappers = os.path.join("build", "agkd_cuda_emu")
    os.makedirs(os.path.join(ROOT, wrappers), exist_ok=True)
    sources = (["csrc/agkd/ops.cpp", "csrc/agkd/cuda_emu/emulation.cpp", "csrc/agkd/cuda_emu/selftest.cpp"]
               + _autograd_sources())
    for cu in sorted(glob.glob("csrc/agkd/cuda/*.cu")):
        # A .cu file would be handed to nvcc; a one-line C++ wrapper includes it instead.
        name = os.path.splitext(os.path.basename(cu))[0]
        path = os.path.join(wrappers, f"{name}_emu.cpp")
        text = (f"// Generated by setup.py: {cu} on the CUDA emulator.\n"
                f'#include "agkd/cuda_emu/emulation.h"\n#include "agkd/{cu[len("csrc/agkd/"):]}"\n')
        if not os.path.exists(path) or open(path).read() != text:
            with open(path, "w") as f:
                f.write(text)
        sources.append(path)
    flags = [f for f in cxx if f != "-O3"] + ["-O2", "-Wno-unused-parameter"]
    if asan:
        flags += ["-fsanitize=address", "-fno-omit-frame-pointer"]
        link = link + ["-fsanitize=address"]
    _log(f"CUDA emulation extension: yes ({len(glob.glob('csrc/agkd/cuda/*.cu'))} .cu files{', AddressSanitizer' if asan else ''})")
    return CppExtension(
        name="agkd_ops._C_cuda_emu",
        sources=sources,
        # The shim headers must shadow torch's c10/cuda headers.
        include_dirs=[os.path.join(ROOT, "csrc", "agkd", "cuda_emu", "include"), os.path.join(ROOT, "csrc")],
        define_macros=[d for d in defines if d[0] != "AGKD_WITH_CUDA"]
        + [("AGKD_CUDA_EMULATION", "1"), ("AGKD_EXTENSION_NAME", "_C_cuda_emu")],
        extra_compile_args={"cxx": flags},
        extra_link_args=link,
        py_limited_api=True,
    )


ext_modules, cmdclass = _extensions()
setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
)
