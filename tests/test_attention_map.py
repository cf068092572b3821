"""agkd::attention_map_fwd/bwd and attention_map.

On every backend (tests/backends.py): the attention-transfer formula users know
(F.normalize of abs().pow(p).mean(1)), every dtype against the float64 reference (on the
reference backend: its low-precision paths), gradcheck. On the native backends: values and
gradients against the float64 reference over random shapes, exponents and layouts, and
checks of the compiled op itself (opcheck)."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import agkd_ops
from agkd_ops import reference as R

from .backends import FLOAT_DTYPES, against_the_reference, assert_clear_error, close, grads, layout, rounded


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, 0.5])
def test_is_attention_transfer(backend, p):
    g = torch.Generator().manual_seed(0)
    f = torch.randn(3, 6, 5, 7, generator=g, dtype=torch.float64)
    want = F.normalize(f.abs().pow(p).mean(1).flatten(1), dim=1).view(3, 1, 5, 7)
    torch.testing.assert_close(agkd_ops.attention_map(f.to(backend.device), p=p).cpu(), want)
    torch.testing.assert_close(agkd_ops.attention_map(f.to(backend.device), p=p, normalize=False).cpu(),
                               f.abs().pow(p).mean(1, keepdim=True))


def test_float32_map_and_gradient_equal_the_formula(backend):
    g = torch.Generator().manual_seed(0)
    f = torch.randn(4, 320, 7, 7, generator=g)
    formula = lambda x: F.normalize(x.abs().pow(2).mean(1).flatten(1), dim=1).view(4, 1, 7, 7)
    got = grads(lambda x: agkd_ops.attention_map(x).pow(3).sum((1, 2, 3)), f.to(backend.device))
    want = grads(lambda x: formula(x).pow(3).sum((1, 2, 3)), f)
    torch.testing.assert_close(agkd_ops.attention_map(f.to(backend.device)).cpu(), formula(f))
    torch.testing.assert_close(got[1].cpu(), want[1], rtol=1e-4, atol=1e-7)


@given(n=st.integers(1, 3), c=st.integers(1, 9), h=st.integers(1, 20), w=st.integers(1, 20),
       p=st.sampled_from([2.0, 1.0, 3.0, 0.5, 1.7]), normalize=st.booleans(),
       layout_name=st.sampled_from(["contiguous", "transposed", "channels_last"]),
       dtype=st.sampled_from([torch.float64, torch.float32]), seed=st.integers(0, 2**31 - 1))
def test_matches_reference_on_random_features(native, n, c, h, w, p, normalize, layout_name, dtype, seed):
    backend = native
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    f = torch.where(torch.rand(f.shape, generator=g, dtype=torch.float64) < 0.2, 0.0, f)  # ReLU-like zeros
    weights = torch.rand(n, 1, h, w, generator=g, dtype=torch.float64)
    out, gf = grads(lambda x: agkd_ops.attention_map(x, p=p, normalize=normalize),
                    layout(f.to(backend.device, dtype), layout_name), weights=weights)
    want, wgf = grads(lambda x: R.attention_map(x, p=p, normalize=normalize), f, weights=weights)
    rtol, atol = {torch.float64: (1e-9, 1e-11), torch.float32: (2e-4, 2e-5)}[dtype]
    assert out.dtype == dtype and out.shape == (n, 1, h, w)
    torch.testing.assert_close(out.double().cpu(), want, rtol=rtol, atol=atol)
    torch.testing.assert_close(gf.double().cpu(), wgf, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("p,normalize", [(2.0, True), (1.0, True), (3.0, False), (0.5, True)])
def test_matches_reference_in_every_dtype(backend, dtype, p, normalize):
    against_the_reference(backend, dtype)
    g = torch.Generator().manual_seed(0)
    f = rounded((4, 40, 7, 9), dtype, g, randn=True)
    weights = torch.rand(4, 1, 7, 9, generator=g, dtype=torch.float64)
    want = grads(lambda a: R.attention_map(a, p=p, normalize=normalize), f, weights=weights)
    got_f = layout(f.to(backend.device, dtype), "channels_last")
    got = grads(lambda a: agkd_ops.attention_map(a, p=p, normalize=normalize), got_f, weights=weights)
    tol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    for a, b in zip(got, want):
        close(a, b, tol)


@pytest.mark.parametrize("p,normalize", [(2.0, True), (3.0, True), (1.0, False), (0.7, True)])
def test_gradcheck_float64(backend, p, normalize):
    g = torch.Generator().manual_seed(0)
    f = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64).to(backend.device).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: agkd_ops.attention_map(x, p=p, normalize=normalize), (f,))


def test_opcheck(native):
    g = torch.Generator().manual_seed(0)
    f = torch.randn(2, 3, 4, 5, generator=g).to(native.device).requires_grad_(True)
    torch.library.opcheck(torch.ops.agkd.attention_map_fwd, (f, 2.0, True, 1e-12))
    amap, norm = torch.ops.agkd.attention_map_fwd(f.detach(), 2.0, True, 1e-12)
    torch.library.opcheck(torch.ops.agkd.attention_map_bwd,
                          (torch.rand_like(amap), f.detach(), amap, norm, 2.0, True, 1e-12),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize(
    "call,exc,words",
    [
        (lambda: agkd_ops.attention_map(torch.rand(2, 3, 4)), ValueError, ["attention_map", "features", "rank-4"]),
        (lambda: agkd_ops.attention_map(torch.ones(2, 3, 4, 4, dtype=torch.int64)), TypeError,
         ["features", "floating"]),
        (lambda: agkd_ops.attention_map(torch.rand(2, 3, 4, 4), p=0), ValueError, ["attention_map", "p", "> 0"]),
        (lambda: agkd_ops.attention_map(torch.rand(2, 3, 4, 4), normalize=1), TypeError, ["normalize", "bool"]),
    ],
)
def test_bad_inputs_raise_clear_errors(call, exc, words):
    assert_clear_error(call, exc, words)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_the_gradient_keeps_the_features_layout(native, memory_format):
    """channels_last features (the trainer's --channels-last, most AMP training) are read
    pixel by pixel and get a channels_last gradient, what the convolution before wants."""
    g = torch.Generator().manual_seed(0)
    f = torch.randn(3, 24, 7, 9, generator=g).to(native.device).contiguous(memory_format=memory_format)
    f.requires_grad_(True)
    weights = torch.rand(3, 1, 7, 9, generator=g).to(native.device)
    (agkd_ops.attention_map(f) * weights).sum().backward()
    assert f.grad.is_contiguous(memory_format=memory_format)
    plain = f.detach().contiguous().requires_grad_(True)
    (agkd_ops.attention_map(plain) * weights).sum().backward()
    torch.testing.assert_close(f.grad, plain.grad, rtol=1e-6, atol=1e-7)
