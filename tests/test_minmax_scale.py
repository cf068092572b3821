"""agkd::minmax_scale_fwd/bwd and what stands on it: minmax_scale, and scale="minmax" of
hybrid_loss, attention_align_loss and their modules, on every backend.

The oracle is the plain composition, written here from the definition
(m − min) / (max − min) per (sample, channel) map, 0 for a range of at most 1e-12, with
torch.amin/amax, whose gradients at a tie are shared evenly.
"""
import pytest
import torch

import agkd_ops

from .backends import (FLOAT_DTYPES, against_the_reference, assert_clear_error, assert_nan_stays_in_its_sample, close,
                       grads, layout, rounded)

EPS = 1e-12


def composition(maps):
    flat = maps.flatten(2)
    low, high = flat.amin(2, keepdim=True), flat.amax(2, keepdim=True)
    spread = high - low
    constant = spread <= EPS
    scaled = (flat - low) / torch.where(constant, torch.ones_like(spread), spread)
    return torch.where(constant, torch.zeros_like(scaled), scaled).view_as(maps)


def random_maps(shape=(3, 2, 6, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=torch.float64), torch.rand(shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("layout_name", ["contiguous", "transposed", "channels_last", "sliced"])
def test_values_and_gradients_equal_the_composition(backend, layout_name):
    maps, weights = random_maps()
    got = grads(agkd_ops.minmax_scale, layout(maps.to(backend.device), layout_name), weights=weights)
    want = grads(composition, maps, weights=weights)
    for a, b in zip(got, want):
        close(a, b, 1e-12)
    assert float(got[0].amin()) == 0.0 and float(got[0].amax()) == 1.0


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_every_dtype(backend, dtype):
    against_the_reference(backend, dtype)
    g = torch.Generator().manual_seed(1)
    maps = rounded((2, 3, 7, 7), dtype, g)
    weights = torch.rand(2, 3, 7, 7, generator=g, dtype=torch.float64)
    got = grads(agkd_ops.minmax_scale, maps.to(backend.device, dtype), weights=weights)
    want = grads(composition, maps, weights=weights)
    assert got[0].dtype == dtype
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    close(got[0], want[0], tol)
    close(got[1], want[1], tol, scale=float(want[1].abs().max()))


def test_a_constant_map_is_zero_with_zero_gradient(backend):
    maps, weights = random_maps()
    maps[0, 1] = 0.0                                                 # a dead stage
    maps[1, 0] = 3.5                                                 # a blank image
    maps[2, 1] = 1.0 + 1e-14 * torch.arange(30, dtype=torch.float64).view(6, 5)  # range below 1e-12
    out, grad = grads(agkd_ops.minmax_scale, maps.to(backend.device), weights=weights)
    for n, c in ((0, 1), (1, 0), (2, 1)):
        assert torch.equal(out[n, c].cpu(), torch.zeros(6, 5, dtype=torch.float64))
        assert torch.equal(grad[n, c].cpu(), torch.zeros(6, 5, dtype=torch.float64))
    assert grad.abs().max() < 1e3, "no 1/eps gradient anywhere"


def test_ties_share_the_gradient_as_amin_and_amax_do(backend):
    maps = torch.tensor([[[[0.0, 1.0, 0.0], [0.5, 1.0, 1.0]]]], dtype=torch.float64)  # two minima, three maxima
    weights = torch.tensor([[[[1.0, -2.0, 0.5], [3.0, 0.25, 4.0]]]], dtype=torch.float64)
    got = grads(agkd_ops.minmax_scale, maps.to(backend.device), weights=weights)
    want = grads(composition, maps, weights=weights)
    for a, b in zip(got, want):
        close(a, b, 1e-12)


def test_a_nan_stays_in_its_map(backend):
    maps, weights = random_maps()
    maps[1, 0, 2, 3] = float("nan")
    out, grad = grads(agkd_ops.minmax_scale, maps.to(backend.device), weights=weights)
    clean_out, clean_grad = grads(agkd_ops.minmax_scale, random_maps()[0].to(backend.device), weights=weights)
    assert torch.isnan(out[1, 0]).all() and torch.isnan(grad[1, 0]).all()
    keep = torch.ones(3, 2, dtype=torch.bool)
    keep[1, 0] = False
    assert torch.equal(out[keep], clean_out[keep]) and torch.equal(grad[keep], clean_grad[keep])


@pytest.mark.parametrize("loss", ["ssim", "hybrid", "mse", "cosine"])
def test_attention_align_loss_scale_minmax_is_the_composition_then_the_loss(backend, loss):
    g = torch.Generator().manual_seed(2)
    student = agkd_ops.attention_map(torch.randn(4, 16, 7, 7, generator=g, dtype=torch.float64))
    teacher = torch.rand(4, 1, 14, 14, generator=g, dtype=torch.float64) * 1e-2
    kw = dict(window_size=3, padding="reflect") if loss in ("ssim", "hybrid") else {}
    got = grads(lambda s, t: agkd_ops.attention_align_loss(s, t, loss=loss, scale="minmax", reduction="none", **kw),
                student.to(backend.device), teacher.to(backend.device))
    agkd_ops.set_backend("reference")
    want = grads(lambda s, t: agkd_ops.attention_align_loss(composition(s), composition(t), loss=loss,
                                                            reduction="none", **kw), student, teacher)
    for a, b in zip(got, want):
        close(a, b, 1e-10, scale=float(b.abs().max()))


def test_hybrid_loss_and_the_modules_take_scale(backend):
    g = torch.Generator().manual_seed(3)
    x, y = (agkd_ops.attention_map(torch.randn(3, 8, 9, 9, generator=g, dtype=torch.float64)).to(backend.device)
            for _ in range(2))
    fused = agkd_ops.hybrid_loss(x, y, scale="minmax", window_size=5)
    module = agkd_ops.HybridLoss(scale="minmax", window_size=5)(x, y)
    plain = agkd_ops.hybrid_loss(composition(x.cpu()).to(backend.device), composition(y.cpu()).to(backend.device),
                                 window_size=5)
    close(fused, plain, 1e-12)
    close(module, plain, 1e-12)
    align = agkd_ops.AttentionAlignLoss(loss="hybrid", scale="minmax", window_size=5)
    assert "scale='minmax'" in repr(align)
    close(align(x, y), plain, 1e-12)
    unscaled = agkd_ops.hybrid_loss(x, y, window_size=5)
    assert not torch.allclose(unscaled, plain), "scale=None compares the maps as given"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("student_layout,teacher_layout", [("contiguous", "contiguous"), ("channels_last", "sliced"),
                                                           ("transposed", "channels_last")])
def test_scaling_inside_the_kernels_is_bitwise_the_scaled_maps_then_the_loss(native, dtype, student_layout,
                                                                            teacher_layout):
    """scale="minmax" scales inside the alignment kernels (and hybrid_loss's, through them):
    the same numbers as minmax_scale's op, then the unscaled call, to the last bit, in every
    dtype and layout, for both inputs' gradients."""
    g = torch.Generator().manual_seed(5)
    student = rounded((3, 2, 9, 7), dtype, g).to(native.device, dtype)
    teacher = rounded((3, 2, 6, 6), dtype, g).to(native.device, dtype)
    student[0, 1] = 0.25                                           # a constant map: 0, zero gradient
    teacher[1, 0, 2:4, 1] = teacher[1, 0].amax()                   # ties at the maximum
    student, teacher = layout(student, student_layout), layout(teacher, teacher_layout)
    weights = torch.rand(3, generator=g, dtype=torch.float64).to(native.device, dtype)
    cases = [(lambda s, t, **kw: agkd_ops.attention_align_loss(s, t, loss="hybrid", window_size=3, reduction="none",
                                                               **kw), student, teacher),
             (lambda s, t, **kw: agkd_ops.attention_align_loss(s, t, loss="mse", reduction="none", **kw),
              student, teacher),
             (lambda x, y, **kw: agkd_ops.hybrid_loss(x, y, window_size=3, reduction="none", **kw),
              teacher, layout(rounded((3, 2, 6, 6), dtype, g).to(native.device, dtype), student_layout))]
    for fn, a, b in cases:
        fused = grads(lambda s, t: fn(s, t, scale="minmax"), a, b, weights=weights)
        composed = grads(lambda s, t: fn(agkd_ops.minmax_scale(s), agkd_ops.minmax_scale(t)), a, b, weights=weights)
        for got, want in zip(fused, composed):
            assert got.dtype == want.dtype and torch.equal(got, want)
        if a is student:
            assert not fused[1][0, 1].any(), "the constant map has no gradient"


def test_scaled_alignment_isolates_a_nan_and_gives_a_constant_map_no_gradient(native):
    g = torch.Generator().manual_seed(6)
    student = agkd_ops.attention_map(torch.randn(4, 8, 7, 7, generator=g, dtype=torch.float64)).to(native.device)
    teacher = torch.rand(4, 1, 14, 14, generator=g, dtype=torch.float64).to(native.device)
    student[2] = 0.0                                                  # a dead stage
    teacher[3] = 7.0                                                  # a blank teacher map

    def per_sample(s, t):
        return agkd_ops.attention_align_loss(s, t, loss="hybrid", window_size=3, scale="minmax", reduction="none")

    loss, grad_s, grad_t = grads(per_sample, student, teacher)
    assert torch.equal(grad_s[2].cpu(), torch.zeros(1, 7, 7, dtype=torch.float64))
    assert torch.equal(grad_t[3].cpu(), torch.zeros(1, 14, 14, dtype=torch.float64))
    assert grad_s.abs().max() < 1e3 and grad_t.abs().max() < 1e3, "no 1/eps gradient anywhere"
    assert_nan_stays_in_its_sample(per_sample, [student, teacher], 0, (1, 0, 3, 3))


def test_bad_scale_values_are_clear_errors():
    x = torch.rand(2, 1, 8, 8)
    assert_clear_error(lambda: agkd_ops.hybrid_loss(x, x, scale="max"), ValueError,
                       ["hybrid_loss", "scale", "'max'"])
    assert_clear_error(lambda: agkd_ops.attention_align_loss(x, x, scale=True), ValueError,
                       ["attention_align_loss", "scale"])
    with pytest.raises(ValueError, match="HybridLoss: scale must be None or 'minmax'"):
        agkd_ops.HybridLoss(scale="z-score")
    assert_clear_error(lambda: agkd_ops.minmax_scale(torch.rand(2, 8, 8)), ValueError, ["minmax_scale", "maps"])


def test_opcheck_and_gradcheck(native):
    g = torch.Generator().manual_seed(4)
    maps = torch.rand(2, 3, 4, 5, generator=g, dtype=torch.float64).to(native.device).requires_grad_(True)
    torch.library.opcheck(torch.ops.agkd.minmax_scale_fwd, (maps, EPS))
    scaled, rng = torch.ops.agkd.minmax_scale_fwd(maps.detach(), EPS)
    torch.library.opcheck(torch.ops.agkd.minmax_scale_bwd, (torch.rand_like(scaled), maps.detach(), rng, EPS),
                          test_utils=("test_schema", "test_faketensor"))
    assert torch.autograd.gradcheck(agkd_ops.minmax_scale, (maps,))
    student = torch.rand(2, 3, 5, 4, generator=g, dtype=torch.float64).to(native.device).requires_grad_(True)
    teacher = torch.rand(2, 3, 7, 7, generator=g, dtype=torch.float64).to(native.device).requires_grad_(True)
    options = dict(alpha=0.6, beta=0.4, gamma=0.2, window_size=3, sigma=1.5, c1=1e-4, c2=9e-4, padding="reflect",
                   eps=1e-8, align_corners=False)
    torch.library.opcheck(torch.ops.agkd.align_fwd, (student, teacher), dict(options, reduction="none", minmax_eps=EPS))
    _loss, stats = torch.ops.agkd.align_fwd(student.detach(), teacher.detach(), **options, reduction="none",
                                            minmax_eps=EPS)
    torch.library.opcheck(torch.ops.agkd.align_bwd, (torch.rand(2, dtype=torch.float64).to(native.device),
                                                     student.detach(), teacher.detach(), stats),
                          dict(options, needs_grad_student=True, needs_grad_teacher=True, minmax_eps=EPS),
                          test_utils=("test_schema", "test_faketensor"))
    assert torch.autograd.gradcheck(
        lambda s, t: agkd_ops.attention_align_loss(s, t, loss="hybrid", window_size=3, scale="minmax",
                                                   reduction="none"), (student, teacher))


def test_torch_compile_fullgraph(native):
    maps = torch.rand(2, 1, 6, 6, device=native.device, requires_grad=True)
    teacher = torch.rand(2, 1, 12, 12, device=native.device)
    fn = torch.compile(lambda s, t: agkd_ops.attention_align_loss(s, t, loss="hybrid", scale="minmax"),
                       fullgraph=True)
    fn(maps, teacher).backward()
    assert torch.isfinite(maps.grad).all()
