"""The logit-KD family: dkd_loss, dist_loss, ofa_loss and kd_kl_div / kd_loss with
teacher_temperature, standardize, several temperatures and a temperature tensor.

Each loss is checked against an independent transcription of its authors' PyTorch code
(below, each function cited), on every backend, in float64 to 1e-10 and in float32 to
float32 tolerance, over a sweep of N, K, temperatures and weights; then gradcheck, opcheck,
torch.compile, NaN isolation, large logits, the half-precision teacher and bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

import agkd_ops
from agkd_ops._defaults import DIST_EPS, STANDARDIZE_EPS

from .backends import assert_clear_error, assert_nan_stays_in_its_sample, grads


# ------------------------------------------------- the authors' code, transcribed plainly

def mdistiller_dkd(logits_student, logits_teacher, target, alpha, beta, temperature):
    """mdistiller, mdistiller/distillers/DKD.py, dkd_loss (megvii-research/mdistiller)."""
    gt_mask = torch.zeros_like(logits_student).scatter_(1, target.unsqueeze(1), 1).bool()
    other_mask = torch.ones_like(logits_student).scatter_(1, target.unsqueeze(1), 0).bool()
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)

    def cat_mask(t):
        return torch.cat([(t * gt_mask).sum(1, keepdims=True), (t * other_mask).sum(1, keepdims=True)], dim=1)

    pred_student, pred_teacher = cat_mask(pred_student), cat_mask(pred_teacher)
    tckd = F.kl_div(torch.log(pred_student), pred_teacher, reduction="sum") * temperature**2 / target.shape[0]
    pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd = F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum") * temperature**2 / target.shape[0]
    return alpha * tckd + beta * nckd


def dist_authors(logits_student, logits_teacher, beta, gamma, tau):
    """DIST_KD, classification/lib/models/losses/dist_kd.py, DIST (hunto/DIST_KD)."""
    def cosine_similarity(a, b, eps=1e-8):
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)

    def pearson_correlation(a, b, eps=1e-8):
        return cosine_similarity(a - a.mean(1).unsqueeze(1), b - b.mean(1).unsqueeze(1), eps)

    def inter_class_relation(y_s, y_t):
        return 1 - pearson_correlation(y_s, y_t).mean()

    def intra_class_relation(y_s, y_t):
        return inter_class_relation(y_s.transpose(0, 1), y_t.transpose(0, 1))

    y_s = (logits_student / tau).softmax(dim=1)
    y_t = (logits_teacher / tau).softmax(dim=1)
    return beta * tau**2 * inter_class_relation(y_s, y_t) + gamma * tau**2 * intra_class_relation(y_s, y_t)


def lskd_authors(logits_student, logits_teacher, temperature):
    """logit-standardization-KD, mdistiller/distillers/KD.py, normalize + kd_loss
    (sunshangquan/logit-standardization-KD)."""
    def normalize(logit):
        mean = logit.mean(dim=-1, keepdims=True)
        stdv = logit.std(dim=-1, keepdims=True)
        return (logit - mean) / (1e-7 + stdv)

    log_pred_student = F.log_softmax(normalize(logits_student) / temperature, dim=1)
    pred_teacher = F.softmax(normalize(logits_teacher) / temperature, dim=1)
    return F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1).mean() * temperature**2


def ttm_authors(logits_student, logits_teacher, gamma):
    """TTM (Zheng & Yang, ICLR 2024), the transformed teacher: softmax(t)^γ renormalised,
    KL against the student at temperature 1 (their loss, eq. 8)."""
    p_t = F.softmax(logits_teacher, dim=1).pow(gamma)
    p_t = p_t / p_t.sum(1, keepdim=True)
    return F.kl_div(F.log_softmax(logits_student, dim=1), p_t, reduction="batchmean")


def mlkd_instance_authors(logits_student, logits_teacher, temperatures):
    """Multi-Level-Logit-Distillation, mdistiller/distillers/MLKD.py: the instance term,
    kd_loss summed over the temperatures (Jin-Ying/Multi-Level-Logit-Distillation)."""
    total = 0
    for temperature in temperatures:
        log_pred_student = F.log_softmax(logits_student / temperature, dim=1)
        pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
        total = total + F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1).mean() * temperature**2
    return total


def ctkd_authors(y_s, y_t, T):
    """CTKD, distiller_zoo/KD.py, DistillKL with a temperature tensor (zhengli97/CTKD)."""
    return torch.nn.KLDivLoss(reduction="batchmean")(F.log_softmax(y_s / T, dim=1), F.softmax(y_t / T, dim=1)) * T * T


def ofa_authors(logits_student, logits_teacher, target_mask, eps, temperature=1.0):
    """OFAKD, distillers/ofa.py, ofa_loss (Hao-Ning/OFAKD-distillation)."""
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    prod = (pred_teacher + target_mask) ** eps
    loss = torch.sum(-(prod - target_mask) * torch.log(pred_student), dim=-1)
    return loss.mean()


# ------------------------------------------------------------------------- the cases

def _ours(name, options):
    """(our call, the authors' call) of one loss with `options`."""
    if name == "dkd":
        return (lambda s, t, y: agkd_ops.dkd_loss(s, t, y, **options),
                lambda s, t, y: mdistiller_dkd(s, t, y, options["tckd_weight"], options["nckd_weight"],
                                               options["temperature"]))
    if name == "dist":
        return (lambda s, t, y: agkd_ops.dist_loss(s, t, **options),
                lambda s, t, y: dist_authors(s, t, options["inter_weight"], options["intra_weight"],
                                             options["temperature"]))
    if name == "lskd":
        return (lambda s, t, y: agkd_ops.kd_kl_div(s, t, temperature=options["temperature"], standardize=True),
                lambda s, t, y: lskd_authors(s, t, options["temperature"]))
    if name == "ttm":
        return (lambda s, t, y: agkd_ops.kd_kl_div(s, t, temperature=1.0, teacher_temperature=1 / options["gamma"]),
                lambda s, t, y: ttm_authors(s, t, options["gamma"]))
    if name == "mlkd":
        return (lambda s, t, y: agkd_ops.kd_kl_div(s, t, temperature=options["temperatures"]),
                lambda s, t, y: mlkd_instance_authors(s, t, options["temperatures"]))
    if name == "ofa":
        return (lambda s, t, y: agkd_ops.ofa_loss(s, t, y, **options),
                lambda s, t, y: ofa_authors(s, t, F.one_hot(y, s.shape[1]).to(s.dtype), options["eps"],
                                            options["temperature"]))
    raise AssertionError(name)


CASES = [
    ("dkd", dict(tckd_weight=1.0, nckd_weight=8.0, temperature=4.0)),
    ("dkd", dict(tckd_weight=0.5, nckd_weight=2.0, temperature=1.0)),
    ("dist", dict(inter_weight=1.0, intra_weight=1.0, temperature=1.0)),
    ("dist", dict(inter_weight=2.0, intra_weight=0.5, temperature=4.0)),
    ("lskd", dict(temperature=2.0)),
    ("lskd", dict(temperature=5.0)),
    ("ttm", dict(gamma=0.2)),
    ("mlkd", dict(temperatures=(2.0, 3.0, 4.0, 5.0, 6.0))),
    ("ofa", dict(eps=1.0, temperature=1.0)),
    ("ofa", dict(eps=1.5, temperature=2.0)),
]
SHAPES = [(4, 2), (5, 3), (8, 10), (16, 100), (6, 1000), (2, 32000)]


def _inputs(n, k, dtype, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = (scale * torch.randn(n, k, generator=g, dtype=torch.float64)).to(dtype)
    t = (scale * torch.randn(n, k, generator=g, dtype=torch.float64)).to(dtype)
    y = torch.randint(0, k, (n,), generator=g)
    return s, t, y


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name,options", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_against_the_authors_code(backend, name, options, shape, dtype):
    n, k = shape
    s, t, y = _inputs(n, k, dtype, seed=n * 7 + k)
    ours, theirs = _ours(name, options)
    got, got_gs, got_gt = grads(lambda a, b: ours(a, b, y), s.to(backend.device), t.to(backend.device))
    want, want_gs, want_gt = grads(lambda a, b: theirs(a, b, y), s.double(), t.double())
    if name == "dkd":
        # mdistiller's teacher gradient is NaN by construction (its -1000 mask puts a log 0
        # into kl_div's target derivative; its teacher is detached): the reference stands in.
        want_gt = grads(lambda a, b: agkd_ops.reference.dkd_loss(a, b, y, **options), s.double(), t.double())[2]
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got.double().cpu(), want, rtol=tol, atol=tol)
    for g_got, g_want in ((got_gs, want_gs), (got_gt, want_gt)):
        scale = float(g_want.abs().max())
        # float32: gradients far below the largest one are rounding noise (LSKD at K = 2,
        # where the standardized rows are always ±1/√2 and the gradient is nearly 0).
        floor = 1e-15 if dtype == torch.float64 else 1e-7
        torch.testing.assert_close(g_got.double().cpu(), g_want, rtol=tol, atol=tol * scale + floor)


@pytest.mark.parametrize("tied", [True, False], ids=["shared", "teacher-own"])
@pytest.mark.parametrize("per_row", [False, True], ids=["scalar", "per-row"])
def test_learnable_temperature_against_ctkd(backend, tied, per_row):
    s, t, _y = _inputs(6, 20, torch.float64, seed=3)
    s, t = s.requires_grad_(), t.requires_grad_()
    tau = (torch.full((6,), 3.0, dtype=torch.float64) + 0.1 * torch.arange(6) if per_row
           else torch.tensor(3.5, dtype=torch.float64)).requires_grad_()
    teacher_temperature = None if tied else 2.0
    ours = agkd_ops.kd_kl_div(s, t, temperature=tau, teacher_temperature=teacher_temperature)
    got = torch.autograd.grad(ours, (s, t, tau))
    T = tau.reshape(-1, 1)
    T_teacher = T if tied else 2.0
    if tied and not per_row:
        theirs = ctkd_authors(s, t, tau)
    else:  # the same KL, written out per row (a per-row τ, or the teacher at its own τ)
        rows = F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T_teacher, 1), reduction="none").sum(1)
        theirs = (rows * T[:, 0] ** 2).mean()
    want = torch.autograd.grad(theirs, (s, t, tau))
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kd_weight,options", [(0.5, dict(standardize=True)), (0.9, dict(temperature=(2.0, 4.0))),
                                               (1.0, dict(teacher_temperature=5.0)),
                                               (0.7, dict(standardize=True, label_smoothing=0.1,
                                                          ignore_index=3))])
