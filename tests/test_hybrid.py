"""agkd::hybrid_fwd/bwd and the functions on it: ssim, ssim_loss, cosine_loss, hybrid_loss.

On every backend (tests/backends.py): values against a brute-force NumPy oracle and the
libraries users know (pytorch-msssim, kornia, scikit-image, torch.nn.functional), every
dtype against the float64 reference (on the reference backend: its low-precision paths),
gradcheck, NaN isolation, determinism. On the native backends: values and both gradients
against the float64 reference over random shapes, paddings, windows and strides, and checks
of the compiled op itself (opcheck, torch.compile, which gradients are computed, double
backward, the CUDA kernels' shared-memory limits)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import agkd_ops
from agkd_ops import reference as R

from .backends import (DTYPE_TOL, FLOAT_DTYPES, against_the_reference, assert_nan_stays_in_its_sample,
                       close, grads, layout, rounded)
from .oracle import cosine_per_sample, ssim_per_sample

PADDINGS = list(agkd_ops.PADDINGS)
LAYOUTS = ["contiguous", "transposed", "channels_last", "sliced"]


# ---------------------------------------------------------- against independent oracles


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("shape,window", [((2, 3, 13, 12), 11), ((3, 1, 9, 7), 5), ((1, 2, 4, 5), 3)])
def test_ssim_matches_bruteforce_oracle(backend, padding, shape, window):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    y = (x + 0.3 * torch.rand(shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    got = agkd_ops.ssim(x.to(backend.device), y.to(backend.device), window_size=window, sigma=1.2,
                        data_range=1.0, padding=padding, reduction="none")
    want = ssim_per_sample(x.numpy(), y.numpy(), window, 1.2, 1.0, padding=padding)
    np.testing.assert_allclose(got.cpu().numpy(), want, rtol=1e-12, atol=1e-12)


def test_ssim_matches_pytorch_msssim_valid(backend):
    pytorch_msssim = pytest.importorskip("pytorch_msssim")
    g = torch.Generator().manual_seed(2)
    x = torch.rand(4, 3, 40, 33, generator=g, dtype=torch.float64)
    y = torch.rand(4, 3, 40, 33, generator=g, dtype=torch.float64)
    want = pytorch_msssim.ssim(x, y, data_range=1.0, size_average=False)
    got = agkd_ops.ssim(x.to(backend.device), y.to(backend.device), reduction="none").cpu()
    # pytorch-msssim builds its Gaussian in float32 whatever the input dtype.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_ssim_matches_kornia_reflect(backend):
    kornia = pytest.importorskip("kornia")
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 2, 24, 31, generator=g, dtype=torch.float64)
    y = torch.rand(2, 2, 24, 31, generator=g, dtype=torch.float64)
    want = kornia.metrics.ssim(x, y, 11, max_val=1.0, eps=0.0, padding="same").flatten(1).mean(1)
    got = agkd_ops.ssim(x.to(backend.device), y.to(backend.device), padding="reflect", reduction="none").cpu()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_ssim_matches_scikit_image_valid(backend):
    metrics = pytest.importorskip("skimage.metrics")
    g = torch.Generator().manual_seed(4)
    x = torch.rand(1, 1, 32, 29, generator=g, dtype=torch.float64)
    y = torch.rand(1, 1, 32, 29, generator=g, dtype=torch.float64)
    want = metrics.structural_similarity(
        x[0, 0].numpy(), y[0, 0].numpy(), gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False, data_range=1.0)
    assert agkd_ops.ssim(x.to(backend.device), y.to(backend.device)).item() == pytest.approx(want, rel=1e-10)


def test_float32_ssim_matches_pytorch_msssim_and_kornia(backend):
    pytorch_msssim = pytest.importorskip("pytorch_msssim")
    kornia = pytest.importorskip("kornia")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 32, 32, generator=g)
    y = (x + 0.1 * torch.randn(4, 3, 32, 32, generator=g)).clamp(0, 1)
    dx, dy = x.to(backend.device), y.to(backend.device)
    torch.testing.assert_close(agkd_ops.ssim(dx, dy, reduction="none").cpu(),
                               pytorch_msssim.ssim(x, y, data_range=1.0, size_average=False),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        agkd_ops.ssim(dx, dy, padding="reflect", reduction="none").cpu(),
        kornia.metrics.ssim(x, y, 11, max_val=1.0, eps=0.0, padding="same").flatten(1).mean(1),
        rtol=1e-5, atol=1e-5)


@given(n=st.integers(1, 4), d=st.integers(1, 300), rank=st.integers(2, 5), seed=st.integers(0, 2**31 - 1),
       zero=st.booleans())
def test_cosine_matches_functional_and_oracle(backend, n, d, rank, seed, zero):
    g = torch.Generator().manual_seed(seed)
    shape = (n, d) + (1,) * (rank - 2)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    y = torch.randn(shape, generator=g, dtype=torch.float64)
    if zero:
        x[0] = 0  # norm clamped at eps: no self term in the gradient
    weights = torch.rand(n, generator=g, dtype=torch.float64)
    got = grads(lambda a, b: agkd_ops.cosine_loss(a, b, reduction="none"),
                x.to(backend.device), y.to(backend.device), weights=weights)
    want = grads(lambda a, b: 1 - F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1, eps=1e-8),
                 x, y, weights=weights)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b)
    np.testing.assert_allclose(got[0].cpu().numpy(), 1 - cosine_per_sample(x.numpy(), y.numpy()), rtol=1e-12,
                               atol=1e-15)


def test_hybrid_is_the_weighted_sum_of_the_oracles(backend):
    g = torch.Generator().manual_seed(6)
    x = torch.rand(3, 2, 16, 16, generator=g, dtype=torch.float64)
    y = torch.rand(3, 2, 16, 16, generator=g, dtype=torch.float64)
    want = 0.3 * (1 - ssim_per_sample(x.numpy(), y.numpy())) + 0.9 * (1 - cosine_per_sample(x.numpy(), y.numpy()))
    got = agkd_ops.hybrid_loss(x.to(backend.device), y.to(backend.device), ssim_weight=0.3, cosine_weight=0.9, reduction="none")
    np.testing.assert_allclose(got.cpu().numpy(), want, rtol=1e-12)


# ------------------------------------------------- against the float64 reference, swept


@st.composite
def map_case(draw, max_side=24):
    padding = draw(st.sampled_from(PADDINGS))
    window = draw(st.sampled_from([1, 3, 5, 7, 11]))
    lo = window if padding == "valid" else (window // 2 + 1 if padding == "reflect" else 1)
    h = draw(st.integers(lo, max(lo, max_side)))
    w = draw(st.integers(lo, max(lo, max_side)))
    n = draw(st.integers(1, 3))
    c = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(shape=(n, c, h, w), window=window, padding=padding, layout=draw(st.sampled_from(LAYOUTS)),
                expand=draw(st.booleans()), seed=seed)


@given(case=map_case(), ssim_weight=st.floats(0, 2), cosine_weight=st.floats(0, 2),
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_hybrid_matches_reference_on_random_maps(native, case, ssim_weight, cosine_weight, dtype):
    backend = native
    g = torch.Generator().manual_seed(case["seed"])
    n, c, h, w = case["shape"]
    x = rounded((1, 1, h, w) if case["expand"] else case["shape"], dtype, g).expand(n, c, h, w)
    y = rounded(case["shape"], dtype, g)
    kw = dict(ssim_weight=ssim_weight, cosine_weight=cosine_weight, window_size=case["window"], padding=case["padding"], reduction="none")
    weights = torch.rand(n, generator=g, dtype=torch.float64)
    want = grads(lambda a, b: R.hybrid_loss(a, b, **kw), x, y, weights=weights)
    dx = x.to(backend.device, dtype)  # stride-0 batch and channels when expanded
    dy = layout(y.to(backend.device, dtype), case["layout"])
    got = grads(lambda a, b: agkd_ops.hybrid_loss(a, b, **kw), dx, dy, weights=weights)
    assert got[0].dtype == dtype and got[0].shape == (n,)
    assert got[1].dtype == dtype and got[1].shape == x.shape
    # float32: room for the E[x²] - E[x]² cancellation every moment-based SSIM has at window 1.
    rtol, atol = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-3, 1e-4)}[dtype]
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double().cpu(), b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("padding", PADDINGS)
# 37x29 and 64x70 cross 16x16 CUDA tile seams (64 exactly on one); 7x5 is one partial tile.
@pytest.mark.parametrize("shape,window", [((3, 2, 37, 29), 11), ((2, 1, 7, 5), 3), ((2, 4, 64, 70), 7)])
@pytest.mark.parametrize("ssim_weight,cosine_weight", [(0.5, 0.5), (1.0, 0.0), (0.0, 1.0)])
def test_hybrid_matches_reference_in_every_dtype(backend, dtype, padding, shape, window, ssim_weight, cosine_weight):
    against_the_reference(backend, dtype)
    g = torch.Generator().manual_seed(0)
    x, y = rounded(shape, dtype, g), rounded(shape, dtype, g)
    weights = torch.rand(shape[0], generator=g, dtype=torch.float64)
    kw = dict(ssim_weight=ssim_weight, cosine_weight=cosine_weight, window_size=window, padding=padding, reduction="none")
    want = grads(lambda a, b: R.hybrid_loss(a, b, **kw), x, y, weights=weights)
    got = grads(lambda a, b: agkd_ops.hybrid_loss(a, b, **kw), x.to(backend.device, dtype),
                layout(y.to(backend.device, dtype), "transposed"), weights=weights)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    scale = max(want[1].abs().max().item(), want[2].abs().max().item()) + 1e-12
    close(got[0], want[0], DTYPE_TOL[dtype])
    close(got[1], want[1], DTYPE_TOL[dtype], scale)
    close(got[2], want[2], DTYPE_TOL[dtype], scale)


@given(case=map_case(max_side=16))
def test_ssim_and_ssim_loss_reductions_match_reference(native, case):
    backend = native
    g = torch.Generator().manual_seed(case["seed"])
    x = torch.rand(case["shape"], generator=g, dtype=torch.float64)
    y = (x + 0.2 * torch.rand(case["shape"], generator=g, dtype=torch.float64)).clamp(0, 1)
    kw = dict(window_size=case["window"], padding=case["padding"], sigma=0.9, data_range=2.0, k1=0.02, k2=0.05)
    dx, dy = layout(x.to(backend.device), case["layout"]), y.to(backend.device)
    for reduction in ["none", "mean", "sum"]:
        torch.testing.assert_close(agkd_ops.ssim(dx, dy, reduction=reduction, **kw).cpu(),
                                   R.ssim(x, y, reduction=reduction, **kw), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(agkd_ops.ssim_loss(dx, dy, reduction=reduction, **kw).cpu(),
                                   R.ssim_loss(x, y, reduction=reduction, **kw), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_float32(backend, dtype):
    # Values around 100 with data_range=255: E[x²] - E[x]² in half precision would lose
    # the variance entirely; every backend accumulates in float32.
    g = torch.Generator().manual_seed(0)
    x = (100 + 10 * torch.rand(4, 2, 20, 20, generator=g)).to(dtype)
    y = (100 + 10 * torch.rand(4, 2, 20, 20, generator=g)).to(dtype)
    got = agkd_ops.ssim(x.to(backend.device), y.to(backend.device), data_range=255, reduction="none")
    want = R.ssim(x.double(), y.double(), data_range=255, reduction="none")
    assert got.dtype == dtype
    torch.testing.assert_close(got.double().cpu(), want, rtol=0, atol=1e-2 if dtype == torch.bfloat16 else 2e-3)


def test_large_planes_span_several_row_tiles(backend):
    # 150 rows > the CPU kernel's 64-row work items: tile seams must not show.
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 150, 20, generator=g, dtype=torch.float64)
    y = torch.rand(1, 1, 150, 20, generator=g, dtype=torch.float64)
    for padding in PADDINGS:
        kw = dict(padding=padding, reduction="none")
        got = grads(lambda a, b: agkd_ops.hybrid_loss(a, b, **kw), x.to(backend.device), y.to(backend.device))
        want = grads(lambda a, b: R.hybrid_loss(a, b, **kw), x, y)
        for a, b in zip(got, want):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-13)


def test_wide_window(backend):
    # float64 with window 31: on CUDA the backward stages 4·46² + 4·46·16 doubles (91 KiB),
    # beyond the 48 KiB a kernel gets without cudaFuncSetAttribute.
    g = torch.Generator().manual_seed(2)
    x, y = rounded((1, 2, 40, 33), torch.float64, g), rounded((1, 2, 40, 33), torch.float64, g)
    kw = dict(window_size=31, sigma=4.0, padding="zeros", reduction="none")
    want = grads(lambda a, b: R.hybrid_loss(a, b, **kw), x, y)
    got = grads(lambda a, b: agkd_ops.hybrid_loss(a, b, **kw), x.to(backend.device), y.to(backend.device))
    for a, b in zip(got, want):
        close(a, b, 1e-10)


# ------------------------------------------------------------ gradients, NaN, determinism


@pytest.mark.parametrize("padding", PADDINGS)
def test_gradcheck_float64(backend, padding):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 2, 9, 8, generator=g, dtype=torch.float64).to(backend.device).requires_grad_(True)
    y = torch.rand(2, 2, 9, 8, generator=g, dtype=torch.float64).to(backend.device).requires_grad_(True)
    fn = lambda a, b: agkd_ops.hybrid_loss(a, b, ssim_weight=0.6, cosine_weight=0.8, window_size=5, padding=padding,
                                           reduction="none")
    assert torch.autograd.gradcheck(fn, (x, y))


def test_nan_in_one_sample_leaves_others_bitwise_unchanged(backend):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, 16, 16, generator=g).to(backend.device)
    y = torch.rand(3, 2, 16, 16, generator=g).to(backend.device)
    assert_nan_stays_in_its_sample(lambda a, b: agkd_ops.hybrid_loss(a, b, reduction="none", padding="zeros"),
                                   (x, y), 0, (1, 0, 5, 5))


def test_bitwise_deterministic(backend):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 70, 45, generator=g).to(backend.device)
    y = torch.rand(6, 3, 70, 45, generator=g).to(backend.device)
    runs = [grads(lambda a, b: agkd_ops.hybrid_loss(a, b, padding="reflect"), x, y) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ the compiled op


@pytest.mark.parametrize("ssim_weight,cosine_weight,reduction", [(0.5, 0.5, "mean"), (1.0, 0.0, "none"), (0.0, 1.0, "sum")])
def test_opcheck(native, ssim_weight, cosine_weight, reduction):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, 12, 11, generator=g).to(native.device).requires_grad_(True)
    y = torch.rand(3, 2, 12, 11, generator=g).to(native.device).requires_grad_(True)
    args = (x, y, ssim_weight, cosine_weight, 5, 1.5, 1e-4, 9e-4, "reflect", 1e-8, reduction)
    torch.library.opcheck(torch.ops.agkd.hybrid_fwd, args)
    loss, stats = torch.ops.agkd.hybrid_fwd(*args)
    bwd_args = (torch.rand(3, device=native.device), x.detach(), y.detach(), stats) + args[2:-1] + (True, False)
    torch.library.opcheck(torch.ops.agkd.hybrid_bwd, bwd_args, test_utils=("test_schema", "test_faketensor"))


def test_zero_weights_give_zero_loss_and_gradients(native):
    # Both terms off is a valid direct call: no work, zeros, like the reference.
    x = torch.rand(2, 1, 9, 9, dtype=torch.float64, device=native.device)
    loss, stats = torch.ops.agkd.hybrid_fwd(x, x.flip(0), 0.0, 0.0, 3, 1.5, 1e-4, 9e-4, "valid", 1e-8, "none")
    assert torch.equal(loss, torch.zeros_like(loss)) and stats.shape == (2, 3)
    gx, gy = torch.ops.agkd.hybrid_bwd(torch.ones_like(loss), x, x.flip(0), stats, 0.0, 0.0, 3, 1.5, 1e-4,
                                       9e-4, "valid", 1e-8, True, True)
    assert torch.equal(gx, torch.zeros_like(x)) and torch.equal(gy, torch.zeros_like(x))


def test_torch_compile_fullgraph(native):
    criterion = agkd_ops.HybridLoss(ssim_weight=0.5, cosine_weight=0.5, padding="zeros")

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(x, y):
        return criterion(x, y)

    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 14, 14, generator=g).to(native.device).requires_grad_(True)
    y = torch.rand(4, 1, 14, 14, generator=g).to(native.device)
    loss = step(x, y)
    loss.backward()
    x2 = x.detach().clone().requires_grad_(True)
    want = criterion(x2, y)
    want.backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.parametrize("which", ["x", "y"])
def test_one_gradient_alone_equals_that_of_both(native, which):
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 18, 18, generator=g).to(native.device)
    y = torch.rand(2, 3, 18, 18, generator=g).to(native.device)
    both = grads(lambda a, b: agkd_ops.hybrid_loss(a, b, reduction="none"), x, y)
    a, b = x.clone().requires_grad_(which == "x"), y.clone().requires_grad_(which == "y")
    agkd_ops.hybrid_loss(a, b, reduction="none").sum().backward()
    alone = a.grad if which == "x" else b.grad
    assert (b.grad if which == "x" else a.grad) is None
    assert torch.equal(alone, both[1] if which == "x" else both[2])


def test_double_backward_raises_clearly(native):
    x = torch.rand(2, 1, 12, 12, dtype=torch.float64, device=native.device, requires_grad=True)
    y = torch.rand(2, 1, 12, 12, dtype=torch.float64, device=native.device)
    (gx,) = torch.autograd.grad(agkd_ops.ssim_loss(x, y), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        gx.sum().backward()


@pytest.mark.cuda_kernels
def test_window_beyond_shared_memory_is_a_clear_error(kernel_device):
    # A float64 window of 81 needs 336 KiB of shared memory per block in the CUDA backward,
    # beyond every GPU's opt-in limit (sm_80: 163 KiB, sm_90: 227 KiB). A window of 61
    # (219 KiB) fits on an H100 but not on an A100, so it would test the device, not the check.
    previous = agkd_ops.get_backend()
    agkd_ops.set_backend("native")
    try:
        x = torch.rand(1, 1, 90, 90, dtype=torch.float64, device=kernel_device, requires_grad=True)
        with pytest.raises(RuntimeError, match="shared memory"):
            agkd_ops.hybrid_loss(x, x.detach(), window_size=81, sigma=8.0).backward()
    finally:
        agkd_ops.set_backend(previous)
