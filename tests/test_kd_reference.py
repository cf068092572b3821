"""The KD references (agkd_ops.reference.kd_kl_div / kd_loss) against independent
implementations: the NumPy oracle and the torch.nn.functional compositions users know."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from agkd_ops import reference as R

from . import oracle


@given(n=st.integers(1, 6), k=st.integers(1, 40), temperature=st.floats(0.1, 20),
       alpha=st.floats(0, 1), scale=st.sampled_from([0.1, 3.0, 50.0]), seed=st.integers(0, 2**31 - 1))
def test_reference_matches_numpy_oracle(n, k, temperature, alpha, scale, seed):
    g = torch.Generator().manual_seed(seed)
    s = scale * torch.randn(n, k, generator=g, dtype=torch.float64)
    t = scale * torch.randn(n, k, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (n,), generator=g)
    kl = oracle.kd_kl_per_sample(s.numpy(), t.numpy(), temperature)
    ce = oracle.cross_entropy_per_sample(s.numpy(), y.numpy())
    np.testing.assert_allclose(R.kd_kl_div(s, t, temperature=temperature, reduction="none").numpy(),
                               kl, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(R.kd_loss(s, t, y, temperature=temperature, alpha=alpha, reduction="none").numpy(),
                               (1 - alpha) * ce + alpha * kl, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_reference_matches_kl_div_composition(reduction):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(16, 30, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(16, 30, generator=g, dtype=torch.float64, requires_grad=True)
    tau = 3.0
    got = R.kd_kl_div(s, t, temperature=tau, reduction=reduction)
    torch_reduction = "none" if reduction == "none" else reduction
    want = tau**2 * F.kl_div(F.log_softmax(s / tau, 1), F.log_softmax(t / tau, 1), log_target=True,
                             reduction=torch_reduction)
    if reduction == "none":
        want = want.sum(1)
    torch.testing.assert_close(got, want)
    got_grads = torch.autograd.grad(got.sum(), (s, t))
    want_grads = torch.autograd.grad(want.sum(), (s, t))
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)


def test_reference_kd_loss_matches_cross_entropy_composition():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(12, 7, generator=g, dtype=torch.float64)
    t = torch.randn(12, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 7, (12,), generator=g)
    tau, alpha = 2.0, 0.3
    want = (1 - alpha) * F.cross_entropy(s, y) + alpha * tau**2 * F.kl_div(
        F.log_softmax(s / tau, 1), F.log_softmax(t / tau, 1), log_target=True, reduction="batchmean")
    torch.testing.assert_close(R.kd_loss(s, t, y, temperature=tau, alpha=alpha), want)


def test_reference_teacher_minus_infinity_contributes_nothing():
    s = torch.tensor([[1.0, 2.0, 0.5]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[0.3, float("-inf"), 1.2]], dtype=torch.float64, requires_grad=True)
    out = R.kd_kl_div(s, t, temperature=1.0)
    # The class the teacher rules out (p_t = 0) drops from the sum; p_s keeps all classes.
    kept = [0, 2]
    log_p_s = torch.log_softmax(s.detach(), 1)[:, kept]
    p_t = torch.softmax(t.detach()[:, kept], 1)
    torch.testing.assert_close(out, (p_t * (p_t.log() - log_p_s)).sum())
    out.backward()
    assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()