def test_kd_loss_with_family_options_is_ce_plus_the_family_kl(backend, kd_weight, options):
    s, t, y = _inputs(9, 12, torch.float64, seed=11)
    y[0] = 3
    kl_options = {key: options[key] for key in ("standardize", "temperature", "teacher_temperature") if key in options}
    smoothing, ignore = options.get("label_smoothing", 0.0), options.get("ignore_index")

    def plain(a, b):
        ce = F.cross_entropy(a, y, label_smoothing=smoothing, ignore_index=-1000 if ignore is None else ignore,
                             reduction="none")
        kl = agkd_ops.reference.kd_kl_div(a, b, reduction="none", **kl_options)
        rows = (1 - kd_weight) * ce + kd_weight * kl
        counts = torch.ones_like(rows, dtype=torch.bool) if ignore is None else y != ignore
        return torch.where(counts, rows, 0.0).sum() / counts.sum()

    got = grads(lambda a, b: agkd_ops.kd_loss(a, b, y, kd_weight=kd_weight, **options), s, t)
    want = grads(plain, s, t)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------- properties of the ops

def _row_losses():
    """Per-row losses of the family (reduction "none"), by name."""
    return {
        "dkd": lambda s, t, y: agkd_ops.dkd_loss(s, t, y, reduction="none"),
        "ofa": lambda s, t, y: agkd_ops.ofa_loss(s, t, y, eps=1.5, reduction="none"),
        "kd-family": lambda s, t, y: agkd_ops.kd_kl_div(s, t, temperature=(2.0, 4.0), standardize=True,
                                                        teacher_temperature=3.0, reduction="none"),
        "kd-loss-family": lambda s, t, y: agkd_ops.kd_loss(s, t, y, standardize=True, reduction="none"),
    }


