"""agkd::kd_fwd and the functions on it: kd_kl_div and kd_loss.

On every backend (tests/backends.py): values against a NumPy oracle and the
torch.nn.functional compositions users know, every dtype against the float64 reference (on
the reference backend: its low-precision paths), reductions, modules, extreme logits, a
teacher logit of -inf, the options (label smoothing, probability targets, ignore_index),
gradcheck, NaN isolation, determinism, every bad input. On the native backends: values and
the gradients of both logit tensors against the float64 reference over random shapes,
temperatures, weights and strides, and checks of the compiled op itself (opcheck,
torch.compile, which gradients are computed, direct op calls, double backward)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import agkd_ops
from agkd_ops import reference as R

from . import oracle
from .backends import (FLOAT_DTYPES, against_the_reference, assert_clear_error, assert_nan_stays_in_its_sample,
                       close, grads, rounded)

# Row sums run in double on every backend; what is left is the output's own rounding.
KD_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def make_logits(n, k, layout, generator, scale=3.0):
    """float64 logits laid out as asked (same values for every layout)."""
    if layout == "transposed":
        return scale * torch.randn(k, n, generator=generator, dtype=torch.float64).t()
    if layout == "sliced":
        return scale * torch.randn(n, 2 * k, generator=generator, dtype=torch.float64)[:, ::2]
    if layout == "expanded":  # stride-0 batch: every row the same
        return scale * torch.randn(1, k, generator=generator, dtype=torch.float64).expand(n, k)
    return scale * torch.randn(n, k, generator=generator, dtype=torch.float64)


# ---------------------------------------------------------- against independent oracles


@given(n=st.integers(1, 6), k=st.integers(1, 40), temperature=st.floats(0.1, 20),
       kd_weight=st.floats(0, 1), scale=st.sampled_from([0.1, 3.0, 50.0]), seed=st.integers(0, 2**31 - 1))
def test_matches_numpy_oracle(backend, n, k, temperature, kd_weight, scale, seed):
    g = torch.Generator().manual_seed(seed)
    s = scale * torch.randn(n, k, generator=g, dtype=torch.float64)
    t = scale * torch.randn(n, k, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (n,), generator=g)
    kl = oracle.kd_kl_per_sample(s.numpy(), t.numpy(), temperature)
    ce = oracle.cross_entropy_per_sample(s.numpy(), y.numpy())
    ds, dt, dy = s.to(backend.device), t.to(backend.device), y.to(backend.device)
    np.testing.assert_allclose(agkd_ops.kd_kl_div(ds, dt, temperature=temperature, reduction="none").cpu().numpy(),
                               kl, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(
        agkd_ops.kd_loss(ds, dt, dy, temperature=temperature, kd_weight=kd_weight, reduction="none").cpu().numpy(),
        (1 - kd_weight) * ce + kd_weight * kl, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_kl_div_matches_the_torch_composition_in_float64(backend, reduction):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(16, 30, generator=g, dtype=torch.float64)
    t = torch.randn(16, 30, generator=g, dtype=torch.float64)
    tau = 3.0

    def composition(a, b):
        out = tau**2 * F.kl_div(F.log_softmax(a / tau, 1), F.log_softmax(b / tau, 1), log_target=True,
                                reduction=reduction)
        return out.sum(1) if reduction == "none" else out

    got = grads(lambda a, b: agkd_ops.kd_kl_div(a, b, temperature=tau, reduction=reduction),
                s.to(backend.device), t.to(backend.device))
    want = grads(composition, s, t)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_float32_kl_div_matches_the_torch_composition(backend, reduction):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(64, 100, generator=g)
    t = torch.randn(64, 100, generator=g)
    tau = 4.0
    got = grads(lambda a, b: agkd_ops.kd_kl_div(a, b, temperature=tau, reduction=reduction),
                s.to(backend.device), t.to(backend.device))
    want = grads(lambda a, b: (lambda o: o.sum(1) if reduction == "none" else o)(
        tau**2 * F.kl_div(F.log_softmax(a / tau, 1), F.log_softmax(b / tau, 1), log_target=True,
                          reduction=reduction)), s, t)
    # The composition's error, not ours (we sum in double): its float32 log-probabilities
    # are each off by a few ulp of log K, and a row's KL at τ=4 is small (~0.05), so a
    # row's value carries ~1e-5 relative error (9.99e-6 seen), which depends on the CPU's
    # vector width; sums over rows average it out.
    torch.testing.assert_close(got[0].cpu(), want[0], rtol=1e-4 if reduction == "none" else 1e-5, atol=1e-6)
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-7)


def test_kd_loss_matches_cross_entropy_and_the_composition(backend):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(64, 100, generator=g)
    t = torch.randn(64, 100, generator=g)
    y = torch.randint(0, 100, (64,), generator=g)
    ds, dt, dy = s.to(backend.device), t.to(backend.device), y.to(backend.device)
    ce = grads(lambda a: agkd_ops.kd_loss(a, dt, dy, kd_weight=0.0), ds)  # kd_weight = 0: the cross-entropy alone
    want = grads(lambda a: F.cross_entropy(a, y), s)
    for a, b in zip(ce, want):
        torch.testing.assert_close(a.cpu(), b)
    tau, kd_weight = 2.0, 0.3
    s64, t64 = s.double(), t.double()
    composition = (1 - kd_weight) * F.cross_entropy(s64, y) + kd_weight * tau**2 * F.kl_div(
        F.log_softmax(s64 / tau, 1), F.log_softmax(t64 / tau, 1), log_target=True, reduction="batchmean")
    got = agkd_ops.kd_loss(s64.to(backend.device), t64.to(backend.device), dy, temperature=tau, kd_weight=kd_weight)
    torch.testing.assert_close(got.cpu(), composition)


def test_teacher_minus_infinity_contributes_nothing(backend):
    s = torch.tensor([[1.0, 2.0, 0.5]], dtype=torch.float64)
    t = torch.tensor([[0.3, float("-inf"), 1.2]], dtype=torch.float64)
    out, gs, gt = grads(lambda a, b: agkd_ops.kd_kl_div(a, b, temperature=1.0), s.to(backend.device),
                        t.to(backend.device))
    # The class the teacher rules out (p_t = 0) drops from the sum; p_s keeps all classes.
    kept = [0, 2]
    log_p_s = torch.log_softmax(s, 1)[:, kept]
    p_t = torch.softmax(t[:, kept], 1)
    torch.testing.assert_close(out.cpu(), (p_t * (p_t.log() - log_p_s)).sum())
    assert torch.isfinite(gs).all() and torch.isfinite(gt).all()


# ------------------------------------------------- against the float64 reference, swept


@st.composite
def kd_case(draw):
    return dict(
        n=draw(st.integers(1, 9)),
        k=draw(st.one_of(st.integers(1, 40), st.integers(1000, 3000))),
        temperature=draw(st.floats(0.05, 50)),
        kd_weight=draw(st.floats(0, 1)),
        scale=draw(st.sampled_from([0.01, 3.0, 100.0])),
        layout=draw(st.sampled_from(["contiguous", "transposed", "sliced", "expanded"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@given(case=kd_case(), dtype=st.sampled_from([torch.float64, torch.float32]), with_ce=st.booleans())
def test_matches_reference_on_random_logits(native, case, dtype, with_ce):
    backend = native
    g = torch.Generator().manual_seed(case["seed"])
    n, k = case["n"], case["k"]
    s = make_logits(n, k, case["layout"], g, case["scale"]).to(dtype)
    t = make_logits(n, k, "contiguous", g, case["scale"]).to(dtype)
    y = torch.randint(0, k, (n,), generator=g)
    weights = torch.rand(n, generator=g, dtype=torch.float64)
    tau, kd_weight = case["temperature"], case["kd_weight"]
    dy = y.to(backend.device)
    if with_ce:
        fn = lambda a, b: agkd_ops.kd_loss(a, b, dy, temperature=tau, kd_weight=kd_weight, reduction="none")
        ref = lambda a, b: R.kd_loss(a, b, y, temperature=tau, kd_weight=kd_weight, reduction="none")
    else:
        fn = lambda a, b: agkd_ops.kd_kl_div(a, b, temperature=tau, reduction="none")
        ref = lambda a, b: R.kd_kl_div(a, b, temperature=tau, reduction="none")
    out, gs, gt = grads(fn, s.to(backend.device), t.to(backend.device), weights=weights)
    want, wgs, wgt = grads(ref, s.double(), t.double(), weights=weights)
    assert out.dtype == dtype and out.shape == (n,)
    assert gs.dtype == dtype and gs.shape == (n, k) and gt.shape == (n, k)
    rtol, atol = {torch.float64: (1e-10, 1e-12), torch.float32: (2e-5, 2e-6)}[dtype]
    # Losses scale with τ² and the logits' spread; compare relative to that size.
    size = max(1.0, tau**2, want.abs().max().item())
    torch.testing.assert_close(out.double().cpu(), want, rtol=rtol, atol=atol * size)
    grad_size = max(1.0, tau, case["scale"])
    torch.testing.assert_close(gs.double().cpu(), wgs, rtol=rtol, atol=atol * grad_size)
    torch.testing.assert_close(gt.double().cpu(), wgt, rtol=rtol, atol=atol * grad_size)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
# K = 2 (one partial stride), 100, 1000 (several strides), 100000 (backward grid.y chunks)
@pytest.mark.parametrize("n,k", [(5, 2), (33, 100), (4, 1000), (3, 100_000)])
@pytest.mark.parametrize("kd_weight", [None, 0.0, 0.7])
def test_matches_reference_in_every_dtype(backend, dtype, n, k, kd_weight):
    against_the_reference(backend, dtype)
    g = torch.Generator().manual_seed(0)
    s, t = rounded((n, k), dtype, g, 3.0, randn=True), rounded((n, k), dtype, g, 3.0, randn=True)
    y = torch.randint(0, k, (n,), generator=g)
    if kd_weight is None:
        fn = lambda a, b: agkd_ops.kd_kl_div(a, b, temperature=2.0, reduction="none")
        ref = lambda a, b: R.kd_kl_div(a, b, temperature=2.0, reduction="none")
    else:
        fn = lambda a, b: agkd_ops.kd_loss(a, b, y.to(backend.device), temperature=2.0, kd_weight=kd_weight,
                                           reduction="none")
        ref = lambda a, b: R.kd_loss(a, b, y, temperature=2.0, kd_weight=kd_weight, reduction="none")
    want = grads(ref, s, t)
    got_t = t.t().contiguous().t().to(backend.device, dtype)  # column-major: strided rows
    got = grads(fn, s.to(backend.device, dtype), got_t)
    for a, b in zip(got, want):
        close(a, b, KD_TOL[dtype])


def test_kernel_row_values_keep_float32_accuracy_at_high_temperature(native):
    # KL = w/z_t - log z_t + log z_s cancels terms of the size of log K, and τ² = 16 then
    # scales what is left of the rounding: the kernels sum row totals in double. (The
    # reference is plain float32 log_softmax arithmetic: 1.1e-5 relative here, like the
    # F.kl_div composition.) Seen: CUDA kernels 2.0e-6, CPU kernels 2.8e-6.
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(64, 100, generator=g), torch.randn(64, 100, generator=g)
    got = agkd_ops.kd_kl_div(s.to(native.device), t.to(native.device), temperature=4.0, reduction="none")
    want = R.kd_kl_div(s.double(), t.double(), temperature=4.0, reduction="none")
    torch.testing.assert_close(got.double().cpu(), want, rtol=4e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_float32(backend, dtype):
    g = torch.Generator().manual_seed(0)
    s = (4 * torch.randn(32, 500, generator=g)).to(dtype)
    t = (4 * torch.randn(32, 500, generator=g)).to(dtype)
    y = torch.randint(0, 500, (32,), generator=g)
    dy = y.to(backend.device)
    out, gs, gt = grads(lambda a, b: agkd_ops.kd_loss(a, b, dy, reduction="none"), s.to(backend.device),
                        t.to(backend.device))
    want, wgs, wgt = grads(lambda a, b: R.kd_loss(a, b, y, reduction="none"), s.double(), t.double())
    assert out.dtype == dtype and gs.dtype == dtype
    # Only the output's own rounding is left: the sums ran in float32 on the exact inputs.
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.double().cpu(), want, rtol=eps, atol=0)
    torch.testing.assert_close(gs.double().cpu(), wgs, rtol=eps, atol=1e-6)
    torch.testing.assert_close(gt.double().cpu(), wgt, rtol=eps, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_logits_are_finite_and_right(backend, dtype):
    s = torch.tensor([[1e4, -1e4, 0.0, 5e3], [-1e4, -1e4, -1e4, -1e4 + 1]], dtype=dtype)
    t = torch.tensor([[-1e4, 1e4, 3.0, 0.0], [1e4, 1e4 - 2, 1e4, 1e4]], dtype=dtype)
    y = torch.tensor([1, 3])
    for tau in (1.0, 4.0):
        out, gs, gt = grads(
            lambda a, b: agkd_ops.kd_loss(a, b, y.to(backend.device), temperature=tau, kd_weight=0.5, reduction="none"),
            s.to(backend.device), t.to(backend.device))
        want, wgs, wgt = grads(lambda a, b: R.kd_loss(a, b, y, temperature=tau, kd_weight=0.5, reduction="none"),
                               s.double(), t.double())
        assert torch.isfinite(out).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()
        # Losses of order 1e4·τ: float32 keeps about 7 digits of them.
        rtol = 1e-6 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(out.double().cpu(), want, rtol=rtol, atol=0)
        torch.testing.assert_close(gs.double().cpu(), wgs, rtol=rtol, atol=rtol)
        torch.testing.assert_close(gt.double().cpu(), wgt, rtol=rtol, atol=rtol * tau)


def test_int32_targets_equal_int64(backend):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 5, generator=g).to(backend.device), torch.randn(8, 5, generator=g).to(backend.device)
    y = torch.randint(0, 5, (8,), generator=g).to(backend.device)
    assert torch.equal(agkd_ops.kd_loss(s, t, y), agkd_ops.kd_loss(s, t, y.int()))


def test_out_of_range_target(backend):
    """The reference and the CPU kernels raise before reading a logit. The CUDA kernels
    cannot look at the targets without syncing the device, so a row with an out-of-range
    target gets a NaN loss and the other rows' values and gradients stay what they are."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, 30, generator=g).to(backend.device).requires_grad_(True)
    t = torch.randn(4, 30, generator=g).to(backend.device)
    target = torch.tensor([3, 30, -1, 29], device=backend.device)
    if not backend.cuda_kernels:
        with pytest.raises(ValueError, match=r"agkd_ops.kd_loss: target must hold class indices in \[0, 30\) "
                                             r"for K=30 classes, got values from -1 to 30 \(there is no ignore_index\)"):
            agkd_ops.kd_loss(s, t, target)
        with pytest.raises(ValueError, match="got values from -100 to 3"):
            agkd_ops.kd_loss(s, t, torch.tensor([0, -100, 2, 3], device=backend.device))
        return
    loss = agkd_ops.kd_loss(s, t, target, reduction="none")
    loss.sum().backward()
    assert torch.isnan(loss[1]) and torch.isnan(loss[2]) and torch.isnan(agkd_ops.kd_loss(s, t, target))
    good = torch.tensor([0, 3], device=backend.device)
    s_good = s.detach()[good].requires_grad_(True)
    alone = agkd_ops.kd_loss(s_good, t[good], target[good], reduction="none")
    alone.sum().backward()
    assert torch.equal(loss[good].detach(), alone.detach())
    assert torch.equal(s.grad[good], s_good.grad)


