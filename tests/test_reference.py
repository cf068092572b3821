"""The reference implementations against independent ones: a brute-force NumPy oracle
(definition, 2-D windows, centred variances), pytorch-msssim, kornia, scikit-image and
torch.nn.functional."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from agkd_ops import reference as R

from .oracle import cosine_per_sample, ssim_per_sample

PADDINGS = ["valid", "reflect", "zeros"]


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("shape,window", [((2, 3, 13, 12), 11), ((3, 1, 9, 7), 5), ((1, 2, 4, 5), 3)])
def test_reference_ssim_matches_bruteforce_oracle(padding, shape, window):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    y = (x + 0.3 * torch.rand(shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    got = R.ssim(x, y, window_size=window, sigma=1.2, data_range=1.0, padding=padding, reduction="none")
    want = ssim_per_sample(x.numpy(), y.numpy(), window, 1.2, 1.0, padding=padding)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)


def test_reference_ssim_matches_pytorch_msssim_valid():
    pytorch_msssim = pytest.importorskip("pytorch_msssim")
    g = torch.Generator().manual_seed(2)
    x = torch.rand(4, 3, 40, 33, generator=g, dtype=torch.float64)
    y = torch.rand(4, 3, 40, 33, generator=g, dtype=torch.float64)
    want = pytorch_msssim.ssim(x, y, data_range=1.0, size_average=False)
    got = R.ssim(x, y, reduction="none")
    # pytorch-msssim builds its Gaussian in float32 whatever the input dtype.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_reference_ssim_matches_kornia_reflect():
    kornia = pytest.importorskip("kornia")
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 2, 24, 31, generator=g, dtype=torch.float64)
    y = torch.rand(2, 2, 24, 31, generator=g, dtype=torch.float64)
    want = kornia.metrics.ssim(x, y, 11, max_val=1.0, eps=0.0, padding="same").flatten(1).mean(1)
    got = R.ssim(x, y, padding="reflect", reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_reference_ssim_matches_scikit_image_valid():
    metrics = pytest.importorskip("skimage.metrics")
    g = torch.Generator().manual_seed(4)
    x = torch.rand(1, 1, 32, 29, generator=g, dtype=torch.float64)
    y = torch.rand(1, 1, 32, 29, generator=g, dtype=torch.float64)
    want = metrics.structural_similarity(
        x[0, 0].numpy(), y[0, 0].numpy(), gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False, data_range=1.0)
    got = R.ssim(x, y).item()
    assert got == pytest.approx(want, rel=1e-10)


def test_reference_cosine_matches_functional_and_oracle():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 3, 4, 2, generator=g, dtype=torch.float64)
    y = torch.randn(5, 3, 4, 2, generator=g, dtype=torch.float64)
    x[0] = 0  # a clamped norm
    got = R.cosine_loss(x, y, reduction="none")
    torch.testing.assert_close(got, 1 - F.cosine_similarity(x.flatten(1), y.flatten(1), dim=1, eps=1e-8))
    np.testing.assert_allclose(got.numpy(), 1 - cosine_per_sample(x.numpy(), y.numpy()), rtol=1e-12)


def test_reference_hybrid_is_weighted_sum():
    g = torch.Generator().manual_seed(6)
    x = torch.rand(3, 2, 16, 16, generator=g, dtype=torch.float64)
    y = torch.rand(3, 2, 16, 16, generator=g, dtype=torch.float64)
    want = 0.3 * (1 - ssim_per_sample(x.numpy(), y.numpy())) + 0.9 * (1 - cosine_per_sample(x.numpy(), y.numpy()))
    got = R.hybrid_loss(x, y, alpha=0.3, beta=0.9, reduction="none")
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)