@pytest.mark.parametrize("name", list(_row_losses()))
def test_nan_stays_in_its_row(backend, name):
    s, t, y = _inputs(5, 17, torch.float32, seed=5)
    fn = _row_losses()[name]
    assert_nan_stays_in_its_sample(lambda a, b: fn(a, b, y), [s.to(backend.device), t.to(backend.device)], 0, (2, 4))
    assert_nan_stays_in_its_sample(lambda a, b: fn(a, b, y), [s.to(backend.device), t.to(backend.device)], 1, (1, 0))


@pytest.mark.parametrize("name", ["dkd", "ofa", "dist", "lskd", "ttm", "mlkd"])
def test_large_logits_stay_finite(backend, name):
    s, t, y = _inputs(6, 50, torch.float32, seed=2)
    s, t = s.sign() * 1e4, t * 1e3
    options = dict(CASES)[name] if name != "dkd" else CASES[0][1]
    ours, _ = _ours(name, options)
    loss, gs, gt = grads(lambda a, b: ours(a, b, y), s.to(backend.device), t.to(backend.device))
    assert torch.isfinite(loss).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()


def test_dkd_with_two_classes_has_no_non_target_term(backend):
    s, t, y = _inputs(7, 2, torch.float64, seed=9)
    only_nckd = agkd_ops.dkd_loss(s, t, y, tckd_weight=0.0, nckd_weight=8.0)
    assert float(only_nckd) == pytest.approx(0.0, abs=1e-14)


