"""The library's input rules where a careless or hostile caller tests them: a bad target
is an error whatever the weights, a probability target that requires grad gets its
gradient on every backend, values beyond what float32 can carry are refused with the
argument's own name, modules check their options when they are built, meta tensors and
a bogus ``AGKD_OPS_BACKEND`` are handled without a traceback from deep inside."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as TF

import agkd_ops

from .backends import assert_clear_error


def _logits(seed=0, n=6, k=5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g, dtype=dtype), torch.randn(n, k, generator=g, dtype=dtype)


# ------------------------------------------------------- a bad target, whatever the weights


@pytest.mark.parametrize("kd_weight", [1.0, 0.9, 0.0])
def test_an_out_of_range_class_is_an_error_whatever_alpha(backend, kd_weight):
    s, t = (x.to(backend.device) for x in _logits())
    for bad in (5, -1, -100):
        target = torch.tensor([0, 1, 2, 3, 4, bad], device=backend.device)
        if backend.cuda_kernels:  # no host sync to look: the row's loss and gradient are NaN instead
            student = s.clone().requires_grad_()
            per_row = agkd_ops.kd_loss(student, t, target, kd_weight=kd_weight, reduction="none")
            assert torch.isnan(per_row[5]) and torch.isfinite(per_row[:5]).all()
            per_row.sum().backward()
            assert torch.isnan(student.grad[5]).all() and torch.isfinite(student.grad[:5]).all()
        else:
            assert_clear_error(lambda: agkd_ops.kd_loss(s, t, target, kd_weight=kd_weight), ValueError,
                               ["agkd_ops.kd_loss", "target", "[0, 5)"])


def test_a_negative_probability_is_an_error_whatever_alpha(backend):
    s, t = (x.to(backend.device) for x in _logits())
    q = torch.softmax(torch.randn(6, 5, dtype=torch.float64), 1).to(backend.device)
    q[2, 3] = -0.1
    if backend.cuda_kernels:
        per_row = agkd_ops.kd_loss(s, t, q, kd_weight=1.0, reduction="none")
        assert torch.isnan(per_row[2]) and torch.isfinite(per_row[[0, 1, 3, 4, 5]]).all()
    else:
        assert_clear_error(lambda: agkd_ops.kd_loss(s, t, q, kd_weight=1.0), ValueError,
                           ["agkd_ops.kd_loss", "probability", ">= 0"])


def test_a_float_target_of_the_wrong_shape_names_target():
    s, t = _logits()
    assert_clear_error(lambda: agkd_ops.kd_loss(s, t, torch.rand(6, dtype=torch.float64)), ValueError,
                       ["agkd_ops.kd_loss", "target", "(6, 5)", "(6)"])


# ------------------------------------------------ the gradient of a probability target


def _torch_kd(s, t, q, kd_weight, tau, eps, reduction):
    """Hinton's loss written with torch's own functions (an independent oracle):
    F.cross_entropy differentiates a probability target."""
    ce = TF.cross_entropy(s, q, label_smoothing=eps, reduction="none")
    kl = TF.kl_div(TF.log_softmax(s / tau, 1), TF.log_softmax(t / tau, 1), log_target=True,
                   reduction="none").sum(1)
    per_row = (1 - kd_weight) * ce + kd_weight * tau**2 * kl
    return {"mean": per_row.mean(), "sum": per_row.sum(), "none": per_row}[reduction]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("kd_weight", [0.0, 0.3, 1.0])
def test_probability_targets_get_their_gradient(backend, reduction, eps, kd_weight):
    s0, t0 = _logits(1, n=5, k=7)
    q0 = torch.softmax(torch.randn(5, 7, dtype=torch.float64), 1)
    weights = torch.linspace(0.5, 1.5, 5, dtype=torch.float64)

    def grads(fn, device):
        s, t, q = (x.to(device).requires_grad_() for x in (s0, t0, q0))
        out = fn(s, t, q)
        total = (out * weights.to(device)).sum() if reduction == "none" else out
        return [g.cpu() for g in torch.autograd.grad(total, (s, t, q))]

    got = grads(lambda s, t, q: agkd_ops.kd_loss(s, t, q, kd_weight=kd_weight, temperature=2.0, label_smoothing=eps,
                                                 reduction=reduction), backend.device)
    want = grads(lambda s, t, q: _torch_kd(s, t, q, kd_weight, 2.0, eps, reduction), "cpu")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_class_targets_and_a_detached_probability_target_get_none(backend):
    s, t = (x.to(backend.device).requires_grad_() for x in _logits())
    q = torch.softmax(torch.randn(6, 5, dtype=torch.float64), 1).to(backend.device)
    agkd_ops.kd_loss(s, t, q).backward()
    assert q.grad is None and s.grad is not None


# ------------------------------------------------ values float32 cannot carry, refused


@pytest.mark.parametrize("fn", ["kd_loss", "kd_kl_div"])
@pytest.mark.parametrize("value", [1e300, 1e-300, 1e4, 1e-4])
def test_a_temperature_beyond_the_safe_range_is_refused(fn, value):
    s, t = _logits()
    args = (s, t, torch.tensor([0, 1, 2, 3, 4, 0])) if fn == "kd_loss" else (s, t)
    assert_clear_error(lambda: getattr(agkd_ops, fn)(*args, temperature=value), ValueError,
                       [f"agkd_ops.{fn}", "temperature", "[0.001, 1000]"])


@pytest.mark.parametrize("value", [1e-3, 1e3])
def test_the_temperature_range_ends_give_finite_losses_and_gradients(backend, value):
    s, t = (x.to(backend.device).float().mul(30).requires_grad_() for x in _logits())
    loss = agkd_ops.kd_loss(s, t, torch.tensor([0, 1, 2, 3, 4, 0], device=backend.device), temperature=value)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()


@pytest.mark.parametrize("data_range", [1e300, 1e200, 1e-300, 1e-40])
def test_a_data_range_float32_cannot_carry_names_data_range_not_c1(data_range):
    x = torch.rand(2, 1, 16, 16)
    for call in (lambda: agkd_ops.ssim(x, x, data_range=data_range),
                 lambda: agkd_ops.hybrid_loss(x, x, data_range=data_range),
                 lambda: agkd_ops.attention_align_loss(x, x, loss="ssim", data_range=data_range)):
        message = assert_clear_error(call, ValueError, ["data_range", "float32"])
        assert "c1" not in message.replace("k1", "")


def test_a_huge_window_is_refused_before_any_memory_is_taken(backend):
    x = torch.rand(1, 1, 4, 4, device=backend.device)
    for padding in ("zeros", "valid", "reflect"):
        for size in (2**31 - 1, 129):
            assert_clear_error(lambda: agkd_ops.ssim(x, x, window_size=size, padding=padding), ValueError,
                               ["agkd_ops.ssim", "window_size", "at most 127"])
    # The widest window works on the CPU; on CUDA, windows past about 100 taps need more
    # shared memory than an sm_80 block has, which the op says in a RuntimeError of its own.
    widest = 95 if backend.cuda_kernels else 127
    assert torch.isfinite(agkd_ops.ssim(x, x, window_size=widest, padding="zeros"))


# ------------------------------------------------------- modules check at construction

@pytest.mark.parametrize("build, words", [
    (lambda: agkd_ops.KDLoss(temperature=0), ["kd_loss", "temperature"]),
    (lambda: agkd_ops.KDLoss(kd_weight=1.5), ["kd_loss", "kd_weight"]),
    (lambda: agkd_ops.KDLoss(ignore_index=1.5), ["kd_loss", "ignore_index"]),
    (lambda: agkd_ops.KDKLDivLoss(reduction="mean"), ["kd_kl_div", "batchmean"]),
    (lambda: agkd_ops.KDKLDivLoss(temperature=-1), ["kd_kl_div", "temperature"]),
    (lambda: agkd_ops.SSIMLoss(window_size=4), ["ssim_loss", "window_size"]),
    (lambda: agkd_ops.SSIMLoss(padding="same"), ["ssim_loss", "padding"]),
    (lambda: agkd_ops.CosineLoss(eps=0), ["cosine_loss", "eps"]),
    (lambda: agkd_ops.HybridLoss(ssim_weight=-1), ["hybrid_loss", "ssim_weight"]),
    (lambda: agkd_ops.HybridLoss(data_range=1e300), ["hybrid_loss", "data_range"]),
    (lambda: agkd_ops.AttentionAlignLoss(loss="l1"), ["attention_align_loss", "loss"]),
    (lambda: agkd_ops.AttentionAlignLoss(loss="mse", window_size=3), ["attention_align_loss", "window_size"]),
    (lambda: agkd_ops.AttentionAlignLoss(loss="ssim", sigma=0), ["attention_align_loss", "sigma"]),
])
def test_modules_check_their_options_when_built(build, words):
    with pytest.raises((ValueError, TypeError)) as caught:
        build()
    for word in words:
        assert word in str(caught.value), (word, str(caught.value))


# ---------------------------------------------------------------------- meta tensors


def test_every_function_runs_on_meta_tensors():
    maps = torch.empty(3, 2, 16, 16, device="meta")
    small = torch.empty(3, 2, 8, 8, device="meta")
    s = torch.empty(3, 5, device="meta")
    results = {
        "ssim": agkd_ops.ssim(maps, maps, reduction="none"),
        "cosine_loss": agkd_ops.cosine_loss(maps, maps),
        "hybrid_loss": agkd_ops.hybrid_loss(maps, maps, reduction="none"),
        "attention_map": agkd_ops.attention_map(maps),
        "attention_align_loss": agkd_ops.attention_align_loss(small, maps, loss="hybrid"),
        "kd_kl_div": agkd_ops.kd_kl_div(s, s),
        "kd_loss": agkd_ops.kd_loss(s, s, torch.empty(3, dtype=torch.long, device="meta")),
        "kd_loss (probabilities)": agkd_ops.kd_loss(s, s, torch.empty(3, 5, device="meta")),
    }
    shapes = {"ssim": (3,), "hybrid_loss": (3,), "attention_map": (3, 1, 16, 16)}
    for name, out in results.items():
        assert out.device.type == "meta" and tuple(out.shape) == shapes.get(name, ()), name


# ------------------------------------------------------------------ AGKD_OPS_BACKEND


def test_a_bogus_backend_variable_fails_each_call_not_the_import():
    code = ("import torch, agkd_ops\n"
            "try:\n    agkd_ops.kd_kl_div(torch.randn(2, 3), torch.randn(2, 3))\n"
            "except ValueError as e:\n    print('refused:', e)\n"
            "agkd_ops.set_backend('reference')\n"
            "print('after set_backend:', float(agkd_ops.kd_kl_div(torch.zeros(2, 3), torch.zeros(2, 3))))\n")
    env = {**os.environ, "AGKD_OPS_BACKEND": "bogus"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "refused: agkd_ops: AGKD_OPS_BACKEND='bogus' is not a backend" in done.stdout
    assert "after set_backend: 0.0" in done.stdout


@pytest.mark.parametrize("p", [1e300, 200.0, 1e-300])
def test_an_attention_exponent_float32_cannot_carry_is_refused(p):
    # 200 turns activations of 10 into inf (a NaN map); 1e300 or 1e-300 turn every map into 0 or 1
    assert_clear_error(lambda: agkd_ops.attention_map(torch.rand(2, 3, 4, 4) * 10, p=p), ValueError,
                       ["agkd_ops.attention_map", "p", "[0.001, 16]"])
    assert torch.isfinite(agkd_ops.attention_map(torch.rand(2, 3, 4, 4) * 10, p=16.0)).all()


@pytest.mark.parametrize("sigma", [1e-300, 1e-30, 1e-4])
def test_a_gaussian_too_narrow_to_compute_is_refused_not_nan(sigma):
    x = torch.rand(2, 1, 16, 16)
    assert_clear_error(lambda: agkd_ops.ssim(x, x * 0.5, sigma=sigma), ValueError,
                       ["agkd_ops.ssim", "sigma", ">= 0.001"])
    assert torch.isfinite(agkd_ops.ssim(x, x * 0.5, sigma=1e-3))
