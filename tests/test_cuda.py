"""The CUDA kernels (csrc/agkd/cuda) against the float64 reference.

Every test here takes the ``kernel_device`` fixture: a GPU where there is one, otherwise
the CPU emulator, which runs the same .cu sources with each block's threads as fibers
(build with AGKD_CUDA_EMULATION=1, run with AGKD_OPS_CUDA_EMULATION=1; see the README).
The emulator checks the kernels' arithmetic, indexing, barriers and launch limits, not a
GPU's memory model or timing. Tests that need a real device (streams) are marked ``cuda``.
"""
import pytest
import torch

import agkd_ops
from agkd_ops import reference as R

pytestmark = [pytest.mark.cuda_kernels, pytest.mark.usefixtures("native_backend")]

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
PADDINGS = ["valid", "reflect", "zeros"]
# Inputs are rounded to the tested dtype first, so these bound the kernels' float32 (or
# float64) accumulation, plus the rounding of the outputs and gradients to that dtype.
TOL = {torch.float64: 1e-10, torch.float32: 2e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def rounded(shape, dtype, generator, scale=1.0, randn=False):
    """A float64 tensor holding values exactly representable in ``dtype``."""
    make = torch.randn if randn else torch.rand
    return (scale * make(shape, generator=generator, dtype=torch.float64)).to(dtype).double()


def grads(fn, *inputs, weights=None):
    """fn(*inputs) and the gradients of sum(weights * fn) for every input."""
    inputs = [t.detach().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    w = torch.ones_like(out, dtype=torch.float64) if weights is None else weights.to(out.device)
    return (out.detach(), *torch.autograd.grad((out.double() * w).sum(), inputs))


def close(got, want, tol, grad_scale=None):
    atol = tol if grad_scale is None else tol * grad_scale
    torch.testing.assert_close(got.double().cpu(), want, rtol=tol, atol=atol)


# ------------------------------------------------------------------------------ hybrid


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padding", PADDINGS)
# 37x29 and 64x70 cross 16x16 tile seams (64 exactly on one); 7x5 is one partial tile.
@pytest.mark.parametrize("shape,window", [((3, 2, 37, 29), 11), ((2, 1, 7, 5), 3), ((2, 4, 64, 70), 7)])
@pytest.mark.parametrize("alpha,beta", [(0.5, 0.5), (1.0, 0.0), (0.0, 1.0)])
def test_hybrid_matches_reference(kernel_device, dtype, padding, shape, window, alpha, beta):
    g = torch.Generator().manual_seed(0)
    x, y = rounded(shape, dtype, g), rounded(shape, dtype, g)
    weights = torch.rand(shape[0], generator=g, dtype=torch.float64)
    kw = dict(alpha=alpha, beta=beta, window_size=window, padding=padding, reduction="none")
    want = grads(lambda a, b: R.hybrid_loss(a, b, **kw), x, y, weights=weights)
    # y in a non-contiguous (H/W-transposed) layout
    got_x = x.to(kernel_device, dtype)
    got_y = y.to(kernel_device, dtype).transpose(2, 3).contiguous().transpose(2, 3)
    got = grads(lambda a, b: agkd_ops.hybrid_loss(a, b, **kw), got_x, got_y, weights=weights)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    scale = max(want[1].abs().max().item(), want[2].abs().max().item()) + 1e-12
    close(got[0], want[0], TOL[dtype])
    close(got[1], want[1], TOL[dtype], scale)
    close(got[2], want[2], TOL[dtype], scale)


@pytest.mark.parametrize("layout", ["expanded", "sliced", "channels_last"])
def test_hybrid_strided_inputs_equal_contiguous_copies(kernel_device, layout):
    g = torch.Generator().manual_seed(1)
    if layout == "expanded":  # stride 0 over batch and channels
        x = torch.rand(1, 1, 20, 19, generator=g).expand(3, 2, 20, 19)
    elif layout == "sliced":
        x = torch.rand(3, 2, 20, 38, generator=g)[..., ::2]
    else:
        x = torch.rand(3, 2, 20, 19, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.rand(3, 2, 20, 19, generator=g)
    x, y = x.to(kernel_device), y.to(kernel_device)
    fn = lambda a, b: agkd_ops.hybrid_loss(a, b, padding="reflect", window_size=7, reduction="none")
    got = grads(fn, x, y)
    want = grads(fn, x.contiguous(), y)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_hybrid_wide_window_opts_into_more_shared_memory(kernel_device):
    # float64 with window 31: the backward stages 4·46² + 4·46·16 doubles (91 KiB), beyond
    # the 48 KiB a kernel gets without cudaFuncSetAttribute.
    g = torch.Generator().manual_seed(2)
    x, y = rounded((1, 2, 40, 33), torch.float64, g), rounded((1, 2, 40, 33), torch.float64, g)
    kw = dict(window_size=31, sigma=4.0, padding="zeros", reduction="none")
    want = grads(lambda a, b: R.hybrid_loss(a, b, **kw), x, y)
    got = grads(lambda a, b: agkd_ops.hybrid_loss(a, b, **kw), x.to(kernel_device), y.to(kernel_device))
    for a, b in zip(got, want):
        close(a, b, 1e-10)


def test_hybrid_window_beyond_shared_memory_is_a_clear_error(kernel_device):
    # A float64 window of 81 needs 336 KiB of shared memory per block in the backward,
    # beyond every GPU's opt-in limit (sm_80: 163 KiB, sm_90: 227 KiB). A window of 61
    # (219 KiB) fits on an H100 but not on an A100, so it would test the device, not the check.
    x = torch.rand(1, 1, 90, 90, dtype=torch.float64, device=kernel_device, requires_grad=True)
    with pytest.raises(RuntimeError, match="shared memory"):
        agkd_ops.hybrid_loss(x, x.detach(), window_size=81, sigma=8.0).backward()


def test_hybrid_gradcheck(kernel_device):
    x = torch.rand(2, 2, 9, 8, device=kernel_device, dtype=torch.float64, requires_grad=True)
    y = torch.rand(2, 2, 9, 8, device=kernel_device, dtype=torch.float64, requires_grad=True)
    for padding in PADDINGS:
        fn = lambda a, b: agkd_ops.hybrid_loss(a, b, window_size=5, padding=padding, reduction="none")
        assert torch.autograd.gradcheck(fn, (x, y))


@pytest.mark.parametrize("which", ["x", "y"])
def test_hybrid_one_gradient_alone(kernel_device, which):
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(2, 3, 18, 18, generator=g), torch.rand(2, 3, 18, 18, generator=g)
    both = grads(lambda a, b: agkd_ops.hybrid_loss(a, b, reduction="none"), x.to(kernel_device),
                 y.to(kernel_device))
    a = x.to(kernel_device).requires_grad_(which == "x")
    b = y.to(kernel_device).requires_grad_(which == "y")
    agkd_ops.hybrid_loss(a, b, reduction="none").sum().backward()
    alone = a.grad if which == "x" else b.grad
    assert (b.grad if which == "x" else a.grad) is None
    assert torch.equal(alone, both[1] if which == "x" else both[2])


# ---------------------------------------------------------------------------------- KD

KD_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", DTYPES)
# K = 2 (one partial stride), 100, 1000 (several strides), 100000 (backward grid.y chunks)
@pytest.mark.parametrize("n,k", [(5, 2), (33, 100), (4, 1000), (3, 100_000)])
@pytest.mark.parametrize("alpha", [None, 0.0, 0.7])
def test_kd_matches_reference(kernel_device, dtype, n, k, alpha):
    g = torch.Generator().manual_seed(0)
    s, t = rounded((n, k), dtype, g, 3.0, randn=True), rounded((n, k), dtype, g, 3.0, randn=True)
    y = torch.randint(0, k, (n,), generator=g)
    if alpha is None:
        native = lambda a, b: agkd_ops.kd_kl_div(a, b, temperature=2.0, reduction="none")
        ref = lambda a, b: R.kd_kl_div(a, b, temperature=2.0, reduction="none")
    else:
        native = lambda a, b: agkd_ops.kd_loss(a, b, y.to(kernel_device), temperature=2.0, alpha=alpha,
                                               reduction="none")
        ref = lambda a, b: R.kd_loss(a, b, y, temperature=2.0, alpha=alpha, reduction="none")
    want = grads(ref, s, t)
    got_s = s.to(kernel_device, dtype)
    got_t = t.t().contiguous().t().to(kernel_device, dtype)  # column-major: strided rows
    got = grads(native, got_s, got_t)
    for a, b in zip(got, want):
        close(a, b, KD_TOL[dtype])


def test_kd_row_values_keep_float32_accuracy_at_high_temperature(kernel_device):
    # KL = w/z_t - log z_t + log z_s cancels terms of the size of log K, and τ² = 16 then
    # scales what is left of the rounding. Summed in float32 the rows were off by 1.4e-5
    # relative (found by running the CPU suite on the emulator); the row totals are now
    # summed in double, as on the CPU, and the result is float32 rounding.
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(64, 100, generator=g), torch.randn(64, 100, generator=g)
    got = agkd_ops.kd_kl_div(s.to(kernel_device), t.to(kernel_device), temperature=4.0, reduction="none")
    want = R.kd_kl_div(s.double(), t.double(), temperature=4.0, reduction="none")
    torch.testing.assert_close(got.double().cpu(), want, rtol=2e-6, atol=1e-7)


def test_kd_gradcheck(kernel_device):
    g = torch.Generator().manual_seed(4)
    s = torch.randn(3, 7, generator=g, dtype=torch.float64).to(kernel_device).requires_grad_(True)
    t = torch.randn(3, 7, generator=g, dtype=torch.float64).to(kernel_device).requires_grad_(True)
    y = torch.tensor([0, 6, 3], device=kernel_device)
    assert torch.autograd.gradcheck(lambda a, b: agkd_ops.kd_loss(a, b, y, alpha=0.3, reduction="none"), (s, t))
    assert torch.autograd.gradcheck(lambda a, b: agkd_ops.kd_kl_div(a, b, reduction="none"), (s, t))


def test_kd_out_of_range_target_is_an_error(kernel_device):
    s = torch.randn(4, 30, device=kernel_device)
    with pytest.raises(ValueError, match="target"):
        agkd_ops.kd_loss(s, s, torch.full((4,), 30, device=kernel_device))


# ------------------------------------------------------------------ attention alignment


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss,kw", [("mse", {}), ("cosine", {}), ("ssim", {"window_size": 5, "padding": "reflect"}),
                                     ("hybrid", {"window_size": 7, "padding": "zeros"})])
@pytest.mark.parametrize("student,teacher,align_corners", [((7, 7), (14, 14), False), ((28, 28), (56, 56), True),
                                                           ((20, 13), (9, 17), False), ((5, 5), (5, 5), True)])
def test_align_matches_reference(kernel_device, dtype, loss, kw, student, teacher, align_corners):
    g = torch.Generator().manual_seed(0)
    s, t = rounded((3, 2, *student), dtype, g), rounded((3, 2, *teacher), dtype, g)
    args = dict(loss=loss, align_corners=align_corners, reduction="none", **kw)
    want = grads(lambda a, b: R.attention_align_loss(a, b, **args), s, t)
    got_s = s.to(kernel_device, dtype)[:, :, :, :]
    got_t = t.to(kernel_device, dtype).contiguous(memory_format=torch.channels_last)
    got = grads(lambda a, b: agkd_ops.attention_align_loss(a, b, **args), got_s, got_t)
    # float16/bfloat16: the resized student is also rounded to the input dtype on CUDA.
    tol = {torch.float64: 1e-9, torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}[dtype]
    for a, b in zip(got, want):
        close(a, b, tol)


def test_align_strided_student_equals_contiguous_copy(kernel_device):
    g = torch.Generator().manual_seed(5)
    s = torch.rand(2, 3, 12, 22, generator=g)[..., ::2].to(kernel_device)  # sliced
    t = torch.rand(1, 1, 20, 20, generator=g).expand(2, 3, 20, 20).to(kernel_device)  # stride 0
    for loss, kw in (("mse", {}), ("hybrid", {"window_size": 5})):
        fn = lambda a, b: agkd_ops.attention_align_loss(a, b, loss=loss, reduction="none", **kw)
        for a, b in zip(grads(fn, s, t), grads(fn, s.contiguous(), t.contiguous())):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss", ["mse", "cosine", "ssim", "hybrid"])
def test_align_gradcheck(kernel_device, loss):
    g = torch.Generator().manual_seed(6)
    s = torch.rand(2, 1, 4, 5, generator=g, dtype=torch.float64).to(kernel_device).requires_grad_(True)
    t = torch.rand(2, 1, 8, 7, generator=g, dtype=torch.float64).to(kernel_device).requires_grad_(True)
    kw = {"window_size": 3} if loss in ("ssim", "hybrid") else {}
    fn = lambda a, b: agkd_ops.attention_align_loss(a, b, loss=loss, reduction="none", **kw)
    assert torch.autograd.gradcheck(fn, (s, t))


# ------------------------------------------------------------------------ attention map


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p,normalize", [(2.0, True), (1.0, True), (3.0, False), (0.5, True)])
def test_attention_map_matches_reference(kernel_device, dtype, p, normalize):
    g = torch.Generator().manual_seed(0)
    f = rounded((4, 40, 7, 9), dtype, g, randn=True)
    weights = torch.rand(4, 1, 7, 9, generator=g, dtype=torch.float64)
    want = grads(lambda a: R.attention_map(a, p=p, normalize=normalize), f, weights=weights)
    got_f = f.to(kernel_device, dtype).contiguous(memory_format=torch.channels_last)
    got = grads(lambda a: agkd_ops.attention_map(a, p=p, normalize=normalize), got_f, weights=weights)
    tol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    for a, b in zip(got, want):
        close(a, b, tol)


def test_attention_map_gradcheck(kernel_device):
    g = torch.Generator().manual_seed(7)
    f = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64).to(kernel_device).requires_grad_(True)
    for p, normalize in [(2.0, True), (3.0, False), (0.7, True)]:
        assert torch.autograd.gradcheck(lambda a: agkd_ops.attention_map(a, p=p, normalize=normalize), (f,))


