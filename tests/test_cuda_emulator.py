"""The CPU emulator of CUDA reports what a GPU would do wrong or refuse: kernels that break
the rules on purpose (csrc/agkd/cuda_emu/selftest.cpp) must fail loudly, so that the CUDA
tests passing on the emulator means something. Runs only on the emulation build."""
import pytest
import torch

import agkd_ops

pytestmark = pytest.mark.skipif(not agkd_ops.build_info()["cuda_emulation"],
                                reason="needs the CPU emulation build with AGKD_OPS_CUDA_EMULATION=1")

ORDERS = ["forward", "reverse", "shuffle"]


def selftest(name):
    return torch.ops.agkd_cuda_emu.selftest(name)


@pytest.fixture(params=ORDERS)
def order(request, monkeypatch):
    monkeypatch.setenv("AGKD_CUDA_EMU_ORDER", request.param)
    return request.param


def test_a_divergent_barrier_is_an_error(order):
    with pytest.raises(RuntimeError, match=r"divergent __syncthreads\(\).* 32 of 64 threads wait at selftest.cpp"):
        selftest("divergent_barrier")


def test_a_missing_barrier_gives_wrong_values_in_every_order(order):
    good = selftest("mirror_with_barrier")
    salt = int(good[-1])  # thread 63 read thread 0's value: 0 + salt
    assert good.tolist() == [63 - t + salt for t in range(64)]
    bad = selftest("mirror_without_barrier")
    salt = salt + 1000
    assert bad.tolist() != [63 - t + salt for t in range(64)]


def test_a_write_past_dynamic_shared_memory_is_an_error(order):
    with pytest.raises(RuntimeError, match="wrote 4 bytes past its 128 bytes of dynamic shared memory"):
        selftest("shared_overflow")


@pytest.mark.parametrize("name,words", [
    ("too_many_threads", "invalid configuration argument: block (2048, 1, 1)"),
    ("grid_y_too_large", "invalid configuration argument: grid (1, 65536, 1)"),
    ("empty_grid", "invalid configuration argument: grid (0, 1, 1)"),
    ("shared_without_opt_in", "65536 bytes of dynamic shared memory, the kernel allows 49152"),
    ("opt_in_above_the_device_limit", "204800 is above the device's opt-in limit"),
])
def test_launches_beyond_the_device_limits_are_errors(name, words):
    with pytest.raises(RuntimeError) as info:
        selftest(name)
    assert words in str(info.value)


def test_opting_in_allows_more_dynamic_shared_memory():
    assert selftest("shared_with_opt_in").tolist() == [-1] * 64  # ran, wrote nothing


def test_an_unknown_order_is_an_error(monkeypatch):
    monkeypatch.setenv("AGKD_CUDA_EMU_ORDER", "sideways")
    with pytest.raises(RuntimeError, match="AGKD_CUDA_EMU_ORDER must be forward, reverse or shuffle"):
        agkd_ops.hybrid_loss(torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16))