def test_dkd_target_margin_does_not_underflow(backend):
    # 1 − p_y is e^-200: its log must still be exact (mdistiller's log of 0 would be -inf).
    s = torch.tensor([[200.0, 0.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[0.0, 1.0, 2.0]], dtype=torch.float64)
    y = torch.tensor([0])
    got = agkd_ops.dkd_loss(s, t, y, temperature=1.0, nckd_weight=0.0)
    want = agkd_ops.reference.dkd_loss(s, t, y, temperature=1.0, nckd_weight=0.0)
    assert torch.isfinite(got) and float(got) == pytest.approx(float(want), rel=1e-12)


@pytest.mark.parametrize("name", ["dkd", "ofa", "dist", "kd-family", "ctkd"])
def test_gradcheck(backend, name):
    s, t, y = _inputs(4, 7, torch.float64, seed=4, scale=1.0)
    s, t = s.requires_grad_(), t.requires_grad_()
    tau = torch.tensor([2.0, 2.5, 3.0, 4.0], dtype=torch.float64, requires_grad=True)
    calls = {
        "dkd": (lambda a, b: agkd_ops.dkd_loss(a, b, y, reduction="none"), (s, t)),
        "ofa": (lambda a, b: agkd_ops.ofa_loss(a, b, y, eps=1.5, temperature=2.0), (s, t)),
        "dist": (lambda a, b: agkd_ops.dist_loss(a, b, temperature=2.0), (s, t)),
        "kd-family": (lambda a, b: agkd_ops.kd_kl_div(a, b, temperature=(1.5, 3.0), standardize=True,
                                                     teacher_temperature=2.0, reduction="none"), (s, t)),
        "ctkd": (lambda a, b, c: agkd_ops.kd_kl_div(a, b, temperature=c, standardize=True), (s, t, tau)),
    }
    fn, inputs = calls[name]
    assert torch.autograd.gradcheck(fn, inputs)


def _op_calls(device):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(5, 11, generator=g).to(device).requires_grad_()
    t = torch.randn(5, 11, generator=g).to(device).requires_grad_()
    y = torch.randint(0, 11, (5,), generator=g).to(device)
    tau = torch.tensor([2.0, 3.0], device=device).expand(5, 2)
    return [
        (torch.ops.agkd.kd_family_fwd, (s, t, tau, None, True, STANDARDIZE_EPS, "mean", True, True, False)),
        (torch.ops.agkd.kd_family_fwd, (s, t.detach(), tau.clone().requires_grad_(),
                                        3.0 * torch.ones(5, 2, device=device), False, STANDARDIZE_EPS, "none",
                                        True, False, True)),
        (torch.ops.agkd.dkd_fwd, (s, t, y, 4.0, 1.0, 8.0, "mean", True, True)),
        (torch.ops.agkd.ofa_fwd, (s, t.detach(), y, 1.0, 1.5, "sum", True, False)),
        (torch.ops.agkd.dist_fwd, (s, t, 1.0, 1.0, 2.0, DIST_EPS, True, True)),
    ]


@pytest.mark.parametrize("case", range(5))
def test_opcheck(native, case):
    op, args = _op_calls(native.device)[case]
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph(native):
    s, t, y = (x.to(native.device) for x in _inputs(6, 10, torch.float32, seed=1))
    s.requires_grad_()
    criteria = [agkd_ops.DKDLoss(), agkd_ops.OFALoss(eps=1.5)]

    def step(a, b):
        return (criteria[0](a, b, y) + criteria[1](a, b, y) + agkd_ops.dist_loss(a, b)
                + agkd_ops.kd_kl_div(a, b, temperature=(2.0, 3.0), standardize=True))

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got, got_grad = grads(compiled, s, t)[0], grads(compiled, s, t)[1]
    want, want_grad = grads(step, s, t)[:2]
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)


