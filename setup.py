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
import importlib.util
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_build_config():
    """agkd_ops/_build.py, the sources and flags shared with the compile-on-first-use
    fallback, loaded by path: the package cannot be imported before it is built."""
    spec = importlib.util.spec_from_file_location("agkd_build", os.path.join(ROOT, "agkd_ops", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _load_build_config()


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


class BuildPyWithSources(build_py):
    """Ships the kernel sources (csrc/agkd, without the test-only emulator) inside the
    package as agkd_ops/_csrc, so that an install without compiled kernels, or whose
    kernels no longer load against the installed torch, can compile them on first use."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):  # an editable install reads csrc/ from the checkout
            return
        target = os.path.join(self.build_lib, "agkd_ops", "_csrc", "agkd")
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(os.path.join(ROOT, "csrc", "agkd"), target,
                        ignore=shutil.ignore_patterns("cuda_emu", "__pycache__"))


def _extensions():
    if os.environ.get("AGKD_NO_EXT", "0") == "1":
        _log("AGKD_NO_EXT=1: pure-Python install, no native kernels")
        return [], {"build_py": BuildPyWithSources}

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

    sources = build.cpu_sources("csrc")  # setuptools wants paths relative to setup.py
    cxx = build.cxx_flags()
    defines = build.defines(archs, torch.__version__)
    link = build.link_flags()
    if use_cuda:
        sources += build.cuda_sources("csrc")
        defines.append(("AGKD_WITH_CUDA", "1"))
        ext_cls = CUDAExtension
        extra = {"cxx": cxx, "nvcc": build.NVCC_FLAGS}
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
    return extensions, {"build_ext": BuildExtension, "build_py": BuildPyWithSources}


def _cuda_emulation_extension(CppExtension, cxx, defines, link, asan):
    """agkd_ops._C_cuda_emu: the schemas and the unmodified cuda/*.cu kernels, compiled by
    the host compiler against csrc/agkd/cuda_emu (CUDA keywords, fibers for threads, shim
    c10/cuda headers) and registered for CPU tensors. Test-only: wheels never build it."""
    wrappers = os.path.join("build", "agkd_cuda_emu")
    os.makedirs(os.path.join(ROOT, wrappers), exist_ok=True)
    sources = (["csrc/agkd/ops.cpp", "csrc/agkd/cuda_emu/emulation.cpp", "csrc/agkd/cuda_emu/selftest.cpp"]
               + build.autograd_sources("csrc"))
    for cu in build.cuda_sources("csrc"):
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
    _log(f"CUDA emulation extension: yes ({len(build.cuda_sources('csrc'))} .cu files{', AddressSanitizer' if asan else ''})")
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