# ------------------------------------------------------------ gradients, NaN, determinism


@pytest.mark.parametrize("with_ce", [False, True])
def test_gradcheck_float64(backend, with_ce):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 7, generator=g, dtype=torch.float64).to(backend.device).requires_grad_(True)
    t = torch.randn(3, 7, generator=g, dtype=torch.float64).to(backend.device).requires_grad_(True)
    y = torch.tensor([0, 6, 3], device=backend.device)
    if with_ce:
        fn = lambda a, b: agkd_ops.kd_loss(a, b, y, temperature=2.5, kd_weight=0.4, reduction="none")
    else:
        fn = lambda a, b: agkd_ops.kd_kl_div(a, b, temperature=2.5, reduction="none")
    assert torch.autograd.gradcheck(fn, (s, t))


def test_nan_in_one_row_leaves_others_bitwise_unchanged(backend):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, 50, generator=g).to(backend.device)
    t = torch.randn(4, 50, generator=g).to(backend.device)
    y = torch.randint(0, 50, (4,), generator=g).to(backend.device)
    # A NaN teacher logit: the row's loss and the student's whole gradient row are NaN.
    dirty = assert_nan_stays_in_its_sample(lambda a, b: agkd_ops.kd_loss(a, b, y, reduction="none"), (s, t), 1,
                                           (2, 7))
    assert torch.isnan(dirty[1][2]).all()