def test_only_the_asked_gradients_are_computed(native):
    s, t, y = _inputs(4, 9, torch.float32, seed=8)
    s = s.requires_grad_()
    loss, grad_s, grad_t = torch.ops.agkd.dkd_fwd(s, t, y, 4.0, 1.0, 8.0, "mean", True, False)
    assert grad_s.shape == s.shape and grad_t.numel() == 0
    # The forward's gradient is the gradient of its (mean) output: backward(1) gives it back.
    loss.backward()
    torch.testing.assert_close(s.grad, grad_s)


def test_a_gradient_the_forward_did_not_compute_is_a_clear_error(native):
    s, t, y = _inputs(4, 9, torch.float32, seed=8)
    s = s.requires_grad_()
    loss, _gs, _gt = torch.ops.agkd.ofa_fwd(s, t, y, 1.0, 1.0, "mean", False, False)
    with pytest.raises(RuntimeError, match="needs_grad_student=False"):
        loss.backward()


def test_double_backward_is_refused(native):
    s, t, y = _inputs(4, 9, torch.float64, seed=8)
    s = s.requires_grad_()
    (g,) = torch.autograd.grad(agkd_ops.dkd_loss(s, t, y), s, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        g.sum().backward()


@pytest.mark.parametrize("teacher_dtype", [torch.float16, torch.bfloat16])
def test_half_precision_teacher_with_float32_student(backend, teacher_dtype):
    s, t, y = _inputs(6, 30, torch.float32, seed=6)
    t_half = t.to(teacher_dtype)
    for fn in (lambda a, b: agkd_ops.dkd_loss(a, b, y), lambda a, b: agkd_ops.dist_loss(a, b),
               lambda a, b: agkd_ops.ofa_loss(a, b, y), lambda a, b: agkd_ops.kd_loss(a, b, y),
               lambda a, b: agkd_ops.kd_kl_div(a, b, standardize=True)):
        got = fn(s, t_half)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, fn(s, t_half.float()))
    assert_clear_error(lambda: agkd_ops.dkd_loss(s.double(), t_half, y), TypeError, ["same dtype"])
    assert_clear_error(lambda: agkd_ops.kd_kl_div(t_half, s), TypeError, ["same dtype"])


def test_modules_match_the_functions():
    s, t, y = _inputs(5, 20, torch.float32, seed=12)
    assert torch.equal(agkd_ops.DKDLoss(nckd_weight=2.0)(s, t, y), agkd_ops.dkd_loss(s, t, y, nckd_weight=2.0))
    assert torch.equal(agkd_ops.DISTLoss(intra_weight=2.0)(s, t), agkd_ops.dist_loss(s, t, intra_weight=2.0))
    assert torch.equal(agkd_ops.OFALoss(eps=1.2)(s, t, y), agkd_ops.ofa_loss(s, t, y, eps=1.2))
    assert torch.equal(agkd_ops.KDKLDivLoss(temperature=(2.0, 3.0), standardize=True)(s, t),
                       agkd_ops.kd_kl_div(s, t, temperature=(2.0, 3.0), standardize=True))
    assert torch.equal(agkd_ops.KDLoss(teacher_temperature=2.0)(s, t, y),
                       agkd_ops.kd_loss(s, t, y, teacher_temperature=2.0))


# --------------------------------------------------------------------------- bad input

