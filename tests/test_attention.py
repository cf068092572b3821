"""attention_map and attention_align_loss: the references against the formulas users know
(F.normalize of abs().pow().mean(), F.interpolate + the reference losses), the native
kernels against the references (values and both gradients over sizes from 1x1 to 64x64
on either side, up/down/non-integer ratios, both align_corners, all four losses, 1..4
channels), gradcheck, opcheck, torch.compile, determinism and bad inputs."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import agkd_ops
from agkd_ops import reference as R

from .conftest import requires_native_cpu
from .helpers import assert_clear_error

TOL = {torch.float64: (1e-9, 1e-11), torch.float32: (2e-4, 2e-5)}


def grads(fn, inputs, weights):
    inputs = [t.detach().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    return (out,) + torch.autograd.grad((out.double() * weights).sum(), inputs)


# -------------------------------------------------------------- reference vs formulas


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, 0.5])
def test_reference_attention_map_is_attention_transfer(p):
    g = torch.Generator().manual_seed(0)
    f = torch.randn(3, 6, 5, 7, generator=g, dtype=torch.float64)
    want = F.normalize(f.abs().pow(p).mean(1).flatten(1), dim=1).view(3, 1, 5, 7)
    torch.testing.assert_close(R.attention_map(f, p=p), want)
    torch.testing.assert_close(R.attention_map(f, p=p, normalize=False), f.abs().pow(p).mean(1, keepdim=True))


@pytest.mark.parametrize("loss,kw", [("mse", {}), ("cosine", {"eps": 1e-6}),
                                     ("ssim", {"window_size": 5, "padding": "reflect"}),
                                     ("hybrid", {"alpha": 0.3, "beta": 0.9, "window_size": 3})])
@pytest.mark.parametrize("align_corners", [False, True])
def test_reference_align_is_interpolate_then_loss(loss, kw, align_corners):
    g = torch.Generator().manual_seed(0)
    s = torch.rand(2, 2, 9, 6, generator=g, dtype=torch.float64)
    t = torch.rand(2, 2, 14, 17, generator=g, dtype=torch.float64)
    up = F.interpolate(s, size=(14, 17), mode="bilinear", align_corners=align_corners)
    got = R.attention_align_loss(s, t, loss=loss, align_corners=align_corners, reduction="none", **kw)
    if loss == "mse":
        want = F.mse_loss(up, t, reduction="none").flatten(1).mean(1)
    else:
        want = {"cosine": R.cosine_loss, "ssim": R.ssim_loss, "hybrid": R.hybrid_loss}[loss](
            up, t, reduction="none", **kw)
    torch.testing.assert_close(got, want)


# -------------------------------------------------------------- native vs reference

side = st.integers(1, 64)


@st.composite
def align_case(draw):
    loss = draw(st.sampled_from(["mse", "cosine", "ssim", "hybrid"]))
    kw = {}
    H, W = draw(side), draw(side)
    if loss in ("ssim", "hybrid"):
        padding = draw(st.sampled_from(["valid", "reflect", "zeros"]))
        window = draw(st.sampled_from([1, 3, 5, 7]))
        limit = min(H, W)
        if padding == "valid":
            window = min(window, limit if limit % 2 else limit - 1)
        elif padding == "reflect":
            while window // 2 >= limit:
                window -= 2
        kw = dict(window_size=window, padding=padding)
        if loss == "hybrid":
            kw.update(alpha=draw(st.floats(0, 2)), beta=draw(st.floats(0, 2)))
    return dict(loss=loss, kw=kw, n=draw(st.integers(1, 3)), c=draw(st.integers(1, 4)),
                student=(draw(side), draw(side)), teacher=(H, W), align_corners=draw(st.booleans()),
                layout=draw(st.sampled_from(["contiguous", "transposed", "channels_last"])),
                seed=draw(st.integers(0, 2**31 - 1)))


def laid_out(t, layout):
    if layout == "transposed":
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    return t


@requires_native_cpu
@pytest.mark.usefixtures("native_backend")
@given(case=align_case(), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_native_align_matches_reference(case, dtype):
    g = torch.Generator().manual_seed(case["seed"])
    n, c = case["n"], case["c"]
    s = laid_out(torch.rand(n, c, *case["student"], generator=g, dtype=torch.float64), case["layout"])
    t = torch.rand(n, c, *case["teacher"], generator=g, dtype=torch.float64)
    weights = torch.rand(n, generator=g, dtype=torch.float64)
    kw = dict(loss=case["loss"], align_corners=case["align_corners"], reduction="none", **case["kw"])
    out, gs, gt = grads(lambda a, b: agkd_ops.attention_align_loss(a, b, **kw), [s.to(dtype), t.to(dtype)], weights)
    want, wgs, wgt = grads(lambda a, b: R.attention_align_loss(a, b, **kw), [s, t], weights)
    rtol, atol = TOL[dtype]
    assert out.dtype == dtype and out.shape == (n,) and gs.shape == s.shape and gt.shape == t.shape
    torch.testing.assert_close(out.double(), want, rtol=rtol, atol=atol)
    torch.testing.assert_close(gs.double(), wgs, rtol=rtol, atol=atol)
    torch.testing.assert_close(gt.double(), wgt, rtol=rtol, atol=atol)


@requires_native_cpu
@pytest.mark.usefixtures("native_backend")
@given(n=st.integers(1, 3), c=st.integers(1, 9), h=st.integers(1, 20), w=st.integers(1, 20),
       p=st.sampled_from([2.0, 1.0, 3.0, 0.5, 1.7]), normalize=st.booleans(),
       layout=st.sampled_from(["contiguous", "transposed", "channels_last"]),
       dtype=st.sampled_from([torch.float64, torch.float32]), seed=st.integers(0, 2**31 - 1))
def test_native_attention_map_matches_reference(n, c, h, w, p, normalize, layout, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    f = laid_out(torch.where(torch.rand(f.shape, generator=g, dtype=torch.float64) < 0.2, 0.0, f), layout)  # ReLU-like zeros
    weights = torch.rand(n, 1, h, w, generator=g, dtype=torch.float64)
    out, gf = grads(lambda x: agkd_ops.attention_map(x, p=p, normalize=normalize), [f.to(dtype)], weights)
    want, wgf = grads(lambda x: R.attention_map(x, p=p, normalize=normalize), [f], weights)
    rtol, atol = TOL[dtype]
    assert out.dtype == dtype and out.shape == (n, 1, h, w)
    torch.testing.assert_close(out.double(), want, rtol=rtol, atol=atol)
    torch.testing.assert_close(gf.double(), wgf, rtol=rtol, atol=atol)


@requires_native_cpu
@pytest.mark.usefixtures("native_backend")
def test_native_attention_map_equals_attention_transfer_formula():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(4, 320, 7, 7, generator=g, requires_grad=True)
    got = agkd_ops.attention_map(f)
    want = F.normalize(f.abs().pow(2).mean(1).flatten(1), dim=1).view(4, 1, 7, 7)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got.pow(3).sum(), f)[0],
                               torch.autograd.grad(want.pow(3).sum(), f)[0], rtol=1e-4, atol=1e-7)


@requires_native_cpu
@pytest.mark.usefixtures("native_backend")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_align_and_map(dtype):
    g = torch.Generator().manual_seed(0)
    s = torch.rand(2, 1, 14, 14, generator=g).to(dtype)
    t = torch.rand(2, 1, 28, 28, generator=g).to(dtype)
    for loss in ("mse", "hybrid"):
        got = agkd_ops.attention_align_loss(s, t, loss=loss, reduction="none")
        want = R.attention_align_loss(s, t, loss=loss, reduction="none")
        assert got.dtype == dtype
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)
    f = torch.randn(2, 16, 7, 7, generator=g).to(dtype)
    torch.testing.assert_close(agkd_ops.attention_map(f), R.attention_map(f), rtol=2e-2, atol=2e-3)


@requires_native_cpu
@pytest.mark.usefixtures("native_backend")
@pytest.mark.parametrize("loss", ["mse", "cosine", "ssim", "hybrid"])
def test_gradcheck_align(loss):
    g = torch.Generator().manual_seed(0)
    s = torch.rand(2, 2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.rand(2, 2, 8, 7, generator=g, dtype=torch.float64, requires_grad=True)
    kw = {"window_size": 3, "padding": "zeros"} if loss in ("ssim", "hybrid") else {}
    fn = lambda a, b: agkd_ops.attention_align_loss(a, b, loss=loss, reduction="none", **kw)
    assert torch.autograd.gradcheck(fn, (s, t))


@requires_native_cpu
@pytest.mark.usefixtures("native_backend")
@pytest.mark.parametrize("p,normalize", [(2.0, True), (3.0, True), (1.0, False), (0.7, True)])
def test_gradcheck_attention_map(p, normalize):
    g = torch.Generator().manual_seed(0)
    f = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: agkd_ops.attention_map(x, p=p, normalize=normalize), (f,))


@requires_native_cpu
def test_opcheck_attention_ops():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(2, 3, 4, 5, generator=g, requires_grad=True)
    torch.library.opcheck(torch.ops.agkd.attention_map_fwd, (f, 2.0, True, 1e-12))
    amap, norm = torch.ops.agkd.attention_map_fwd(f.detach(), 2.0, True, 1e-12)
    torch.library.opcheck(torch.ops.agkd.attention_map_bwd,
                          (torch.rand_like(amap), f.detach(), amap, norm, 2.0, True, 1e-12),
                          test_utils=("test_schema", "test_faketensor"))
    s = torch.rand(2, 1, 6, 5, generator=g, requires_grad=True)
    t = torch.rand(2, 1, 9, 11, generator=g, requires_grad=True)
    args = (s, t, 0.5, 0.5, 0.0, 3, 1.5, 1e-4, 9e-4, "reflect", 1e-8, False)
    torch.library.opcheck(torch.ops.agkd.align_fwd, args)
    _loss, stats = torch.ops.agkd.align_fwd(*args)
    torch.library.opcheck(torch.ops.agkd.align_bwd,
                          (torch.rand(2), s.detach(), t.detach(), stats) + args[2:] + (True, True),
                          test_utils=("test_schema", "test_faketensor"))


@requires_native_cpu
def test_torch_compile_fullgraph():
    criterion = agkd_ops.AttentionAlignLoss(loss="hybrid", padding="zeros", window_size=5)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(features, teacher):
        return criterion(agkd_ops.attention_map(features), teacher)

    g = torch.Generator().manual_seed(0)
    f = torch.randn(3, 8, 7, 7, generator=g, requires_grad=True)
    t = torch.rand(3, 1, 14, 14, generator=g)
    loss = step(f, t)
    loss.backward()
    f2 = f.detach().clone().requires_grad_(True)
    want = criterion(agkd_ops.attention_map(f2), t)
    want.backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(f.grad, f2.grad)


@requires_native_cpu
@pytest.mark.usefixtures("native_backend")
def test_align_bitwise_deterministic_and_thread_count_independent():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(8, 2, 28, 28, generator=g, requires_grad=True)
    t = torch.rand(8, 2, 56, 56, generator=g, requires_grad=True)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n_threads in (threads, threads, 1):
            torch.set_num_threads(n_threads)
            s.grad = t.grad = None
            loss = agkd_ops.attention_align_loss(s, t, loss="hybrid", reduction="none")
            loss.sum().backward()
            runs.append((loss.detach().clone(), s.grad.clone(), t.grad.clone()))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@requires_native_cpu
@pytest.mark.usefixtures("native_backend")
def test_align_nan_in_one_sample_leaves_others_unchanged():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(3, 1, 10, 10, generator=g)
    t = torch.rand(3, 1, 20, 20, generator=g)
    bad = s.clone()
    bad[1, 0, 4, 4] = float("nan")

    def run(student):
        a = student.clone().requires_grad_(True)
        out = agkd_ops.attention_align_loss(a, t, loss="hybrid", padding="zeros", reduction="none")
        out.sum().backward()
        return out.detach(), a.grad

    clean_out, clean_grad = run(s)
    bad_out, bad_grad = run(bad)
    assert torch.isnan(bad_out[1])
    assert torch.equal(bad_out[[0, 2]], clean_out[[0, 2]])
    assert torch.equal(bad_grad[[0, 2]], clean_grad[[0, 2]])


# ------------------------------------------------------------------- bad inputs


def rand(*shape):
    return torch.rand(*shape)


@pytest.mark.parametrize(
    "call,exc,words",
    [
        (lambda: agkd_ops.attention_map(rand(2, 3, 4)), ValueError, ["attention_map", "features", "rank-4"]),
        (lambda: agkd_ops.attention_map(torch.ones(2, 3, 4, 4, dtype=torch.int64)), TypeError, ["features", "floating"]),
        (lambda: agkd_ops.attention_map(rand(2, 3, 4, 4), p=0), ValueError, ["attention_map", "p", "> 0"]),
        (lambda: agkd_ops.attention_map(rand(2, 3, 4, 4), normalize=1), TypeError, ["normalize", "bool"]),
        (lambda: agkd_ops.attention_align_loss(rand(2, 1, 7, 7), rand(3, 1, 14, 14)), ValueError, ["attention_align_loss", "batch size and channels", "(3, 1, 14, 14)"]),
        (lambda: agkd_ops.attention_align_loss(rand(2, 2, 7, 7), rand(2, 1, 14, 14)), ValueError, ["channels"]),
        (lambda: agkd_ops.attention_align_loss(rand(2, 7, 7), rand(2, 14, 14)), ValueError, ["student", "rank-4"]),
        (lambda: agkd_ops.attention_align_loss(rand(2, 1, 7, 7), rand(2, 1, 14, 14).double()), TypeError, ["dtype"]),
        (lambda: agkd_ops.attention_align_loss(rand(2, 1, 7, 7), rand(2, 1, 14, 14), loss="l1"), ValueError, ["loss", "'l1'"]),
        (lambda: agkd_ops.attention_align_loss(rand(2, 1, 7, 7), rand(2, 1, 14, 14), loss="mse", eps=1e-3), TypeError, ["loss='mse'", "eps", "no keyword"]),
        (lambda: agkd_ops.attention_align_loss(rand(2, 1, 7, 7), rand(2, 1, 14, 14), loss="cosine", window_size=3), TypeError, ["window_size", "eps"]),
        (lambda: agkd_ops.attention_align_loss(rand(2, 1, 7, 7), rand(2, 1, 8, 8), loss="ssim"), ValueError, ["teacher", "window_size=11", "valid"]),
        (lambda: agkd_ops.attention_align_loss(rand(2, 1, 7, 7), rand(2, 1, 8, 8), loss="hybrid", window_size=17, padding="reflect"), ValueError, ["reflect", "teacher"]),
        (lambda: agkd_ops.attention_align_loss(rand(2, 1, 7, 7), rand(2, 1, 14, 14), loss="hybrid", alpha=-1), ValueError, ["alpha"]),
        (lambda: agkd_ops.attention_align_loss(rand(2, 1, 7, 7), rand(2, 1, 14, 14), align_corners="yes"), TypeError, ["align_corners", "bool"]),
        (lambda: agkd_ops.attention_align_loss(rand(2, 1, 7, 7), rand(2, 1, 14, 14), reduction="batchmean"), ValueError, ["reduction"]),
        (lambda: agkd_ops.attention_align_loss(rand(0, 1, 7, 7), rand(0, 1, 14, 14)), ValueError, ["empty"]),
    ],
)
def test_attention_bad_inputs_raise_clear_errors(call, exc, words):
    assert_clear_error(call, exc, words)


def test_align_module_mirrors_function():
    s, t = rand(2, 1, 7, 7), rand(2, 1, 14, 14)
    criterion = agkd_ops.AttentionAlignLoss(loss="ssim", window_size=5, padding="zeros", align_corners=True)
    assert torch.equal(criterion(s, t), agkd_ops.attention_align_loss(s, t, loss="ssim", window_size=5,
                                                                      padding="zeros", align_corners=True))
    assert "window_size=5" in repr(criterion)
