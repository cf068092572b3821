"""The benchmark cases and implementations, shared by the timing suite and the memory
measurement. Every implementation computes a scalar loss and its backward; the first
input is the one that requires grad (the student)."""
import torch
import torch.nn.functional as F

import agkd_ops
from agkd_ops import reference

# (name, shape, loss kwargs) per kind of input
MAP_SHAPES = [
    ("56x56", (128, 1, 56, 56), {}),
    ("8ch-28x28", (128, 8, 28, 28), {}),
    ("224x224", (32, 1, 224, 224), {}),
    ("14x14-w7-reflect", (256, 1, 14, 14), {"window_size": 7, "padding": "reflect"}),
]
LOGIT_SHAPES = [
    ("128x100", (128, 100), {"temperature": 4.0}),
    ("128x1000", (128, 1000), {"temperature": 4.0}),
    ("4096x1000", (4096, 1000), {"temperature": 4.0}),
    ("1024x32000", (1024, 32000), {"temperature": 4.0}),
]
SHAPES = {"hybrid_loss": MAP_SHAPES, "ssim_loss": MAP_SHAPES,
          "kd_kl_div": LOGIT_SHAPES, "kd_loss": LOGIT_SHAPES}


def _native(loss):
    def run(*args):
        *tensors, kw = args
        previous = agkd_ops.get_backend()
        agkd_ops.set_backend("native")
        try:
            return getattr(agkd_ops, loss)(*tensors, **kw)
        finally:
            agkd_ops.set_backend(previous)
    return run


def _reference(loss):
    return lambda *args: getattr(reference, loss)(*args[:-1], **args[-1])


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


def _torch_kl(s, t, kw):
    """What KD code usually writes: τ²·KL through log_softmax and F.kl_div."""
    tau = kw["temperature"]
    return tau**2 * F.kl_div(F.log_softmax(s / tau, 1), F.log_softmax(t / tau, 1),
                             log_target=True, reduction="batchmean")


def _torch_kd(s, t, y, kw):
    return 0.1 * F.cross_entropy(s, y) + 0.9 * _torch_kl(s, t, kw)


IMPLEMENTATIONS = {
    "hybrid_loss": {"native": _native("hybrid_loss"), "reference": _reference("hybrid_loss")},
    "ssim_loss": {"native": _native("ssim_loss"), "reference": _reference("ssim_loss"),
                  "pytorch-msssim": _msssim, "kornia": _kornia},
    "kd_kl_div": {"native": _native("kd_kl_div"), "reference": _reference("kd_kl_div"),
                  "torch F.kl_div": _torch_kl},
    "kd_loss": {"native": lambda s, t, y, kw: _native("kd_loss")(s, t, y, dict(kw, alpha=0.9)),
                "reference": lambda s, t, y, kw: reference.kd_loss(s, t, y, alpha=0.9, **kw),
                "torch F.kl_div + F.cross_entropy": _torch_kd},
}


def find_shape(loss, shape_name):
    return next((shape, kw) for name, shape, kw in SHAPES[loss] if name == shape_name)


def make_inputs(loss, shape, device="cpu", seed=0):
    """The loss's inputs, student first (requires grad)."""
    g = torch.Generator().manual_seed(seed)
    if loss in ("kd_kl_div", "kd_loss"):
        s = 3 * torch.randn(shape, generator=g)
        t = 3 * torch.randn(shape, generator=g)
        inputs = [s.to(device).requires_grad_(True), t.to(device)]
        if loss == "kd_loss":
            inputs.append(torch.randint(0, shape[1], (shape[0],), generator=g).to(device))
        return inputs
    x = torch.rand(shape, generator=g).to(device).requires_grad_(True)
    y = torch.rand(shape, generator=g).to(device)
    return [x, y]


def step(impl, inputs, kw):
    """One forward + backward; returns False where the implementation cannot serve."""
    inputs[0].grad = None
    loss = impl(*inputs, kw)
    if loss is None:
        return False
    loss.backward()
    return True