BAD = [
    (lambda s, t, y: agkd_ops.dkd_loss(s, t, y, tckd_weight=-1.0), ValueError, ["dkd_loss", "tckd_weight"]),
    (lambda s, t, y: agkd_ops.dkd_loss(s, t, y, nckd_weight=math.nan), ValueError, ["nckd_weight"]),
    (lambda s, t, y: agkd_ops.dkd_loss(s, t, y, temperature=0.0), ValueError, ["temperature"]),
    (lambda s, t, y: agkd_ops.dkd_loss(s, t, y.float()), ValueError, ["dkd_loss", "target"]),
    (lambda s, t, y: agkd_ops.dkd_loss(s, t, torch.softmax(s, 1)), TypeError, ["dkd_loss", "class indices"]),
    (lambda s, t, y: agkd_ops.ofa_loss(s, t, torch.softmax(s, 1)), TypeError, ["ofa_loss", "class indices"]),
    (lambda s, t, y: agkd_ops.dkd_loss(s[:, :1], t[:, :1], y * 0), ValueError, ["dkd_loss", "K=1"]),
    (lambda s, t, y: agkd_ops.ofa_loss(s, t, y, eps=0.0), ValueError, ["ofa_loss", "eps"]),
    (lambda s, t, y: agkd_ops.ofa_loss(s, t, y, reduction="batchmean"), ValueError, ["reduction"]),
    (lambda s, t, y: agkd_ops.dist_loss(s, t, inter_weight=-0.1), ValueError, ["dist_loss", "inter_weight"]),
    (lambda s, t, y: agkd_ops.dist_loss(s, t, temperature=-1.0), ValueError, ["dist_loss", "temperature"]),
    (lambda s, t, y: agkd_ops.dist_loss(s, t[:3]), ValueError, ["dist_loss", "same shape"]),
    (lambda s, t, y: agkd_ops.kd_kl_div(s, t, temperature=()), ValueError, ["kd_kl_div", "temperature", "empty"]),
    (lambda s, t, y: agkd_ops.kd_kl_div(s, t, temperature=(2.0, -1.0)), ValueError, ["temperature[1]"]),
    (lambda s, t, y: agkd_ops.kd_kl_div(s, t, temperature=(2.0, math.nan)), ValueError, ["temperature[1]"]),
    (lambda s, t, y: agkd_ops.kd_kl_div(s, t, temperature=torch.ones(3)), ValueError, ["temperature", "(6,)"]),
    (lambda s, t, y: agkd_ops.kd_kl_div(s, t, temperature=torch.tensor([2.0, 2, 2, 2, 2, 0])), ValueError,
     ["temperature", "got 0"]),
    (lambda s, t, y: agkd_ops.kd_kl_div(s, t, temperature=torch.tensor(math.nan)), ValueError, ["temperature"]),
    (lambda s, t, y: agkd_ops.kd_kl_div(s, t, temperature=torch.tensor(2)), TypeError, ["temperature", "floating"]),
    (lambda s, t, y: agkd_ops.kd_kl_div(s, t, teacher_temperature=0.0), ValueError, ["teacher_temperature"]),
    (lambda s, t, y: agkd_ops.kd_kl_div(s, t, standardize=1), TypeError, ["standardize"]),
    (lambda s, t, y: agkd_ops.kd_kl_div(s[:, :1], t[:, :1], standardize=True), ValueError, ["K=1"]),
    (lambda s, t, y: agkd_ops.kd_loss(s, t, y + 50, standardize=True, kd_weight=1.0), ValueError,
     ["kd_loss", "target"]),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_input_is_one_clear_error(backend, case):
    call, exc, words = BAD[case]
    s, t, y = _inputs(6, 10, torch.float32, seed=0)
    assert_clear_error(lambda: call(s.to(backend.device), t.to(backend.device), y.to(backend.device)), exc, words)


# Per-row losses whose target is read by a kernel (kd_loss's through its cross-entropy).
TARGET_READERS = {
    "dkd_loss": lambda s, t, y: agkd_ops.dkd_loss(s, t, y, reduction="none"),
    "dkd_loss, both weights 0": lambda s, t, y: agkd_ops.dkd_loss(s, t, y, tckd_weight=0.0, nckd_weight=0.0,
                                                                  reduction="none"),
    "ofa_loss": lambda s, t, y: agkd_ops.ofa_loss(s, t, y, reduction="none"),
    "kd_loss": lambda s, t, y: agkd_ops.kd_loss(s, t, y, standardize=True, reduction="none"),
}


@pytest.mark.parametrize("bad", [10, -1, 100])
@pytest.mark.parametrize("name", list(TARGET_READERS))
def test_an_out_of_range_class_is_an_error_or_a_nan_row_on_cuda(backend, name, bad):
    s, t, y = (x.to(backend.device) for x in _inputs(6, 10, torch.float32, seed=0))
    y[-1] = bad
    call = TARGET_READERS[name]
    if not backend.cuda_kernels:
        assert_clear_error(lambda: call(s, t, y), ValueError, [name.split(",")[0], "target", "[0, 10)"])
        return
    # No host sync to look at the targets: the row's loss and gradients are NaN, the others untouched.
    s = s.requires_grad_()
    per_row = call(s, t, y)
    assert torch.isnan(per_row[-1]) and torch.isfinite(per_row[:-1]).all()
    per_row.sum().backward()
    assert torch.isnan(s.grad[-1]).all() and torch.isfinite(s.grad[:-1]).all()


@pytest.mark.parametrize("make", [lambda: agkd_ops.DKDLoss(tckd_weight=-1), lambda: agkd_ops.OFALoss(eps=-1),
                                  lambda: agkd_ops.DISTLoss(temperature=0),
                                  lambda: agkd_ops.KDKLDivLoss(temperature=(1.0, 0.0)),
                                  lambda: agkd_ops.KDLoss(standardize="yes")])
def test_modules_check_their_options_at_construction(make):
    with pytest.raises((ValueError, TypeError), match=r"agkd_ops\."):
        make()


@pytest.mark.parametrize("name", ["dkd", "ofa", "dist", "lskd", "mlkd"])
def test_strided_and_expanded_logits_match_their_contiguous_copies(backend, name):
    g = torch.Generator().manual_seed(13)
    s = torch.randn(10, 6, generator=g).t()                    # transposed: strides (1, 6)
    t = torch.randn(1, 10, generator=g).expand(6, 10)          # one row for every sample: stride 0
    y = torch.randint(0, 10, (6,), generator=g)
    options = CASES[0][1] if name == "dkd" else dict(CASES)[name]
    ours, _ = _ours(name, options)
    strided = grads(lambda a, b: ours(a, b, y), s, t)
    dense = grads(lambda a, b: ours(a, b, y), s.contiguous(), t.contiguous())
    for a, b in zip(strided, dense):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["dkd", "ofa", "dist", "lskd", "mlkd"])
