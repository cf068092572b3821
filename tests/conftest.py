import os

import pytest
import torch
from hypothesis import settings

import agkd_ops

# Property tests are sized for a 2-core CI machine; AGKD_HYPOTHESIS_PROFILE=thorough
# runs more examples.
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True)
settings.register_profile("thorough", max_examples=400, deadline=None)
settings.load_profile(os.environ.get("AGKD_HYPOTHESIS_PROFILE", "ci"))

requires_native_cpu = pytest.mark.skipif(
    not agkd_ops.native_available("cpu"),
    reason="agkd_ops._C not built (AGKD_NO_EXT=1 install)",
)


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


@pytest.fixture
def native_backend():
    """Run the test under set_backend('native'), so a silent fallback cannot pass."""
    previous = agkd_ops.get_backend()
    agkd_ops.set_backend("native")
    yield
    agkd_ops.set_backend(previous)
