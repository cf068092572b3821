"""agkd::align_fwd/bwd and attention_align_loss: the student map resized bilinearly to the
teacher's size and compared (mse, cosine, ssim, hybrid).

On every backend (tests/backends.py): F.interpolate followed by the NumPy oracles' losses,
every dtype against the float64 reference (on the reference backend: its low-precision
paths), gradcheck, NaN isolation, determinism. On the native backends: values and both
gradients against the float64 reference over sizes from 1x1 to 64x64 on either side (up,
down, non-integer ratios, equal), both align_corners, all four losses, 1..4 channels and
layouts, and checks of the compiled op itself (opcheck, torch.compile)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import agkd_ops
from agkd_ops import reference as R

from . import oracle
from .backends import (FLOAT_DTYPES, against_the_reference, assert_clear_error, assert_nan_stays_in_its_sample,
                       close, grads, layout, rounded)


def oracle_loss(up, t, loss, kw):
    """The per-sample loss between the resized student ``up`` and ``t`` from the NumPy
    oracles (tests/oracle.py), which share no code with agkd_ops."""
    a, b = up.numpy(), t.numpy()
    if loss == "mse":
        return ((a - b) ** 2).reshape(len(a), -1).mean(1)
    cos = lambda: oracle.cosine_per_sample(a, b, eps=kw.get("eps", 1e-8))  # noqa: E731
    ssim = lambda: oracle.ssim_per_sample(a, b, window_size=kw["window_size"],  # noqa: E731
                                          padding=kw.get("padding", "valid"))
    if loss == "cosine":
        return 1 - cos()
    if loss == "ssim":
        return 1 - ssim()
    return kw["ssim_weight"] * (1 - ssim()) + kw["cosine_weight"] * (1 - cos())


@pytest.mark.parametrize("loss,kw", [("mse", {}), ("cosine", {"eps": 1e-6}),
                                     ("ssim", {"window_size": 5, "padding": "reflect"}),
                                     ("hybrid", {"ssim_weight": 0.3, "cosine_weight": 0.9, "window_size": 3})])
@pytest.mark.parametrize("align_corners", [False, True])
def test_is_interpolate_then_loss(backend, loss, kw, align_corners):
    g = torch.Generator().manual_seed(0)
    s = torch.rand(2, 2, 9, 6, generator=g, dtype=torch.float64)
    t = torch.rand(2, 2, 14, 17, generator=g, dtype=torch.float64)
    up = F.interpolate(s, size=(14, 17), mode="bilinear", align_corners=align_corners)
    got = agkd_ops.attention_align_loss(s.to(backend.device), t.to(backend.device), loss=loss,
                                        align_corners=align_corners, reduction="none", **kw)
    np.testing.assert_allclose(got.cpu().numpy(), oracle_loss(up, t, loss, kw), rtol=1e-10, atol=1e-12)


side = st.integers(1, 64)


@st.composite
def align_case(draw):
    loss = draw(st.sampled_from(["mse", "cosine", "ssim", "hybrid"]))
    kw = {}
    H, W = draw(side), draw(side)
    if loss in ("ssim", "hybrid"):
        padding = draw(st.sampled_from(agkd_ops.PADDINGS))
        window = draw(st.sampled_from([1, 3, 5, 7]))
        limit = min(H, W)
        if padding == "valid":
            window = min(window, limit if limit % 2 else limit - 1)
        elif padding == "reflect":
            while window // 2 >= limit:
                window -= 2
        kw = dict(window_size=window, padding=padding)
        if loss == "hybrid":
            kw.update(ssim_weight=draw(st.floats(0, 2)), cosine_weight=draw(st.floats(0, 2)))
    return dict(loss=loss, kw=kw, n=draw(st.integers(1, 3)), c=draw(st.integers(1, 4)),
                student=(draw(side), draw(side)), teacher=(H, W), align_corners=draw(st.booleans()),
                layout=draw(st.sampled_from(["contiguous", "transposed", "channels_last"])),
                seed=draw(st.integers(0, 2**31 - 1)))


@given(case=align_case(), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_matches_reference_on_random_maps(native, case, dtype):
    backend = native
    g = torch.Generator().manual_seed(case["seed"])
    n, c = case["n"], case["c"]
    s = torch.rand(n, c, *case["student"], generator=g, dtype=torch.float64)
    t = torch.rand(n, c, *case["teacher"], generator=g, dtype=torch.float64)
    weights = torch.rand(n, generator=g, dtype=torch.float64)
    kw = dict(loss=case["loss"], align_corners=case["align_corners"], reduction="none", **case["kw"])
    out, gs, gt = grads(lambda a, b: agkd_ops.attention_align_loss(a, b, **kw),
                        layout(s.to(backend.device, dtype), case["layout"]), t.to(backend.device, dtype),
                        weights=weights)
    want, wgs, wgt = grads(lambda a, b: R.attention_align_loss(a, b, **kw), s, t, weights=weights)
    rtol, atol = {torch.float64: (1e-9, 1e-11), torch.float32: (2e-4, 2e-5)}[dtype]
    assert out.dtype == dtype and out.shape == (n,) and gs.shape == s.shape and gt.shape == t.shape
    torch.testing.assert_close(out.double().cpu(), want, rtol=rtol, atol=atol)
    torch.testing.assert_close(gs.double().cpu(), wgs, rtol=rtol, atol=atol)
    torch.testing.assert_close(gt.double().cpu(), wgt, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("loss,kw", [("mse", {}), ("cosine", {}), ("ssim", {"window_size": 5, "padding": "reflect"}),
                                     ("hybrid", {"window_size": 7, "padding": "zeros"})])
@pytest.mark.parametrize("student,teacher,align_corners", [((7, 7), (14, 14), False), ((28, 28), (56, 56), True),
                                                           ((20, 13), (9, 17), False), ((5, 5), (5, 5), True)])
def test_matches_reference_in_every_dtype(backend, dtype, loss, kw, student, teacher, align_corners):
    against_the_reference(backend, dtype)
    g = torch.Generator().manual_seed(0)
    s, t = rounded((3, 2, *student), dtype, g), rounded((3, 2, *teacher), dtype, g)
    args = dict(loss=loss, align_corners=align_corners, reduction="none", **kw)
    want = grads(lambda a, b: R.attention_align_loss(a, b, **args), s, t)
    got = grads(lambda a, b: agkd_ops.attention_align_loss(a, b, **args), s.to(backend.device, dtype),
                layout(t.to(backend.device, dtype), "channels_last"))
    # float16/bfloat16: the resized student is rounded to the input dtype, as F.interpolate's is.
    tol = {torch.float64: 1e-9, torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}[dtype]
    for a, b in zip(got, want):
        close(a, b, tol)


def test_strided_inputs_equal_contiguous_copies(backend):
    g = torch.Generator().manual_seed(5)
    s = torch.rand(2, 3, 12, 22, generator=g)[..., ::2].to(backend.device)  # sliced
    t = torch.rand(1, 1, 20, 20, generator=g).expand(2, 3, 20, 20).to(backend.device)  # stride 0
    for loss, kw in (("mse", {}), ("hybrid", {"window_size": 5})):
        fn = lambda a, b: agkd_ops.attention_align_loss(a, b, loss=loss, reduction="none", **kw)
        for a, b in zip(grads(fn, s, t), grads(fn, s.contiguous(), t.contiguous())):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss", ["mse", "cosine", "ssim", "hybrid"])
def test_gradcheck_float64(backend, loss):
    g = torch.Generator().manual_seed(0)
    s = torch.rand(2, 2, 5, 4, generator=g, dtype=torch.float64).to(backend.device).requires_grad_(True)
    t = torch.rand(2, 2, 8, 7, generator=g, dtype=torch.float64).to(backend.device).requires_grad_(True)
    kw = {"window_size": 3, "padding": "zeros"} if loss in ("ssim", "hybrid") else {}
    fn = lambda a, b: agkd_ops.attention_align_loss(a, b, loss=loss, reduction="none", **kw)
    assert torch.autograd.gradcheck(fn, (s, t))


def test_nan_in_one_sample_leaves_others_unchanged(backend):
    g = torch.Generator().manual_seed(0)
    s = torch.rand(3, 1, 10, 10, generator=g).to(backend.device)
    t = torch.rand(3, 1, 20, 20, generator=g).to(backend.device)
    fn = lambda a, b: agkd_ops.attention_align_loss(a, b, loss="hybrid", padding="zeros", reduction="none")
    assert_nan_stays_in_its_sample(fn, (s, t), 0, (1, 0, 4, 4))


def test_bitwise_deterministic_and_thread_count_independent(backend):
    g = torch.Generator().manual_seed(0)
    s = torch.rand(8, 2, 28, 28, generator=g).to(backend.device)
    t = torch.rand(8, 2, 56, 56, generator=g).to(backend.device)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n_threads in (threads, threads, 1):
            torch.set_num_threads(n_threads)
            runs.append(grads(lambda a, b: agkd_ops.attention_align_loss(a, b, loss="hybrid", reduction="none"),
                              s, t))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_opcheck(native, reduction):
    g = torch.Generator().manual_seed(0)
    s = torch.rand(2, 1, 6, 5, generator=g).to(native.device).requires_grad_(True)
    t = torch.rand(2, 1, 9, 11, generator=g).to(native.device).requires_grad_(True)
    args = (s, t, 0.5, 0.5, 0.2, 3, 1.5, 1e-4, 9e-4, "reflect", 1e-8, False, reduction)
    torch.library.opcheck(torch.ops.agkd.align_fwd, args)
    _loss, stats = torch.ops.agkd.align_fwd(*args)
    torch.library.opcheck(torch.ops.agkd.align_bwd,
                          (torch.rand(2, device=native.device), s.detach(), t.detach(), stats) + args[2:-1]
                          + (True, True),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph(native):
    criterion = agkd_ops.AttentionAlignLoss(loss="hybrid", padding="zeros", window_size=5)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(features, teacher):
        return criterion(agkd_ops.attention_map(features), teacher)

    g = torch.Generator().manual_seed(0)
    f = torch.randn(3, 8, 7, 7, generator=g).to(native.device).requires_grad_(True)
    t = torch.rand(3, 1, 14, 14, generator=g).to(native.device)
    loss = step(f, t)
    loss.backward()
    f2 = f.detach().clone().requires_grad_(True)
    want = criterion(agkd_ops.attention_map(f2), t)
    want.backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(f.grad, f2.grad)


def rand(*shape):
    return torch.rand(*shape)


@pytest.mark.parametrize(
    "call,exc,words",
    [
        (lambda: agkd_ops.attention_align_loss(rand(2, 1, 7, 7), rand(3, 1, 14, 14)), ValueError, ["attention_align_loss", "batch size and channels", "(3, 1, 14, 14)"]),
        (lambda: agkd_ops.attention_align_loss(rand(2, 2, 7, 7), rand(2, 1, 14, 14)), ValueError, ["channels"]),
        (lambda: agkd_ops.attention_align_loss(rand(2, 7, 7), rand(2, 14, 14)), ValueError, ["student", "rank-4"]),
        (lambda: agkd_ops.attention_align_loss(rand(2, 1, 7, 7), rand(2, 1, 14, 14).double()), TypeError, ["dtype"]),
        (lambda: agkd_ops.attention_align_loss(rand(2, 1, 7, 7), rand(2, 1, 14, 14), loss="l1"), ValueError, ["loss", "'l1'"]),
        (lambda: agkd_ops.attention_align_loss(rand(2, 1, 7, 7), rand(2, 1, 14, 14), loss="mse", eps=1e-3), TypeError, ["loss='mse'", "eps", "no keyword"]),
        (lambda: agkd_ops.attention_align_loss(rand(2, 1, 7, 7), rand(2, 1, 14, 14), loss="cosine", window_size=3), TypeError, ["window_size", "eps"]),
        (lambda: agkd_ops.attention_align_loss(rand(2, 1, 7, 7), rand(2, 1, 8, 8), loss="ssim"), ValueError, ["teacher", "window_size=11", "valid"]),
        (lambda: agkd_ops.attention_align_loss(rand(2, 1, 7, 7), rand(2, 1, 8, 8), loss="hybrid", window_size=17, padding="reflect"), ValueError, ["reflect", "teacher"]),
        (lambda: agkd_ops.attention_align_loss(rand(2, 1, 7, 7), rand(2, 1, 14, 14), loss="hybrid", ssim_weight=-1), ValueError, ["ssim_weight"]),
        (lambda: agkd_ops.attention_align_loss(rand(2, 1, 7, 7), rand(2, 1, 14, 14), align_corners="yes"), TypeError, ["align_corners", "bool"]),
        (lambda: agkd_ops.attention_align_loss(rand(2, 1, 7, 7), rand(2, 1, 14, 14), reduction="batchmean"), ValueError, ["reduction"]),
        (lambda: agkd_ops.attention_align_loss(rand(0, 1, 7, 7), rand(0, 1, 14, 14)), ValueError, ["empty"]),
    ],
)
def test_bad_inputs_raise_clear_errors(call, exc, words):
    assert_clear_error(call, exc, words)


def test_module_mirrors_function():
    s, t = rand(2, 1, 7, 7), rand(2, 1, 14, 14)
    criterion = agkd_ops.AttentionAlignLoss(loss="ssim", window_size=5, padding="zeros", align_corners=True)
    assert torch.equal(criterion(s, t), agkd_ops.attention_align_loss(s, t, loss="ssim", window_size=5,
                                                                      padding="zeros", align_corners=True))
    assert "window_size=5" in repr(criterion)