# ------------------------------------------------- every op: determinism, NaN isolation


def _every_op(device):
    """(name, function of one float32 input, that input) for each native op pair."""
    g = torch.Generator().manual_seed(8)
    maps = torch.rand(3, 2, 40, 37, generator=g).to(device)
    logits = torch.randn(3, 3000, generator=g).to(device)
    feats = torch.randn(3, 16, 14, 14, generator=g).to(device)
    teacher_map = torch.rand(3, 2, 56, 56, generator=g).to(device)
    targets = torch.tensor([1, 2999, 7], device=device)
    return [
        ("hybrid", lambda a: agkd_ops.hybrid_loss(a, maps.flip(0), padding="reflect", reduction="none"), maps),
        ("kd", lambda a: agkd_ops.kd_loss(a, logits.flip(0), targets, reduction="none"), logits),
        ("align", lambda a: agkd_ops.attention_align_loss(a, teacher_map, loss="hybrid", reduction="none"),
         maps[:, :, :28, :28].contiguous()),
        ("align_mse", lambda a: agkd_ops.attention_align_loss(a, teacher_map, reduction="none"),
         maps[:, :, :28, :28].contiguous()),
        ("attention_map", lambda a: agkd_ops.attention_map(a).sum((1, 2, 3)), feats),
    ]


