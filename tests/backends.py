"""The backends every op's tests run on, and the helpers and assertions those tests share.

A backend is a way to compute an op: ``reference`` (agkd_ops.set_backend("reference"),
plain PyTorch on the CPU), ``native-cpu`` (the C++ kernels), ``cuda-emulated`` (the CUDA
kernels on the CPU emulator: a build with AGKD_CUDA_EMULATION=1, run with
AGKD_OPS_CUDA_EMULATION=1, where it takes the CPU tensors' native calls) and ``cuda`` (a
GPU). The ``backend`` fixture (conftest.py) runs a test once per backend this session
has; ``native`` only on the compiled ones.
"""
from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

import agkd_ops


class Backend(NamedTuple):
    name: str            # reference, native-cpu, cuda-emulated or cuda
    mode: str            # what agkd_ops.set_backend receives
    device: torch.device

    @property
    def native(self) -> bool:
        return self.mode == "native"

    @property
    def cuda_kernels(self) -> bool:
        """Whether calls run the CUDA kernels (on a GPU or on the emulator)."""
        return self.name in ("cuda", "cuda-emulated")


def _emulated() -> bool:
    return bool(agkd_ops.build_info()["cuda_emulation"])


def backend_params(*, native_only: bool = False):
    """pytest params for the backends, each skipped where this session lacks it."""
    emulated = _emulated()
    gpu = torch.cuda.is_available() and agkd_ops.native_available("cuda")
    params = []
    if not native_only:
        # Under emulation every native CPU call runs the CUDA kernels; the reference was
        # covered by the plain run.
        params.append(pytest.param(Backend("reference", "reference", torch.device("cpu")), id="reference",
                                   marks=pytest.mark.skipif(emulated, reason="run without emulation")))
    cpu_name = "cuda-emulated" if emulated else "native-cpu"
    params.append(pytest.param(Backend(cpu_name, "native", torch.device("cpu")), id=cpu_name,
                               marks=pytest.mark.skipif(not agkd_ops.native_available("cpu"),
                                                        reason="agkd_ops._C not built (AGKD_NO_EXT=1)")))
    params.append(pytest.param(Backend("cuda", "native", torch.device("cuda")), id="cuda",
                               marks=pytest.mark.skipif(not gpu, reason="needs a CUDA device and the CUDA kernels")))
    return params


def against_the_reference(backend: Backend, dtype: torch.dtype) -> None:
    """For sweeps that compare ``backend`` in ``dtype`` with the float64 reference: on the
    reference backend the float64 case would compare the reference with itself, so it is
    skipped there (its low-precision cases check the reference's own dtype handling)."""
    if not backend.native and dtype == torch.float64:
        pytest.skip("the float64 reference against itself")


# Inputs are rounded to the tested dtype first, so these bound the kernels' float32 (or
# float64) accumulation, plus the rounding of the outputs and gradients to that dtype.
DTYPE_TOL = {torch.float64: 1e-10, torch.float32: 2e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def rounded(shape, dtype, generator, scale=1.0, randn=False) -> torch.Tensor:
    """A float64 tensor holding values exactly representable in ``dtype``."""
    make = torch.randn if randn else torch.rand
    return (scale * make(shape, generator=generator, dtype=torch.float64)).to(dtype).double()


def grads(fn, *inputs, weights=None):
    """``fn(*inputs)`` (detached) and the gradients of ``sum(weights * fn)`` for every input."""
    inputs = [t.detach().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    w = torch.ones_like(out, dtype=torch.float64) if weights is None else weights.to(out.device)
    return (out.detach(), *torch.autograd.grad((out.double() * w).sum(), inputs))


def assert_nan_stays_in_its_sample(fn, inputs, k, where):
    """``fn`` (per-sample values) of ``inputs`` with a NaN written into ``inputs[k]`` at
    ``where``: that sample's value is NaN, and every other sample's value and gradients are
    bitwise what they were. Returns the values and gradients with the NaN."""
    bad = list(inputs)
    bad[k] = inputs[k].clone()
    bad[k][where] = float("nan")
    clean, dirty = grads(fn, *inputs), grads(fn, *bad)
    n = where[0]
    others = [i for i in range(inputs[0].shape[0]) if i != n]
    assert torch.isnan(dirty[0][n])
    for a, b in zip(dirty, clean):
        assert torch.equal(a[others], b[others])
    return dirty


def close(got, want, tol, scale=None) -> None:
    """``got`` (any device and dtype) against float64 ``want``: relative ``tol``, absolute
    ``tol`` (times ``scale`` for gradients, whose size varies)."""
    atol = tol if scale is None else tol * scale
    torch.testing.assert_close(got.double().cpu(), want.double().cpu(), rtol=tol, atol=atol)


def layout(t: torch.Tensor, name: str) -> torch.Tensor:
    """``t`` (N, C, H, W) with the same values in another memory layout."""
    n, c, h, w = t.shape
    if name == "transposed":  # H and W strides swapped
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    if name == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if name == "sliced":
        wide = torch.zeros(n, c, h, 2 * w, dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t.contiguous()


def assert_clear_error(call, exc, words):
    """``call()`` raises ``exc`` with a message that starts with the public function
    (``agkd_ops.<fn>``) and contains every one of ``words``."""
    with pytest.raises(exc) as info:
        call()
    message = str(info.value)
    assert message.startswith("agkd_ops."), message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    return message
