"""Where the kernels come from (agkd_ops/_backend.py): prebuilt, compiled on first use, or
none with the reference serving and one warning. The real compile-on-first-use of an
install without kernels runs in .ci/ops_only (it takes minutes); here the compile step is
replaced, so that each outcome's bookkeeping is checked in a second."""
import glob
import os
import warnings

import pytest
import torch

import agkd_ops
from agkd_ops import _backend, _build, reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREBUILT = _backend._C  # before any test patches it
needs_native = pytest.mark.skipif(PREBUILT is None, reason="agkd_ops._C not built")


@pytest.fixture
def no_kernels_yet(monkeypatch):
    """The state of a package installed without compiled kernels, before its first call."""
    monkeypatch.setattr(_backend, "_C", None)
    monkeypatch.setattr(_backend, "_KERNELS", frozenset())
    monkeypatch.setattr(_backend, "_KERNELS_FROM", "pending")
    monkeypatch.setattr(_backend, "_JIT_ERROR", None)
    monkeypatch.setattr(_backend, "_WARNED_NO_KERNELS", False)
    monkeypatch.setattr(_backend, "_backend", "auto")


def _maps():
    torch.manual_seed(0)
    return torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16)


def test_a_failed_compile_leaves_the_reference_serving_with_one_warning(no_kernels_yet, monkeypatch):
    calls = []

    def compile_fails():
        calls.append(1)
        raise RuntimeError("Error building extension 'agkd_ops_jit': [1/12] c++ ... -c ops.cpp\n"
                           "ops.cpp:1:10: fatal error: torch/library.h: No such file or directory\nninja: stopped")

    monkeypatch.setattr(_backend, "_compile_kernels", compile_fails)
    x, y = _maps()
    assert agkd_ops.build_info()["kernels"] == "pending"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        values = [agkd_ops.hybrid_loss(x, y) for _ in range(3)]
    assert len(calls) == 1, "a failed compile is tried once per process"
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert caught[0].filename == __file__, "the warning points at the caller's line"
    assert "torch/library.h: No such file" in messages[0] and "reference serves" in messages[0]
    info = agkd_ops.build_info()
    assert info["kernels"] == "none" and "Error building extension" in info["compile_error"]
    for value in values:
        torch.testing.assert_close(value, reference.hybrid_loss(x, y), rtol=0, atol=0)


def test_the_native_backend_says_why_there_is_no_kernel(no_kernels_yet, monkeypatch):
    monkeypatch.setattr(_backend, "_KERNELS_FROM", "none")
    monkeypatch.setenv("AGKD_OPS_JIT", "0")
    agkd_ops.set_backend("native")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the error says it; no warning besides
        with pytest.raises(NotImplementedError, match=r"hybrid_fwd.*AGKD_OPS_JIT=0 kept them from being compiled"):
            agkd_ops.hybrid_loss(*_maps())


@needs_native
def test_a_compile_on_first_use_serves_the_native_kernels(no_kernels_yet, monkeypatch):
    calls = []

    def compile_succeeds():
        calls.append(1)
        return PREBUILT  # the library the real compile builds (.ci/ops_only runs that)

    monkeypatch.setattr(_backend, "_compile_kernels", compile_succeeds)
    assert not agkd_ops.build_info()["cpu"]
    x, y = _maps()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when the kernels arrive
        agkd_ops.hybrid_loss(x, y)
        agkd_ops.set_backend("native")  # from now on the kernels must serve
        value = agkd_ops.hybrid_loss(x, y)
    assert len(calls) == 1
    info = agkd_ops.build_info()
    assert info["kernels"] == "jit" and info["cpu"] and info["compiled"]
    torch.testing.assert_close(value, reference.hybrid_loss(x, y))


def test_native_available_compiles_pending_kernels_and_build_info_does_not(no_kernels_yet, monkeypatch):
    calls = []
    monkeypatch.setattr(_backend, "_compile_kernels", lambda: calls.append(1) or (_ for _ in ()).throw(OSError("no")))
    agkd_ops.build_info()
    assert calls == [], "build_info reports; it does not compile"
    assert agkd_ops.native_available("cpu") is False
    assert calls == [1] and agkd_ops.build_info()["kernels"] == "none"


def test_the_reference_backend_chosen_on_purpose_neither_compiles_nor_warns(no_kernels_yet, monkeypatch):
    monkeypatch.setattr(_backend, "_compile_kernels", lambda: pytest.fail("compiled under the reference backend"))
    agkd_ops.set_backend("reference")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        agkd_ops.hybrid_loss(*_maps())
    assert agkd_ops.build_info()["kernels"] == "pending"


def test_each_reason_for_no_kernels_is_named(no_kernels_yet, monkeypatch):
    monkeypatch.setattr(_backend, "_kernel_sources", lambda: None)
    assert "ships no kernel sources" in _backend._why_no_kernels()
    monkeypatch.setattr(_backend, "_kernel_sources", lambda: "csrc")
    monkeypatch.setenv("AGKD_OPS_JIT", "0")
    assert "AGKD_OPS_JIT=0" in _backend._why_no_kernels()
    monkeypatch.setenv("AGKD_OPS_JIT", "yes")
    with pytest.raises(ValueError, match="AGKD_OPS_JIT must be 0 or 1, got 'yes'"):
        _backend._jit_requested()


def test_setup_and_the_first_use_compile_build_the_same_sources():
    """Both read agkd_ops/_build.py; it must list every kernel file of the checkout."""
    csrc = os.path.join(ROOT, "csrc")
    listed = set(_build.cpu_sources(csrc))
    on_disk = {os.path.join(csrc, "agkd", "ops.cpp")}
    for folder in ("cpu", "autograd"):
        on_disk |= set(glob.glob(os.path.join(csrc, "agkd", folder, "*.cpp")))
    assert listed == on_disk
    assert set(_build.cuda_sources(csrc)) == set(glob.glob(os.path.join(csrc, "agkd", "cuda", "*.cu")))
    assert not any("cuda_emu" in path for path in listed), "the emulator is test-only"
    assert _backend._kernel_sources() is not None, "a checkout compiles from its own csrc/"