def _run(fn, x):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    return out.detach(), grad


def test_every_op_is_bitwise_deterministic_whatever_the_thread_order(kernel_device, monkeypatch):
    # On the emulator the second and third runs schedule each block's threads in reverse and
    # shuffled order: fixed-order reductions give the same bits, a missing barrier does not.
    for name, fn, x in _every_op(kernel_device):
        runs = []
        for order in ("forward", "reverse", "shuffle"):
            monkeypatch.setenv("AGKD_CUDA_EMU_ORDER", order)
            runs.append(_run(fn, x))
        for out, grad in runs[1:]:
            assert torch.equal(out, runs[0][0]), name
            assert torch.equal(grad, runs[0][1]), name


def test_nan_in_one_sample_leaves_the_others_bitwise_unchanged(kernel_device):
    for name, fn, x in _every_op(kernel_device):
        bad = x.clone()
        bad[1].view(-1)[5] = float("nan")
        clean_out, clean_grad = _run(fn, x)
        bad_out, bad_grad = _run(fn, bad)
        assert torch.isnan(bad_out[1]), name
        assert torch.equal(bad_out[[0, 2]], clean_out[[0, 2]]), name
        assert torch.equal(bad_grad[[0, 2]], clean_grad[[0, 2]]), name


# ---------------------------------------------------------------------- real GPU only


@pytest.mark.cuda
def test_kernels_run_on_the_current_stream():
    x = torch.rand(8, 3, 56, 56, device="cuda", requires_grad=True)
    y = torch.rand(8, 3, 56, 56, device="cuda")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        x.grad = None
        loss = agkd_ops.hybrid_loss(x, y, padding="reflect")
        loss.backward()
        got = (loss.detach().clone(), x.grad.clone())
    side.synchronize()
    x.grad = None
    loss = agkd_ops.hybrid_loss(x, y, padding="reflect")
    loss.backward()
    assert torch.equal(got[0], loss) and torch.equal(got[1], x.grad)
