"""Native kernels (agkd::hybrid_fwd/bwd) against the reference: values and the gradients
of both inputs over random shapes, paddings, windows, strides and dtypes; gradcheck,
opcheck, torch.compile, determinism, NaN isolation and parity with the libraries users
know. Every test runs under set_backend('native') so a silent fallback cannot pass."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import agkd_ops
from agkd_ops import reference as R

from .conftest import requires_native_cpu

pytestmark = [requires_native_cpu, pytest.mark.usefixtures("native_backend")]

PADDINGS = ["valid", "reflect", "zeros"]
# Low-precision results are compared with the float64 reference on the same (rounded)
# values, i.e. with the exact answer; the float32 bound allows for the E[x²] - E[x]²
# cancellation that every moment-based SSIM has at window_size=1.
TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-3, 1e-4)}


@st.composite
def map_case(draw, max_side=24):
    padding = draw(st.sampled_from(PADDINGS))
    window = draw(st.sampled_from([1, 3, 5, 7, 11]))
    lo = window if padding == "valid" else (window // 2 + 1 if padding == "reflect" else 1)
    h = draw(st.integers(lo, max(lo, max_side)))
    w = draw(st.integers(lo, max(lo, max_side)))
    n = draw(st.integers(1, 3))
    c = draw(st.integers(1, 8))
    layout = draw(st.sampled_from(["contiguous", "transposed", "channels_last", "expanded", "sliced"]))
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(shape=(n, c, h, w), window=window, padding=padding, layout=layout, seed=seed)


def make_input(shape, layout, generator, dtype):
    n, c, h, w = shape
    if layout == "transposed":  # non-contiguous: H and W strides swapped
        t = torch.rand(n, c, w, h, generator=generator, dtype=torch.float64).transpose(2, 3)
    elif layout == "channels_last":
        t = torch.rand(shape, generator=generator, dtype=torch.float64).to(memory_format=torch.channels_last)
    elif layout == "expanded":  # stride-0 batch and channel dimensions
        t = torch.rand(1, 1, h, w, generator=generator, dtype=torch.float64).expand(n, c, h, w)
    elif layout == "sliced":
        t = torch.rand(n, c, h, 2 * w, generator=generator, dtype=torch.float64)[..., ::2]
    else:
        t = torch.rand(shape, generator=generator, dtype=torch.float64)
    return t.to(dtype)


def both_grads(fn, x, y, weights):
    x = x.detach().requires_grad_(True)
    y = y.detach().requires_grad_(True)
    out = fn(x, y)
    gx, gy = torch.autograd.grad((out.double() * weights).sum(), (x, y))
    return out, gx, gy


@given(case=map_case(), alpha=st.floats(0, 2), beta=st.floats(0, 2),
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_hybrid_native_matches_reference(case, alpha, beta, dtype):
    g = torch.Generator().manual_seed(case["seed"])
    x = make_input(case["shape"], case["layout"], g, dtype)
    y = make_input(case["shape"], "contiguous", g, dtype)
    kw = dict(alpha=alpha, beta=beta, window_size=case["window"], padding=case["padding"], reduction="none")
    weights = torch.rand(case["shape"][0], generator=g, dtype=torch.float64)
    out, gx, gy = both_grads(lambda a, b: agkd_ops.hybrid_loss(a, b, **kw), x, y, weights)
    ref, rgx, rgy = both_grads(lambda a, b: R.hybrid_loss(a, b, **kw), x.double(), y.double(), weights)
    rtol, atol = TOL[dtype]
    assert out.dtype == dtype and out.shape == (case["shape"][0],)
    assert gx.dtype == dtype and gx.shape == x.shape
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(gx.double(), rgx, rtol=rtol, atol=atol)
    torch.testing.assert_close(gy.double(), rgy, rtol=rtol, atol=atol)


@given(case=map_case(max_side=16))
def test_ssim_and_ssim_loss_native_match_reference(case):
    g = torch.Generator().manual_seed(case["seed"])
    x = make_input(case["shape"], case["layout"], g, torch.float64)
    y = (x + 0.2 * torch.rand(case["shape"], generator=g, dtype=torch.float64)).clamp(0, 1)
    kw = dict(window_size=case["window"], padding=case["padding"], sigma=0.9, data_range=2.0, k1=0.02, k2=0.05)
    for reduction in ["none", "mean", "sum"]:
        torch.testing.assert_close(agkd_ops.ssim(x, y, reduction=reduction, **kw),
                                   R.ssim(x, y, reduction=reduction, **kw), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(agkd_ops.ssim_loss(x, y, reduction=reduction, **kw),
                                   R.ssim_loss(x, y, reduction=reduction, **kw), rtol=1e-10, atol=1e-12)


@given(n=st.integers(1, 4), d=st.integers(1, 300), rank=st.integers(2, 5), seed=st.integers(0, 2**31 - 1),
       zero=st.booleans())
def test_cosine_native_matches_functional(n, d, rank, seed, zero):
    g = torch.Generator().manual_seed(seed)
    shape = (n, d) + (1,) * (rank - 2)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    y = torch.randn(shape, generator=g, dtype=torch.float64)
    if zero:
        x[0] = 0  # norm clamped at eps: no self term in the gradient
    weights = torch.rand(n, generator=g, dtype=torch.float64)
    out, gx, gy = both_grads(lambda a, b: agkd_ops.cosine_loss(a, b, reduction="none"), x, y, weights)
    want, wgx, wgy = both_grads(
        lambda a, b: 1 - F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1, eps=1e-8), x, y, weights)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(gx, wgx)
    torch.testing.assert_close(gy, wgy)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_float32(dtype):
    # Values around 100 with data_range=255: E[x²] - E[x]² in half precision would lose
    # the variance entirely; the kernels accumulate in float32.
    g = torch.Generator().manual_seed(0)
    x = (100 + 10 * torch.rand(4, 2, 20, 20, generator=g)).to(dtype)
    y = (100 + 10 * torch.rand(4, 2, 20, 20, generator=g)).to(dtype)
    got = agkd_ops.ssim(x, y, data_range=255, reduction="none")
    want = R.ssim(x.double(), y.double(), data_range=255, reduction="none")
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-2 if dtype == torch.bfloat16 else 2e-3)


@pytest.mark.parametrize("padding", PADDINGS)
def test_gradcheck_float64(padding):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 2, 9, 8, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.rand(2, 2, 9, 8, generator=g, dtype=torch.float64, requires_grad=True)
    fn = lambda a, b: agkd_ops.hybrid_loss(a, b, alpha=0.6, beta=0.8, window_size=5, padding=padding, reduction="none")
    assert torch.autograd.gradcheck(fn, (x, y))


@pytest.mark.parametrize("alpha,beta", [(0.5, 0.5), (1.0, 0.0), (0.0, 1.0)])
def test_opcheck(alpha, beta):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, 12, 11, generator=g, requires_grad=True)
    y = torch.rand(3, 2, 12, 11, generator=g, requires_grad=True)
    args = (x, y, alpha, beta, 5, 1.5, 1e-4, 9e-4, "reflect", 1e-8)
    torch.library.opcheck(torch.ops.agkd.hybrid_fwd, args)
    loss, stats = torch.ops.agkd.hybrid_fwd(*args)
    bwd_args = (torch.rand(3), x.detach(), y.detach(), stats) + args[2:] + (True, False)
    torch.library.opcheck(torch.ops.agkd.hybrid_bwd, bwd_args,
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph():
    criterion = agkd_ops.HybridLoss(alpha=0.5, beta=0.5, padding="zeros")

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(x, y):
        return criterion(x, y)

    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 14, 14, generator=g, requires_grad=True)
    y = torch.rand(4, 1, 14, 14, generator=g)
    loss = step(x, y)
    loss.backward()
    x2 = x.detach().clone().requires_grad_(True)
    want = criterion(x2, y)
    want.backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(x.grad, x2.grad)


def test_bitwise_deterministic():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 70, 45, generator=g, requires_grad=True)
    y = torch.rand(6, 3, 70, 45, generator=g, requires_grad=True)
    runs = []
    for _ in range(2):
        x.grad = y.grad = None
        loss = agkd_ops.hybrid_loss(x, y, padding="reflect")
        loss.backward()
        runs.append((loss.detach().clone(), x.grad.clone(), y.grad.clone()))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_nan_in_one_sample_leaves_others_bitwise_unchanged():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, 16, 16, generator=g)
    y = torch.rand(3, 2, 16, 16, generator=g)
    bad = x.clone()
    bad[1, 0, 5, 5] = float("nan")

    def run(a):
        a = a.clone().requires_grad_(True)
        out = agkd_ops.hybrid_loss(a, y, reduction="none", padding="zeros")
        out.sum().backward()
        return out.detach(), a.grad

    clean_out, clean_grad = run(x)
    bad_out, bad_grad = run(bad)
    assert torch.isnan(bad_out[1])
    assert torch.equal(bad_out[[0, 2]], clean_out[[0, 2]])
    assert torch.equal(bad_grad[[0, 2]], clean_grad[[0, 2]])


def test_only_requested_gradients_are_computed():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 12, 12, generator=g, requires_grad=True)
    teacher = torch.rand(2, 1, 12, 12, generator=g)
    agkd_ops.hybrid_loss(x, teacher).backward()
    assert x.grad is not None and teacher.grad is None
    x2 = x.detach().clone().requires_grad_(True)
    R.hybrid_loss(x2, teacher).backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_double_backward_raises_clearly():
    x = torch.rand(2, 1, 12, 12, dtype=torch.float64, requires_grad=True)
    y = torch.rand(2, 1, 12, 12, dtype=torch.float64)
    (gx,) = torch.autograd.grad(agkd_ops.ssim_loss(x, y), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        gx.sum().backward()


def test_native_parity_with_pytorch_msssim_and_kornia():
    pytorch_msssim = pytest.importorskip("pytorch_msssim")
    kornia = pytest.importorskip("kornia")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 32, 32, generator=g)
    y = (x + 0.1 * torch.randn(4, 3, 32, 32, generator=g)).clamp(0, 1)
    torch.testing.assert_close(agkd_ops.ssim(x, y, reduction="none"),
                               pytorch_msssim.ssim(x, y, data_range=1.0, size_average=False),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        agkd_ops.ssim(x, y, padding="reflect", reduction="none"),
        kornia.metrics.ssim(x, y, 11, max_val=1.0, eps=0.0, padding="same").flatten(1).mean(1),
        rtol=1e-5, atol=1e-5)


def test_large_planes_span_several_row_tiles():
    # 150 rows > the CPU kernel's 64-row work items: tile seams must not show.
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 150, 20, generator=g, dtype=torch.float64)
    y = torch.rand(1, 1, 150, 20, generator=g, dtype=torch.float64)
    weights = torch.ones(1, dtype=torch.float64)
    for padding in PADDINGS:
        kw = dict(padding=padding, reduction="none")
        out, gx, gy = both_grads(lambda a, b: agkd_ops.hybrid_loss(a, b, **kw), x, y, weights)
        ref, rgx, rgy = both_grads(lambda a, b: R.hybrid_loss(a, b, **kw), x, y, weights)
        torch.testing.assert_close((out, gx, gy), (ref, rgx, rgy), rtol=1e-10, atol=1e-13)
