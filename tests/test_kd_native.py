"""Native KD kernels (agkd::kd_fwd/bwd) against the reference: values and the gradients of
both logit tensors over random shapes, temperatures, weights, strides and dtypes;
gradcheck, opcheck, torch.compile, extreme logits, determinism and NaN isolation. Every
test runs under set_backend('native') so a silent fallback cannot pass."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import agkd_ops
from agkd_ops import reference as R

from .conftest import requires_native_cpu

pytestmark = [requires_native_cpu, pytest.mark.usefixtures("native_backend")]

TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (2e-5, 2e-6)}


def make_logits(n, k, layout, generator, scale=3.0):
    """float64 logits laid out as asked (same values for every layout)."""
    if layout == "transposed":
        return scale * torch.randn(k, n, generator=generator, dtype=torch.float64).t()
    if layout == "sliced":
        return scale * torch.randn(n, 2 * k, generator=generator, dtype=torch.float64)[:, ::2]
    if layout == "expanded":  # stride-0 batch: every row the same
        return scale * torch.randn(1, k, generator=generator, dtype=torch.float64).expand(n, k)
    return scale * torch.randn(n, k, generator=generator, dtype=torch.float64)


def loss_and_grads(fn, s, t, weights):
    s = s.detach().requires_grad_(True)
    t = t.detach().requires_grad_(True)
    out = fn(s, t)
    gs, gt = torch.autograd.grad((out.double() * weights).sum(), (s, t))
    return out, gs, gt


@st.composite
def kd_case(draw):
    return dict(
        n=draw(st.integers(1, 9)),
        k=draw(st.one_of(st.integers(1, 40), st.integers(1000, 3000))),
        temperature=draw(st.floats(0.05, 50)),
        alpha=draw(st.floats(0, 1)),
        scale=draw(st.sampled_from([0.01, 3.0, 100.0])),
        layout=draw(st.sampled_from(["contiguous", "transposed", "sliced", "expanded"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@given(case=kd_case(), dtype=st.sampled_from([torch.float64, torch.float32]),
       with_ce=st.booleans())
def test_native_matches_reference(case, dtype, with_ce):
    g = torch.Generator().manual_seed(case["seed"])
    n, k = case["n"], case["k"]
    s = make_logits(n, k, case["layout"], g, case["scale"]).to(dtype)
    t = make_logits(n, k, "contiguous", g, case["scale"]).to(dtype)
    y = torch.randint(0, k, (n,), generator=g)
    weights = torch.rand(n, generator=g, dtype=torch.float64)
    tau, alpha = case["temperature"], case["alpha"]
    if with_ce:
        native = lambda a, b: agkd_ops.kd_loss(a, b, y, temperature=tau, alpha=alpha, reduction="none")
        ref = lambda a, b: R.kd_loss(a, b, y, temperature=tau, alpha=alpha, reduction="none")
    else:
        native = lambda a, b: agkd_ops.kd_kl_div(a, b, temperature=tau, reduction="none")
        ref = lambda a, b: R.kd_kl_div(a, b, temperature=tau, reduction="none")
    out, gs, gt = loss_and_grads(native, s, t, weights)
    want, wgs, wgt = loss_and_grads(ref, s.double(), t.double(), weights)
    assert out.dtype == dtype and out.shape == (n,)
    assert gs.dtype == dtype and gs.shape == (n, k) and gt.shape == (n, k)
    rtol, atol = TOL[dtype]
    # Losses scale with τ² and the logits' spread; compare relative to that size.
    size = max(1.0, tau**2, want.abs().max().item())
    torch.testing.assert_close(out.double(), want, rtol=rtol, atol=atol * size)
    grad_size = max(1.0, tau, case["scale"])
    torch.testing.assert_close(gs.double(), wgs, rtol=rtol, atol=atol * grad_size)
    torch.testing.assert_close(gt.double(), wgt, rtol=rtol, atol=atol * grad_size)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_kd_kl_div_parity_with_torch_composition(reduction):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(64, 100, generator=g, requires_grad=True)
    t = torch.randn(64, 100, generator=g, requires_grad=True)
    tau = 4.0
    got = agkd_ops.kd_kl_div(s, t, temperature=tau, reduction=reduction)
    want = tau**2 * F.kl_div(F.log_softmax(s / tau, 1), F.log_softmax(t / tau, 1), log_target=True,
                             reduction=reduction)
    if reduction == "none":
        want = want.sum(1)
    # The composition's error, not ours (we sum in double): its float32 log-probabilities
    # are each off by a few ulp of log K, and a row's KL at τ=4 is small (~0.05), so a
    # row's value carries ~1e-5 relative error (9.99e-6 seen), which depends on the CPU's
    # vector width; sums over rows average it out.
    torch.testing.assert_close(got, want, rtol=1e-4 if reduction == "none" else 1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(got.sum(), (s, t)), torch.autograd.grad(want.sum(), (s, t))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_kd_loss_parity_with_cross_entropy():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(64, 100, generator=g, requires_grad=True)
    t = torch.randn(64, 100, generator=g)
    y = torch.randint(0, 100, (64,), generator=g)
    ce = agkd_ops.kd_loss(s, t, y, alpha=0.0)  # alpha = 0: the cross-entropy alone
    want = F.cross_entropy(s, y)
    torch.testing.assert_close(ce, want)
    torch.testing.assert_close(torch.autograd.grad(ce, s)[0], torch.autograd.grad(want, s)[0])
    tau, alpha = 3.0, 0.7
    mixed = agkd_ops.kd_loss(s, t, y, temperature=tau, alpha=alpha)
    torch.testing.assert_close(mixed, (1 - alpha) * want + alpha * agkd_ops.kd_kl_div(s, t, temperature=tau))


def test_int32_targets_equal_int64():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    y = torch.randint(0, 5, (8,), generator=g)
    assert torch.equal(agkd_ops.kd_loss(s, t, y), agkd_ops.kd_loss(s, t, y.int()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_float32(dtype):
    g = torch.Generator().manual_seed(0)
    s = (4 * torch.randn(32, 500, generator=g)).to(dtype)
    t = (4 * torch.randn(32, 500, generator=g)).to(dtype)
    y = torch.randint(0, 500, (32,), generator=g)
    out, gs, gt = loss_and_grads(lambda a, b: agkd_ops.kd_loss(a, b, y, reduction="none"), s, t,
                                 torch.ones(32, dtype=torch.float64))
    want, wgs, wgt = loss_and_grads(lambda a, b: R.kd_loss(a, b, y, reduction="none"), s.double(),
                                    t.double(), torch.ones(32, dtype=torch.float64))
    assert out.dtype == dtype and gs.dtype == dtype
    # Only the output's own rounding is left: the sums ran in float32 on the exact inputs.
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.double(), want, rtol=eps, atol=0)
    torch.testing.assert_close(gs.double(), wgs, rtol=eps, atol=1e-6)
    torch.testing.assert_close(gt.double(), wgt, rtol=eps, atol=1e-6)


@pytest.mark.parametrize("with_ce", [False, True])
def test_gradcheck_float64(with_ce):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 6, 3])
    if with_ce:
        fn = lambda a, b: agkd_ops.kd_loss(a, b, y, temperature=2.5, alpha=0.4, reduction="none")
    else:
        fn = lambda a, b: agkd_ops.kd_kl_div(a, b, temperature=2.5, reduction="none")
    assert torch.autograd.gradcheck(fn, (s, t))


@pytest.mark.parametrize("ce_weight,kl_weight", [(0.0, 1.0), (0.1, 0.9), (1.0, 0.0)])
def test_opcheck(ce_weight, kl_weight):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(5, 11, generator=g, requires_grad=True)
    t = torch.randn(5, 11, generator=g, requires_grad=True)
    y = torch.randint(0, 11, (5,), generator=g) if ce_weight else None
    args = (s, t, y, 2.0, ce_weight, kl_weight)
    torch.library.opcheck(torch.ops.agkd.kd_fwd, args)
    _loss, stats = torch.ops.agkd.kd_fwd(*args)
    bwd_args = (torch.rand(5), s.detach(), t.detach(), y, stats) + args[3:] + (True, True)
    torch.library.opcheck(torch.ops.agkd.kd_bwd, bwd_args,
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph():
    criterion = agkd_ops.KDLoss(temperature=4.0, alpha=0.9)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(s, t, y):
        return criterion(s, t, y)

    g = torch.Generator().manual_seed(0)
    s = torch.randn(8, 10, generator=g, requires_grad=True)
    t = torch.randn(8, 10, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    loss = step(s, t, y)
    loss.backward()
    s2 = s.detach().clone().requires_grad_(True)
    want = criterion(s2, t, y)
    want.backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(s.grad, s2.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_logits_are_finite_and_right(dtype):
    s = torch.tensor([[1e4, -1e4, 0.0, 5e3], [-1e4, -1e4, -1e4, -1e4 + 1]], dtype=dtype)
    t = torch.tensor([[-1e4, 1e4, 3.0, 0.0], [1e4, 1e4 - 2, 1e4, 1e4]], dtype=dtype)
    y = torch.tensor([1, 3])
    for tau in (1.0, 4.0):
        out, gs, gt = loss_and_grads(
            lambda a, b: agkd_ops.kd_loss(a, b, y, temperature=tau, alpha=0.5, reduction="none"), s, t,
            torch.ones(2, dtype=torch.float64))
        want, wgs, wgt = loss_and_grads(
            lambda a, b: R.kd_loss(a, b, y, temperature=tau, alpha=0.5, reduction="none"), s.double(),
            t.double(), torch.ones(2, dtype=torch.float64))
        assert torch.isfinite(out).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()
        # Losses of order 1e4·τ: float32 keeps about 7 digits of them.
        rtol = 1e-6 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(out.double(), want, rtol=rtol, atol=0)
        torch.testing.assert_close(gs.double(), wgs, rtol=rtol, atol=rtol)
        torch.testing.assert_close(gt.double(), wgt, rtol=rtol, atol=rtol * tau)


def test_teacher_minus_infinity_matches_reference():
    s = torch.tensor([[1.0, 2.0, 0.5, -1.0]], requires_grad=True)
    t = torch.tensor([[0.3, float("-inf"), 1.2, float("-inf")]])
    out, gs, gt = loss_and_grads(lambda a, b: agkd_ops.kd_kl_div(a, b, temperature=2.0), s, t,
                                 torch.ones((), dtype=torch.float64))
    want, wgs, wgt = loss_and_grads(lambda a, b: R.kd_kl_div(a, b, temperature=2.0), s.double(),
                                    t.double(), torch.ones((), dtype=torch.float64))
    assert torch.isfinite(out) and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    torch.testing.assert_close(out.double(), want)
    torch.testing.assert_close(gs.double(), wgs)
    torch.testing.assert_close(gt.double(), wgt)


def test_rows_longer_than_a_chunk_and_huge_class_counts():
    # K = 100 000: many 1024-logit chunks per row (and many CUDA blocks' worth).
    g = torch.Generator().manual_seed(0)
    s = 5 * torch.randn(3, 100_000, generator=g)
    t = 5 * torch.randn(3, 100_000, generator=g)
    y = torch.tensor([0, 99_999, 51_234])
    out, gs, gt = loss_and_grads(lambda a, b: agkd_ops.kd_loss(a, b, y, reduction="none"), s, t,
                                 torch.ones(3, dtype=torch.float64))
    want, wgs, wgt = loss_and_grads(lambda a, b: R.kd_loss(a, b, y, reduction="none"), s.double(),
                                    t.double(), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gs.double(), wgs, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(gt.double(), wgt, rtol=1e-4, atol=1e-9)


def test_bitwise_deterministic_and_thread_count_independent():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(300, 700, generator=g, requires_grad=True)
    t = torch.randn(300, 700, generator=g, requires_grad=True)
    y = torch.randint(0, 700, (300,), generator=g)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n_threads in (threads, threads, 1):
            torch.set_num_threads(n_threads)
            s.grad = t.grad = None
            loss = agkd_ops.kd_loss(s, t, y, reduction="none")
            loss.sum().backward()
            runs.append((loss.detach().clone(), s.grad.clone(), t.grad.clone()))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_nan_in_one_row_leaves_others_bitwise_unchanged():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, 50, generator=g)
    t = torch.randn(4, 50, generator=g)
    y = torch.randint(0, 50, (4,), generator=g)
    bad = t.clone()
    bad[2, 7] = float("nan")

    def run(teacher):
        a = s.clone().requires_grad_(True)
        out = agkd_ops.kd_loss(a, teacher, y, reduction="none")
        out.sum().backward()
        return out.detach(), a.grad

    clean_out, clean_grad = run(t)
    bad_out, bad_grad = run(bad)
    assert torch.isnan(bad_out[2]) and torch.isnan(bad_grad[2]).all()
    keep = [0, 1, 3]
    assert torch.equal(bad_out[keep], clean_out[keep])
    assert torch.equal(bad_grad[keep], clean_grad[keep])


def test_only_requested_gradients_are_computed():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, 9, generator=g, requires_grad=True)
    t = torch.randn(4, 9, generator=g)
    agkd_ops.kd_kl_div(s, t).backward()
    assert s.grad is not None and t.grad is None
    # The teacher alone may train too.
    s2, t2 = s.detach(), t.clone().requires_grad_(True)
    agkd_ops.kd_kl_div(s2, t2).backward()
    t3 = t.clone().requires_grad_(True)
    R.kd_kl_div(s2, t3).backward()
    torch.testing.assert_close(t2.grad, t3.grad)


def test_cross_entropy_only_gives_teacher_a_zero_gradient():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, 9, generator=g, requires_grad=True)
    t = torch.randn(4, 9, generator=g, requires_grad=True)
    agkd_ops.kd_loss(s, t, torch.tensor([1, 2, 3, 4]), alpha=0.0).backward()
    assert torch.equal(t.grad, torch.zeros_like(t))


def test_out_of_range_target_in_a_direct_op_call_is_nan_not_a_crash():
    s, t = torch.randn(2, 5), torch.randn(2, 5)
    loss, _ = torch.ops.agkd.kd_fwd(s, t, torch.tensor([1, 7]), 1.0, 0.5, 0.5)
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1])


def test_double_backward_raises_clearly():
    s = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 5, dtype=torch.float64)
    (gs,) = torch.autograd.grad(agkd_ops.kd_kl_div(s, t), s, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        gs.sum().backward()