def test_bitwise_deterministic_and_thread_count_independent(backend):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(300, 700, generator=g).to(backend.device)
    t = torch.randn(300, 700, generator=g).to(backend.device)
    y = torch.randint(0, 700, (300,), generator=g).to(backend.device)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n_threads in (threads, threads, 1):
            torch.set_num_threads(n_threads)
            runs.append(grads(lambda a, b: agkd_ops.kd_loss(a, b, y, reduction="none"), s, t))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


# ------------------------------------------------------------------ the compiled op


@pytest.mark.parametrize("ce_weight,kl_weight,target,smoothing,ignore_index,reduction", [
    (0.0, 1.0, None, 0.0, None, "mean"),
    (0.1, 0.9, "classes", 0.0, None, "none"),
    (1.0, 0.0, "classes", 0.0, None, "sum"),
    (0.3, 0.7, "classes", 0.1, 3, "mean"),
    (0.0, 1.0, "classes", 0.0, 3, "mean"),
    (0.5, 0.5, "probabilities", 0.2, None, "mean"),
])
def test_opcheck(native, ce_weight, kl_weight, target, smoothing, ignore_index, reduction):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(5, 11, generator=g).to(native.device).requires_grad_(True)
    t = torch.randn(5, 11, generator=g).to(native.device).requires_grad_(True)
    y = None if target is None else make_targets(target, 5, 11, torch.float32, g).to(native.device)
    if target == "probabilities":
        y = y.float()
    elif ignore_index is not None:
        y[0] = ignore_index
    params = (2.0, ce_weight, kl_weight, smoothing, ignore_index, reduction)
    torch.library.opcheck(torch.ops.agkd.kd_fwd, (s, t, y) + params + (True, True))
    torch.library.opcheck(torch.ops.agkd.kd_fwd, (s, t.detach(), y) + params + (True, False))
    # No gradient asked for: empty ones.
    torch.library.opcheck(torch.ops.agkd.kd_fwd, (s.detach(), t.detach(), y) + params)


