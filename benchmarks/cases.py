"""The benchmark cases and implementations, shared by the timing suite and the memory
measurement. Every implementation computes a scalar loss and its backward."""
import torch

import agkd_ops
from agkd_ops import reference

# (name, shape, loss kwargs)
SHAPES = [
    ("56x56", (128, 1, 56, 56), {}),
    ("8ch-28x28", (128, 8, 28, 28), {}),
    ("224x224", (32, 1, 224, 224), {}),
    ("14x14-w7-reflect", (256, 1, 14, 14), {"window_size": 7, "padding": "reflect"}),
]


def _native(loss):
    def run(x, y, kw):
        previous = agkd_ops.get_backend()
        agkd_ops.set_backend("native")
        try:
            return getattr(agkd_ops, loss)(x, y, **kw)
        finally:
            agkd_ops.set_backend(previous)
    return run


def _reference(loss):
    return lambda x, y, kw: getattr(reference, loss)(x, y, **kw)


def _msssim(x, y, kw):
    from pytorch_msssim import ssim
    if kw.get("padding", "valid") != "valid":
        return None  # pytorch-msssim has only valid padding
    return 1 - ssim(x, y, data_range=1.0, win_size=kw.get("window_size", 11), size_average=True)


def _kornia(x, y, kw):
    import kornia
    # kornia's "same" padding is reflect; its sigma is fixed at 1.5.
    ssim_map = kornia.metrics.ssim(x, y, kw.get("window_size", 11), max_val=1.0, eps=0.0,
                                   padding="same" if kw.get("padding") == "reflect" else "valid")
    return 1 - ssim_map.mean()


IMPLEMENTATIONS = {
    "hybrid_loss": {"native": _native("hybrid_loss"), "reference": _reference("hybrid_loss")},
    "ssim_loss": {"native": _native("ssim_loss"), "reference": _reference("ssim_loss"),
                  "pytorch-msssim": _msssim, "kornia": _kornia},
}


def make_inputs(shape, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g).to(device).requires_grad_(True)
    y = torch.rand(shape, generator=g).to(device)
    return x, y


def step(impl, x, y, kw):
    """One forward + backward; returns False where the implementation cannot serve."""
    x.grad = None
    loss = impl(x, y, kw)
    if loss is None:
        return False
    loss.backward()
    return True
