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


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() and agkd_ops.native_available("cuda"):
        return
    skip = pytest.mark.skip(reason="needs a CUDA device and the CUDA kernels")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def native_backend():
    """Run the test under set_backend('native'), so a silent fallback cannot pass."""
    previous = agkd_ops.get_backend()
    agkd_ops.set_backend("native")
    yield
    agkd_ops.set_backend(previous)
