import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import agkd_ops

from .backends import backend_params

# Property tests are sized for a 2-core CI machine; AGKD_HYPOTHESIS_PROFILE=thorough
# runs more examples.
# The backend fixtures only choose where a test runs, so they may outlive one example.
_fixtures_ok = [HealthCheck.function_scoped_fixture]
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True,
                          suppress_health_check=_fixtures_ok)
settings.register_profile("thorough", max_examples=400, deadline=None, suppress_health_check=_fixtures_ok)
settings.load_profile(os.environ.get("AGKD_HYPOTHESIS_PROFILE", "ci"))


def _cuda_kernel_device():
    """Where this session runs the CUDA kernels: "cpu" under the CPU emulator
    (AGKD_OPS_CUDA_EMULATION=1, which then serves every native call on CPU tensors),
    "cuda" on a GPU, None where neither is there."""
    if agkd_ops.build_info()["cuda_emulation"]:
        return "cpu"
    if torch.cuda.is_available() and agkd_ops.native_available("cuda"):
        return "cuda"
    return None


def pytest_collection_modifyitems(config, items):
    gpu = torch.cuda.is_available() and agkd_ops.native_available("cuda")
    kernels = _cuda_kernel_device() is not None
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device and the CUDA kernels")
    skip_kernels = pytest.mark.skip(
        reason="needs a CUDA device, or the CPU emulation build with AGKD_OPS_CUDA_EMULATION=1")
    for item in items:
        if "cuda" in item.keywords and not gpu:
            item.add_marker(skip_gpu)
        elif "cuda_kernels" in item.keywords and not kernels:
            item.add_marker(skip_kernels)


@pytest.fixture(scope="session")
def kernel_device():
    """The device whose tensors reach the CUDA kernels: a GPU, or the CPU emulator."""
    device = _cuda_kernel_device()
    if device is None:
        pytest.skip("needs a CUDA device or the CUDA emulator")
    return torch.device(device)


def _use(backend):
    previous = agkd_ops.get_backend()
    agkd_ops.set_backend(backend.mode)
    return previous


@pytest.fixture(params=backend_params())
def backend(request):
    """Each backend this session has (tests/backends.py), selected with set_backend, so a
    silent fallback from native to the reference cannot pass."""
    previous = _use(request.param)
    yield request.param
    agkd_ops.set_backend(previous)


@pytest.fixture(params=backend_params(native_only=True))
def native(request):
    """Each compiled backend: native CPU (or the CUDA emulator) and a GPU."""
    previous = _use(request.param)
    yield request.param
    agkd_ops.set_backend(previous)
