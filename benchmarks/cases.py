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
# (student, teacher) shapes: the student map is resized to the teacher's on the fly.
ALIGN_SHAPES = [
    ("28to56-hybrid", ((128, 1, 28, 28), (128, 1, 56, 56)), {"loss": "hybrid"}),
    ("28to56-mse", ((128, 1, 28, 28), (128, 1, 56, 56)), {"loss": "mse"}),
    ("7to14-mse", ((128, 1, 7, 7), (128, 1, 14, 14)), {"loss": "mse"}),
]
FEATURE_SHAPES = [("128x320x7x7", (128, 320, 7, 7), {})]
SHAPES = {"hybrid_loss": MAP_SHAPES, "ssim_loss": MAP_SHAPES,
          "attention_align_loss": ALIGN_SHAPES, "attention_map": FEATURE_SHAPES,
          "kd_kl_div": LOGIT_SHAPES, "kd_loss": LOGIT_SHAPES}
# On a GPU the shapes above take well under a millisecond, so launch and dispatch costs
# dominate; these add work large enough for the kernels' memory traffic to show.
GPU_MAP_SHAPES = [("64x4x224x224", (64, 4, 224, 224), {})]
GPU_LOGIT_SHAPES = [("8192x32000", (8192, 32000), {"temperature": 4.0})]
GPU_SHAPES = {"hybrid_loss": GPU_MAP_SHAPES, "ssim_loss": GPU_MAP_SHAPES,
              "attention_align_loss": [("56to224-hybrid", ((64, 4, 56, 56), (64, 4, 224, 224)), {"loss": "hybrid"})],
              "attention_map": [("256x1280x14x14", (256, 1280, 14, 14), {})],
              "kd_kl_div": GPU_LOGIT_SHAPES, "kd_loss": GPU_LOGIT_SHAPES}


def shapes_for(loss, device):
    """The (name, shape, kwargs) cases of one loss on one device."""
    return SHAPES[loss] + (GPU_SHAPES[loss] if device == "cuda" else [])


def shape_label(shape):
    """128x1x56x56, or 128x1x28x28->128x1x56x56 for a (student, teacher) pair."""
    if isinstance(shape[0], (tuple, list)):
        return "->".join(shape_label(s) for s in shape)
    return "x".join(map(str, shape))


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


def _attention_map(fn):
    # A scalar to differentiate: the sum of the map's squares.
    return lambda f, kw: fn(f).pow(2).sum()


def _attention_transfer(f):
    """The formula attention-transfer code usually writes."""
    return F.normalize(f.abs().pow(2).mean(1).flatten(1), dim=1)


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
    "attention_align_loss": {"native": _native("attention_align_loss"),
                             "F.interpolate + reference": _reference("attention_align_loss")},
    "attention_map": {"native": _attention_map(lambda f: _native("attention_map")(f, {})),
                      "reference": _attention_map(reference.attention_map),
                      "torch formula": _attention_map(_attention_transfer)},
    "kd_kl_div": {"native": _native("kd_kl_div"), "reference": _reference("kd_kl_div"),
                  "torch F.kl_div": _torch_kl},
    "kd_loss": {"native": lambda s, t, y, kw: _native("kd_loss")(s, t, y, dict(kw, kd_weight=0.9)),
                "reference": lambda s, t, y, kw: reference.kd_loss(s, t, y, kd_weight=0.9, **kw),
                "torch F.kl_div + F.cross_entropy": _torch_kd},
}


def find_shape(loss, shape_name):
    return next((shape, kw) for name, shape, kw in shapes_for(loss, "cuda") if name == shape_name)


def with_batch(shape, n):
    """The same case with batch size n (the memory measurement warms up with n = 1)."""
    if isinstance(shape[0], (tuple, list)):
        return tuple(with_batch(s, n) for s in shape)
    return (n,) + tuple(shape[1:])


def make_inputs(loss, shape, device="cpu", seed=0):
    """The loss's inputs, student first (requires grad)."""
    g = torch.Generator().manual_seed(seed)
    if loss == "attention_align_loss":
        student, teacher = shape
        return [torch.rand(student, generator=g).to(device).requires_grad_(True),
                torch.rand(teacher, generator=g).to(device)]
    if loss == "attention_map":
        return [torch.randn(shape, generator=g).to(device).requires_grad_(True)]
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
