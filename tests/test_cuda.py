"""CUDA kernels against the CPU reference (skipped without a GPU)."""
import pytest
import torch

import agkd_ops
from agkd_ops import reference as R

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("native_backend")]

TOL = {torch.float64: 1e-10, torch.float32: 2e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("padding", ["valid", "reflect", "zeros"])
@pytest.mark.parametrize("shape,window", [((3, 2, 37, 29), 11), ((2, 1, 7, 5), 3), ((2, 4, 64, 70), 7)])
@pytest.mark.parametrize("alpha,beta", [(0.5, 0.5), (1.0, 0.0), (0.0, 1.0)])
def test_cuda_matches_reference(dtype, padding, shape, window, alpha, beta):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    y = torch.rand(shape, generator=g, dtype=torch.float64)
    kw = dict(alpha=alpha, beta=beta, window_size=window, padding=padding, reduction="none")
    want_x, want_y = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    want = R.hybrid_loss(want_x, want_y, **kw)
    want.sum().backward()
    got_x = x.to("cuda", dtype).requires_grad_(True)
    got_y = y.to("cuda", dtype).transpose(2, 3).contiguous().transpose(2, 3).requires_grad_(True)
    got = agkd_ops.hybrid_loss(got_x, got_y, **kw)
    got.sum().backward()
    tol = TOL[dtype]
    torch.testing.assert_close(got.double().cpu(), want, rtol=tol, atol=tol)
    scale = want_x.grad.abs().max().item() + 1e-12
    torch.testing.assert_close(got_x.grad.double().cpu(), want_x.grad, rtol=tol, atol=tol * scale)
    torch.testing.assert_close(got_y.grad.double().cpu(), want_y.grad, rtol=tol, atol=tol * scale)


def test_cuda_deterministic_and_on_current_stream():
    x = torch.rand(8, 3, 56, 56, device="cuda", requires_grad=True)
    y = torch.rand(8, 3, 56, 56, device="cuda")
    stream = torch.cuda.Stream()
    results = []
    with torch.cuda.stream(stream):
        for _ in range(2):
            x.grad = None
            loss = agkd_ops.hybrid_loss(x, y, padding="reflect")
            loss.backward()
            results.append((loss.detach().clone(), x.grad.clone()))
    torch.cuda.synchronize()
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_cuda_gradcheck():
    x = torch.rand(2, 2, 9, 8, device="cuda", dtype=torch.float64, requires_grad=True)
    y = torch.rand(2, 2, 9, 8, device="cuda", dtype=torch.float64, requires_grad=True)
    fn = lambda a, b: agkd_ops.hybrid_loss(a, b, window_size=5, padding="reflect", reduction="none")
    assert torch.autograd.gradcheck(fn, (x, y))


KD_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(5, 2), (33, 100), (4, 1000), (3, 100_000)])
@pytest.mark.parametrize("alpha", [None, 0.0, 0.7])
def test_cuda_kd_matches_reference(dtype, n, k, alpha):
    g = torch.Generator().manual_seed(0)
    s = 3 * torch.randn(n, k, generator=g, dtype=torch.float64)
    t = 3 * torch.randn(n, k, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (n,), generator=g)
    s, t = s.to(dtype).double(), t.to(dtype).double()  # compare on the same rounded values
    if alpha is None:
        native = lambda a, b: agkd_ops.kd_kl_div(a, b, temperature=2.0, reduction="none")
        ref = lambda a, b: R.kd_kl_div(a, b, temperature=2.0, reduction="none")
    else:
        native = lambda a, b: agkd_ops.kd_loss(a, b, y.cuda(), temperature=2.0, alpha=alpha, reduction="none")
        ref = lambda a, b: R.kd_loss(a, b, y, temperature=2.0, alpha=alpha, reduction="none")
    want_s, want_t = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    want = ref(want_s, want_t)
    want.sum().backward()
    got_s = s.to("cuda", dtype).requires_grad_(True)
    got_t = s.new_empty(k, n).copy_(t.t()).t().to("cuda", dtype).requires_grad_(True)  # strided
    got = native(got_s, got_t)
    got.sum().backward()
    tol = KD_TOL[dtype]
    torch.testing.assert_close(got.double().cpu(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(got_s.grad.double().cpu(), want_s.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(got_t.grad.double().cpu(), want_t.grad, rtol=tol, atol=tol)


def test_cuda_kd_deterministic_and_out_of_range_target_is_an_error():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(64, 3000, generator=g).cuda().requires_grad_(True)
    t = torch.randn(64, 3000, generator=g).cuda()
    y = torch.randint(0, 3000, (64,), generator=g).cuda()
    runs = []
    for _ in range(2):
        s.grad = None
        loss = agkd_ops.kd_loss(s, t, y)
        loss.backward()
        runs.append((loss.detach().clone(), s.grad.clone()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    with pytest.raises(ValueError, match="target"):
        agkd_ops.kd_loss(s, t, torch.full((64,), 3000, device="cuda"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("loss,kw", [("mse", {}), ("cosine", {}), ("ssim", {"window_size": 5, "padding": "reflect"}),
                                     ("hybrid", {"window_size": 7, "padding": "zeros"})])
@pytest.mark.parametrize("student,teacher,align_corners", [((7, 7), (14, 14), False), ((28, 28), (56, 56), True),
                                                           ((20, 13), (9, 17), False), ((5, 5), (5, 5), True)])
def test_cuda_align_matches_reference(dtype, loss, kw, student, teacher, align_corners):
    g = torch.Generator().manual_seed(0)
    s = torch.rand(3, 2, *student, generator=g, dtype=torch.float64)
    t = torch.rand(3, 2, *teacher, generator=g, dtype=torch.float64)
    s, t = s.to(dtype).double(), t.to(dtype).double()
    args = dict(loss=loss, align_corners=align_corners, reduction="none", **kw)
    want_s, want_t = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    want = R.attention_align_loss(want_s, want_t, **args)
    want.sum().backward()
    got_s = s.to("cuda", dtype).requires_grad_(True)
    got_t = t.to("cuda", dtype).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    got = agkd_ops.attention_align_loss(got_s, got_t, **args)
    got.sum().backward()
    tol = {torch.float64: 1e-9, torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(got.double().cpu(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(got_s.grad.double().cpu(), want_s.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(got_t.grad.double().cpu(), want_t.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("p,normalize", [(2.0, True), (1.0, True), (3.0, False), (0.5, True)])
def test_cuda_attention_map_matches_reference(dtype, p, normalize):
    g = torch.Generator().manual_seed(0)
    f = torch.randn(4, 40, 7, 9, generator=g, dtype=torch.float64).to(dtype).double()
    weights = torch.rand(4, 1, 7, 9, generator=g, dtype=torch.float64)
    want_f = f.clone().requires_grad_(True)
    want = R.attention_map(want_f, p=p, normalize=normalize)
    (want * weights).sum().backward()
    got_f = f.to("cuda", dtype).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    got = agkd_ops.attention_map(got_f, p=p, normalize=normalize)
    (got.double() * weights.cuda()).sum().backward()
    tol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(got.double().cpu(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(got_f.grad.double().cpu(), want_f.grad, rtol=tol, atol=tol)


def test_cuda_align_bitwise_deterministic():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(16, 1, 28, 28, generator=g).cuda().requires_grad_(True)
    t = torch.rand(16, 1, 56, 56, generator=g).cuda()
    runs = []
    for _ in range(2):
        s.grad = None
        loss = agkd_ops.attention_align_loss(s, t, loss="hybrid")
        loss.backward()
        runs.append((loss.detach().clone(), s.grad.clone()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