# ------------------------------------------------- gradients written by the forward


def _kd_case(device, dtype=torch.float32, target="classes"):
    g = torch.Generator().manual_seed(3)
    s = (3 * torch.randn(6, 13, generator=g)).to(device, dtype).requires_grad_(True)
    t = (3 * torch.randn(6, 13, generator=g)).to(device, dtype).requires_grad_(True)
    y = make_targets(target, 6, 13, dtype, g).to(device)
    return s, t, y


def test_the_forward_writes_no_gradient_unless_one_is_needed(native):
    """Under no_grad, or for inputs that need none, the op is asked for none (the kernel
    then writes nothing beyond the loss and stats)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Flags(TorchDispatchMode):
        seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._schema.name == "agkd::kd_fwd":
                named = {a.name: a.default_value for a in func._schema.arguments}
                named.update(zip((a.name for a in func._schema.arguments), args), **(kwargs or {}))
                self.seen.append((named["needs_grad_student"], named["needs_grad_teacher"]))
            return func(*args, **(kwargs or {}))

    s, t, y = _kd_case(native.device)
    with Flags() as mode:
        with torch.no_grad():
            agkd_ops.kd_loss(s, t, y)
        agkd_ops.kd_loss(s, t.detach(), y)
        agkd_ops.kd_loss(s, t, y)
        agkd_ops.kd_kl_div(s.detach(), t)
    assert mode.seen == [(False, False), (True, False), (True, True), (False, True)]
    loss, stats, grad_s, grad_t = torch.ops.agkd.kd_fwd(s.detach(), t.detach(), y, 2.0, 0.5, 0.5, 0.0, None, "mean")
    assert grad_s.numel() == 0 and grad_t.numel() == 0


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_forward_gradients_scale_by_the_upstream_gradient(native, reduction):
    """loss.backward() hands over the forward's gradient; any other upstream gradient
    scales it, exactly for a power of two; a retained graph gives the same gradient again
    (the first backward must not have handed over, and so exposed, the saved tensor)."""
    s, t, y = _kd_case(native.device)
    upstream = torch.ones(6, device=native.device) if reduction == "none" else torch.tensor(1.0, device=native.device)

    def grads(scale, retain=False):
        s.grad = t.grad = None
        loss = agkd_ops.kd_loss(s, t, y, reduction=reduction, label_smoothing=0.1)
        loss.backward(upstream * scale, retain_graph=retain)
        if retain:
            loss.backward(upstream * scale)
        return s.grad.clone(), t.grad.clone()

    one, two, twice = grads(1.0), grads(2.0), grads(1.0, retain=True)
    for a, b, c in zip(one, two, twice):
        assert torch.equal(b, 2 * a) and torch.equal(c, 2 * a)
    before = (s.detach().clone(), t.detach().clone())
    grads(0.5)
    assert torch.equal(s.detach(), before[0]) and torch.equal(t.detach(), before[1]), "an input was overwritten"


@pytest.mark.parametrize("options", [dict(), dict(label_smoothing=0.2, ignore_index=2), dict(kd_weight=1.0),
                                     dict(kd_weight=0.0)])
def test_forward_gradients_equal_the_float64_reference(native, options):
    s, t, y = _kd_case(native.device)
    if "ignore_index" in options:
        y[1] = 2
    loss = agkd_ops.kd_loss(s, t, y, temperature=3.0, **options)
    gs, gt = torch.autograd.grad(loss * 0.75, (s, t))
    s64, t64 = s.detach().double().requires_grad_(True), t.detach().double().requires_grad_(True)
    want = R.kd_loss(s64, t64, y, temperature=3.0, **options)
    ws, wt = torch.autograd.grad(want * 0.75, (s64, t64))
    torch.testing.assert_close(gs.double(), ws, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gt.double(), wt, rtol=1e-5, atol=1e-6)


def test_no_term_is_a_clear_error_in_a_direct_op_call(native):
    s = torch.randn(2, 5, device=native.device)
    with pytest.raises(RuntimeError, match="non-zero weight"):
        torch.ops.agkd.kd_fwd(s, s, None, 1.0, 0.0, 0.0, 0.0, None, "mean")


@pytest.mark.parametrize("options,target", [({}, "classes"), (dict(label_smoothing=0.1, ignore_index=-100), "classes"),
                                            (dict(label_smoothing=0.2), "probabilities")])
def test_torch_compile_fullgraph(native, options, target):
    criterion = agkd_ops.KDLoss(temperature=4.0, kd_weight=0.9, **options)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(s, t, y):
        return criterion(s, t, y)

    g = torch.Generator().manual_seed(0)
    s = torch.randn(8, 10, generator=g).to(native.device).requires_grad_(True)
    t = torch.randn(8, 10, generator=g).to(native.device)
    y = make_targets(target, 8, 10, torch.float32, g, options.get("ignore_index")).to(native.device)
    y = y.float() if target == "probabilities" else y
    loss = step(s, t, y)
    loss.backward()
    s2 = s.detach().clone().requires_grad_(True)
    want = criterion(s2, t, y)
    want.backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(s.grad, s2.grad)


def test_only_requested_gradients_are_computed(native):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, 9, generator=g).to(native.device).requires_grad_(True)
    t = torch.randn(4, 9, generator=g).to(native.device)
    agkd_ops.kd_kl_div(s, t).backward()
    assert s.grad is not None and t.grad is None
    # The teacher alone may train too.
    s2, t2 = s.detach(), t.clone().requires_grad_(True)
    agkd_ops.kd_kl_div(s2, t2).backward()
    t3 = t.cpu().clone().requires_grad_(True)
    R.kd_kl_div(s2.cpu(), t3).backward()
    torch.testing.assert_close(t2.grad.cpu(), t3.grad)


def test_cross_entropy_only_gives_teacher_a_zero_gradient(native):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, 9, generator=g).to(native.device).requires_grad_(True)
    t = torch.randn(4, 9, generator=g).to(native.device).requires_grad_(True)
    agkd_ops.kd_loss(s, t, torch.tensor([1, 2, 3, 4], device=native.device), kd_weight=0.0).backward()
    assert torch.equal(t.grad, torch.zeros_like(t))


def test_out_of_range_target_in_a_direct_op_call_is_never_read(native):
    s, t = torch.randn(2, 5, device=native.device), torch.randn(2, 5, device=native.device)
    target = torch.tensor([1, 7], device=native.device)
    if native.cuda_kernels:
        loss, _, grad_s, _ = torch.ops.agkd.kd_fwd(s, t, target, 1.0, 0.5, 0.5, 0.0, None, "none", True, False)
        assert torch.isfinite(loss[0]) and torch.isnan(loss[1])
        assert torch.isfinite(grad_s[0]).all() and torch.isnan(grad_s[1]).all()
    else:
        with pytest.raises(ValueError, match=r"target must hold class indices in \[0, 5\)"):
            torch.ops.agkd.kd_fwd(s, t, target, 1.0, 0.5, 0.5, 0.0, None, "none")


def test_double_backward_raises_clearly(native):
    s = torch.randn(2, 5, dtype=torch.float64, device=native.device, requires_grad=True)
    t = torch.randn(2, 5, dtype=torch.float64, device=native.device)
    (gs,) = torch.autograd.grad(agkd_ops.kd_kl_div(s, t), s, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        gs.sum().backward()


# ------------------------------------- F.cross_entropy's options: smoothing, soft targets, ignore_index

IGNORE = -100
# (target kind, label_smoothing, ignore_index): an ignore_index applies to class indices only.
CE_OPTIONS = ([("classes", eps, ignore) for eps in (0.0, 0.1, 1.0) for ignore in (None, IGNORE)]
              + [("probabilities", eps, None) for eps in (0.0, 0.1, 1.0)])


def make_targets(kind, n, k, dtype, generator, ignore_index=None):
    """Class indices (rows 1 and 4 set to ignore_index, when given) or probability rows
    that are representable in ``dtype`` (mixup-like: two classes mixed, plus noise)."""
    if kind == "classes":
        y = torch.randint(0, k, (n,), generator=generator)
        if ignore_index is not None:
            y[[1, 4]] = ignore_index
        return y
    q = torch.rand(n, k, generator=generator, dtype=torch.float64) ** 4
    return (q / q.sum(1, keepdim=True)).to(dtype).double()


def torch_kd_composition(s, t, y, *, temperature, kd_weight, label_smoothing, ignore_index, reduction):
    """The loss spelled with torch.nn.functional: F.cross_entropy with the same options,
    plus τ²·F.kl_div per row, ignored rows masked out of both and of the mean."""
    ce = F.cross_entropy(s, y, label_smoothing=label_smoothing, reduction="none",
                         ignore_index=IGNORE if ignore_index is None else ignore_index)
    kl = temperature**2 * F.kl_div(F.log_softmax(s / temperature, 1), F.log_softmax(t / temperature, 1),
                                   log_target=True, reduction="none").sum(1)
    counts = (y != ignore_index) if ignore_index is not None else torch.ones_like(ce, dtype=torch.bool)
    per_row = torch.where(counts, (1 - kd_weight) * ce + kd_weight * kl, 0.0)
    if reduction == "none":
        return per_row
    return per_row.sum() / (counts.sum() if reduction == "mean" else 1)


@pytest.mark.parametrize("kind,label_smoothing,ignore_index", CE_OPTIONS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_options_match_cross_entropy_and_the_kl_composition(backend, kind, label_smoothing, ignore_index,
                                                            reduction, dtype):
    g = torch.Generator().manual_seed(hash((kind, label_smoothing, reduction)) % 2**31)
    n, k = 7, 13
    s, t = rounded((n, k), dtype, g, 3.0, randn=True), rounded((n, k), dtype, g, 3.0, randn=True)
    y = make_targets(kind, n, k, dtype, g, ignore_index)
    options = dict(temperature=3.0, kd_weight=0.7, label_smoothing=label_smoothing, ignore_index=ignore_index,
                   reduction=reduction)
    want = grads(lambda a, b: torch_kd_composition(a, b, y, **options), s, t)
    target = y.to(backend.device) if kind == "classes" else y.to(dtype).to(backend.device)
    got = grads(lambda a, b: agkd_ops.kd_loss(a, b, target, **options),
                s.to(dtype).to(backend.device), t.to(dtype).to(backend.device))
    assert got[0].dtype == dtype and got[0].shape == want[0].shape
    tol = KD_TOL[dtype] * 10
    close(got[0], want[0], tol, scale=max(1.0, want[0].abs().max().item()))
    close(got[1], want[1], tol, scale=want[1].abs().max().item())
    close(got[2], want[2], tol, scale=want[2].abs().max().item())
    if ignore_index is not None:  # ignored rows: exactly zero, values and gradients
        assert torch.equal(got[1][[1, 4]].cpu(), torch.zeros(2, k, dtype=dtype))
        assert torch.equal(got[2][[1, 4]].cpu(), torch.zeros(2, k, dtype=dtype))


@pytest.mark.parametrize("kind,label_smoothing,ignore_index", CE_OPTIONS)
def test_cross_entropy_alone_is_f_cross_entropy(backend, kind, label_smoothing, ignore_index):
    g = torch.Generator().manual_seed(5)
    s = rounded((9, 6), torch.float64, g, 3.0, randn=True).to(backend.device)
    y = make_targets(kind, 9, 6, torch.float64, g, ignore_index).to(backend.device)
    got = agkd_ops.kd_loss(s, s.flip(0), y, kd_weight=0.0, label_smoothing=label_smoothing, ignore_index=ignore_index)
    want = F.cross_entropy(s, y, label_smoothing=label_smoothing,
                           ignore_index=IGNORE if ignore_index is None else ignore_index)
    close(got, want, 1e-12)


def test_a_batch_with_every_row_ignored_has_loss_zero_not_nan(backend):
    # F.cross_entropy gives 0/0 = NaN here; kd_loss gives 0 and zero gradients (see its docstring).
    s = torch.randn(3, 5, device=backend.device, requires_grad=True)
    t = torch.randn(3, 5, device=backend.device, requires_grad=True)
    y = torch.full((3,), -1, device=backend.device)
    assert torch.isnan(F.cross_entropy(s.detach(), y, ignore_index=-1))
    for reduction in ("mean", "sum"):
        loss = agkd_ops.kd_loss(s, t, y, ignore_index=-1, label_smoothing=0.2, reduction=reduction)
        assert loss.item() == 0.0
        s.grad = t.grad = None
        loss.backward()
        assert torch.equal(s.grad, torch.zeros_like(s)) and torch.equal(t.grad, torch.zeros_like(t))
    assert torch.equal(agkd_ops.kd_loss(s, t, y, ignore_index=-1, reduction="none"), torch.zeros(3, device=backend.device))


def test_ignored_rows_leave_the_kl_term_too(backend):
    # kd_weight = 1: no cross-entropy at all, yet an ignored row still counts for nothing.
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(6, 8, generator=g).to(backend.device), torch.randn(6, 8, generator=g).to(backend.device)
    y = torch.tensor([0, IGNORE, 2, 3, IGNORE, 5], device=backend.device)
    kept = y != IGNORE
    got = agkd_ops.kd_loss(s, t, y, kd_weight=1.0, ignore_index=IGNORE)
    want = agkd_ops.kd_kl_div(s[kept], t[kept])
    close(got, want.double(), 1e-6)


@pytest.mark.parametrize("kind,label_smoothing,ignore_index",
                         [("classes", 0.1, IGNORE), ("probabilities", 0.25, None), ("probabilities", 0.0, None)])
def test_gradcheck_options_float64(backend, kind, label_smoothing, ignore_index):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 5, generator=g, dtype=torch.float64).to(backend.device).requires_grad_(True)
    t = torch.randn(6, 5, generator=g, dtype=torch.float64).to(backend.device).requires_grad_(True)
    y = make_targets(kind, 6, 5, torch.float64, g, ignore_index).to(backend.device)
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda a, b: agkd_ops.kd_loss(a, b, y, temperature=2.0, kd_weight=0.4, label_smoothing=label_smoothing,
                                          ignore_index=ignore_index, reduction=reduction), (s, t))


def test_negative_probabilities(backend):
    """A probability target below 0 is a ValueError on the CPU kernels and the reference;
    the CUDA kernels, which do not read targets on the host, give that row a NaN loss."""
    g = torch.Generator().manual_seed(1)
    s = torch.randn(3, 4, generator=g).to(backend.device)
    q = torch.full((3, 4), 0.25, device=backend.device)
    q[1, 2] = -0.5
    if not backend.cuda_kernels:
        with pytest.raises(ValueError, match="agkd_ops.kd_loss: probability targets must be >= 0, got -0.5"):
            agkd_ops.kd_loss(s, s.flip(0), q)
        return
    loss = agkd_ops.kd_loss(s, s.flip(0), q, reduction="none")
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()


def test_ignored_rows_may_hold_any_value(backend):
    # -100 (the usual padding id) is out of [0, K), but an ignored row is never read.
    s = torch.randn(4, 6, device=backend.device)
    y = torch.tensor([1, -100, 2, -100], device=backend.device)
    want = agkd_ops.kd_loss(s[[0, 2]], s.flip(0)[[0, 2]], y[[0, 2]])
    close(agkd_ops.kd_loss(s, s.flip(0), y, ignore_index=-100), want.double(), 1e-6)
    # Another ignore_index leaves the -100 rows out of range (test_out_of_range_target).
    if backend.cuda_kernels:
        loss = agkd_ops.kd_loss(s, s.flip(0), y, ignore_index=-1, reduction="none")
        assert torch.isnan(loss[[1, 3]]).all() and torch.isfinite(loss[[0, 2]]).all()
    else:
        with pytest.raises(ValueError, match=r"got values from -100 to 2 \(besides ignore_index=-1\)"):
            agkd_ops.kd_loss(s, s.flip(0), y, ignore_index=-1)


@pytest.mark.parametrize("call,exc,words", [
    (lambda s, y: agkd_ops.kd_loss(s, s, y, label_smoothing=1.5), ValueError, ["kd_loss", "label_smoothing", "[0, 1]"]),
    (lambda s, y: agkd_ops.kd_loss(s, s, y, label_smoothing=-0.1), ValueError, ["label_smoothing"]),
    (lambda s, y: agkd_ops.kd_loss(s, s, y, label_smoothing="0.1"), TypeError, ["label_smoothing", "real number"]),
    (lambda s, y: agkd_ops.kd_loss(s, s, torch.rand(4, 5)), ValueError, ["kd_loss", "probability targets", "(4, 6)", "(4, 5)"]),
    (lambda s, y: agkd_ops.kd_loss(s, s, torch.rand(4)), ValueError, ["kd_loss", "probability targets", "(4, 6)"]),
    (lambda s, y: agkd_ops.kd_loss(s, s, torch.rand(4, 6, dtype=torch.float64)), TypeError, ["kd_loss", "float32", "float64"]),
    (lambda s, y: agkd_ops.kd_loss(s, s, torch.rand(4, 6), ignore_index=-100), ValueError, ["kd_loss", "ignore_index", "class-index"]),
    (lambda s, y: agkd_ops.kd_loss(s, s, y, ignore_index=1.0), TypeError, ["kd_loss", "ignore_index", "int"]),
    (lambda s, y: agkd_ops.kd_loss(s, s, y, ignore_index=True), TypeError, ["kd_loss", "ignore_index"]),
])
def test_bad_options_are_clear_errors(call, exc, words):
    # Checked before any backend is chosen, so one backend covers them all.
    assert_clear_error(lambda: call(torch.randn(4, 6), torch.tensor([0, 1, 2, 3])), exc, words)



# ---------------------------------------------------------- the public API's contract


def logits(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def classes(*values):
    return torch.tensor(values)


BAD_INPUTS = [
    (lambda: agkd_ops.kd_kl_div(logits(4, 6), logits(4, 7)), ValueError, ["kd_kl_div", "same shape", "(4, 7)"]),
    (lambda: agkd_ops.kd_kl_div(logits(4, 6), logits(3, 6)), ValueError, ["kd_kl_div", "teacher_logits", "(3, 6)"]),
    (lambda: agkd_ops.kd_kl_div(logits(4, 6, 1), logits(4, 6, 1)), ValueError,
     ["kd_kl_div", "student_logits", "rank-2 (N, K)"]),
    (lambda: agkd_ops.kd_kl_div(logits(4, 6), logits(4, 6, dtype=torch.float64)), TypeError, ["kd_kl_div", "dtype"]),
    (lambda: agkd_ops.kd_kl_div(torch.ones(4, 6, dtype=torch.int64), torch.ones(4, 6, dtype=torch.int64)), TypeError,
     ["student_logits", "floating"]),
    (lambda: agkd_ops.kd_kl_div(logits(0, 6), logits(0, 6)), ValueError, ["kd_kl_div", "empty"]),
    (lambda: agkd_ops.kd_kl_div(logits(4, 6), logits(4, 6), temperature=0), ValueError,
     ["kd_kl_div", "temperature", "> 0"]),
    (lambda: agkd_ops.kd_kl_div(logits(4, 6), logits(4, 6), temperature=-2.0), ValueError, ["temperature"]),
    (lambda: agkd_ops.kd_kl_div(logits(4, 6), logits(4, 6), temperature=float("inf")), ValueError,
     ["temperature", "finite"]),
    (lambda: agkd_ops.kd_kl_div(logits(4, 6), logits(4, 6), temperature="4"), TypeError, ["temperature", "real number"]),
    (lambda: agkd_ops.kd_kl_div(logits(4, 6), logits(4, 6), reduction="mean"), ValueError,
     ["kd_kl_div", "'mean'", "batchmean", "N*K"]),
    (lambda: agkd_ops.kd_kl_div(logits(4, 6), logits(4, 6), reduction="avg"), ValueError, ["reduction", "'avg'"]),
    (lambda: agkd_ops.kd_loss(logits(4, 6), logits(4, 6), classes(0, 1, 2)), ValueError,
     ["kd_loss", "target", "(4,)", "(3)"]),
    (lambda: agkd_ops.kd_loss(logits(4, 6), logits(4, 6), torch.zeros(4)), ValueError,
     ["kd_loss", "probability targets", "(4, 6)"]),
    (lambda: agkd_ops.kd_loss(logits(4, 6), logits(4, 6), torch.zeros(4, dtype=torch.bool)), TypeError,
     ["kd_loss", "target", "bool"]),
    (lambda: agkd_ops.kd_loss(logits(4, 6), logits(4, 6), [0, 1, 2, 3]), TypeError, ["kd_loss", "target", "Tensor"]),
    (lambda: agkd_ops.kd_loss(logits(4, 6), logits(4, 6), classes(0, 1, 2, 3), kd_weight=1.5), ValueError,
     ["kd_loss", "kd_weight", "[0, 1]"]),
    (lambda: agkd_ops.kd_loss(logits(4, 6), logits(4, 6), classes(0, 1, 2, 3), kd_weight=-0.1), ValueError, ["kd_weight"]),
    (lambda: agkd_ops.kd_loss(logits(4, 6), logits(4, 6), classes(0, 1, 2, 3), reduction="batchmean"), ValueError,
     ["kd_loss", "reduction"]),
    (lambda: agkd_ops.kd_loss(logits(4, 6), logits(4, 5), classes(0, 1, 2, 3)), ValueError, ["kd_loss", "same shape"]),
]


# (Out-of-range class targets depend on the backend: test_out_of_range_target.)
@pytest.mark.parametrize("call,exc,words", BAD_INPUTS)
def test_bad_inputs_raise_clear_errors(call, exc, words):
    assert_clear_error(call, exc, words)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_reductions_shapes_and_dtypes(backend, dtype):
    s, t = logits(4, 6, dtype=dtype).to(backend.device), logits(4, 6, dtype=dtype).to(backend.device)
    y = classes(0, 5, 2, 2).to(backend.device)
    kl_none = agkd_ops.kd_kl_div(s, t, reduction="none")
    assert kl_none.shape == (4,) and kl_none.dtype == dtype
    for reduction in ("batchmean", "sum"):
        out = agkd_ops.kd_kl_div(s, t, reduction=reduction)
        assert out.shape == () and out.dtype == dtype
    torch.testing.assert_close(agkd_ops.kd_kl_div(s, t).float(), kl_none.float().mean(), rtol=1e-2, atol=1e-3)
    kd_none = agkd_ops.kd_loss(s, t, y, reduction="none")
    assert kd_none.shape == (4,) and kd_none.dtype == dtype
    torch.testing.assert_close(agkd_ops.kd_loss(s, t, y, reduction="sum").float(), kd_none.float().sum(),
                               rtol=1e-2, atol=1e-3)


def test_identical_logits_give_zero_kl(backend):
    s = logits(5, 7).to(backend.device)
    assert torch.equal(agkd_ops.kd_kl_div(s, s, reduction="none").cpu(), torch.zeros(5))


def test_modules_mirror_functions():
    s, t, y = logits(4, 6), logits(4, 6), classes(0, 5, 2, 2)
    assert torch.equal(agkd_ops.KDKLDivLoss(temperature=2, reduction="sum")(s, t),
                       agkd_ops.kd_kl_div(s, t, temperature=2, reduction="sum"))
    assert torch.equal(agkd_ops.KDLoss(temperature=3.0, kd_weight=0.25)(s, t, y),
                       agkd_ops.kd_loss(s, t, y, temperature=3.0, kd_weight=0.25))
    assert "kd_weight=0.25" in repr(agkd_ops.KDLoss(kd_weight=0.25))


def test_target_on_another_device_rejected():
    s = logits(2, 3)
    with pytest.raises(ValueError, match=r"kd_loss: target must be on the logits' device"):
        agkd_ops.kd_loss(s, s, torch.zeros(2, dtype=torch.int64, device="meta"))