def test_half_inputs_give_half_results_computed_in_float32(backend, name, dtype):
    s, t, y = _inputs(8, 40, dtype, seed=14, scale=1.0)
    options = CASES[0][1] if name == "dkd" else dict(CASES)[name]
    ours, _ = _ours(name, options)
    loss, grad_s, _grad_t = grads(lambda a, b: ours(a, b, y), s, t)
    want = ours(s.float(), t.float(), y)
    assert loss.dtype == dtype and grad_s.dtype == dtype
    torch.testing.assert_close(loss.float(), want, rtol=1e-2, atol=1e-2)


def test_the_kernels_accept_the_temperatures_the_api_accepts(native):
    from agkd_ops._backend import _C  # the extension this session loaded (_C or _C_cuda_emu)
    from agkd_ops._validation import TEMPERATURE_RANGE

    assert (_C.min_temperature, _C.max_temperature) == TEMPERATURE_RANGE
    s, t, _y = (x.to(native.device) for x in _inputs(3, 7, torch.float32, seed=2))
    low, high = TEMPERATURE_RANGE
    tau = torch.tensor([[low], [high], [low / 2]], device=native.device)  # the last row's is below the range
    loss, *_grads = torch.ops.agkd.kd_family_fwd(s, t, tau, None, False, STANDARDIZE_EPS, "none", False, False,
                                                 False)
    assert loss[:2].isfinite().all() and loss[2].isnan()


@pytest.mark.parametrize("op,args,name", [
    ("kd_family_fwd", lambda s, t, y: (s, t, torch.ones(3, 1, device=s.device), None, True, 0.0, "mean", False,
                                       False, False),
     "standardize_eps"),
    ("dist_fwd", lambda s, t, y: (s, t, 1.0, 1.0, 1.0, -1e-8, False, False), "eps"),
])
def test_a_direct_op_call_with_a_bad_eps_is_refused(native, op, args, name):
    s, t, y = (x.to(native.device) for x in _inputs(3, 7, torch.float32, seed=2))
    with pytest.raises(RuntimeError, match=f"{name} must be > 0"):
        getattr(torch.ops.agkd, op)(*args(s, t, y))
