"""What only the CUDA kernels have: block threads that run in any order, and streams.

Each op's own file (test_hybrid.py, test_kd.py, test_align.py, test_attention_map.py)
runs its checks on the CUDA kernels too, on a GPU or on the CPU emulator. The tests here
take the ``kernel_device`` fixture: a GPU where there is one, otherwise the CPU emulator,
which runs the same .cu sources with each block's threads as fibers (build with
AGKD_CUDA_EMULATION=1, run with AGKD_OPS_CUDA_EMULATION=1; see docs/testing.md). The emulator
checks the kernels' arithmetic, indexing, barriers and launch limits, not a GPU's memory
model or timing. Tests that need a real device (streams) are marked ``cuda``.
"""
import pytest
import torch

import agkd_ops

pytestmark = pytest.mark.cuda_kernels


@pytest.fixture(autouse=True)
def _native_only():
    """set_backend('native'), so a silent fallback to the reference cannot pass."""
    previous = agkd_ops.get_backend()
    agkd_ops.set_backend("native")
    yield
    agkd_ops.set_backend(previous)


# ------------------------------------------------------------- every op: thread order


def _every_op(device):
    """(name, function of one float32 input, that input) for each native op pair."""
    g = torch.Generator().manual_seed(8)
    maps = torch.rand(3, 2, 40, 37, generator=g).to(device)
    logits = torch.randn(3, 3000, generator=g).to(device)
    feats = torch.randn(3, 16, 14, 14, generator=g).to(device)
    teacher_map = torch.rand(3, 2, 56, 56, generator=g).to(device)
    targets = torch.tensor([1, 2999, 7], device=device)
    return [
        ("hybrid", lambda a: agkd_ops.hybrid_loss(a, maps.flip(0), padding="reflect", reduction="none"), maps),
        ("kd", lambda a: agkd_ops.kd_loss(a, logits.flip(0), targets, reduction="none"), logits),
        ("align", lambda a: agkd_ops.attention_align_loss(a, teacher_map, loss="hybrid", reduction="none"),
         maps[:, :, :28, :28].contiguous()),
        ("align_mse", lambda a: agkd_ops.attention_align_loss(a, teacher_map, reduction="none"),
         maps[:, :, :28, :28].contiguous()),
        ("attention_map", lambda a: agkd_ops.attention_map(a).sum((1, 2, 3)), feats),
    ]


def _run(fn, x):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    return out.detach(), grad


def test_every_op_is_bitwise_deterministic_whatever_the_thread_order(kernel_device, monkeypatch):
    # On the emulator the second and third runs schedule each block's threads in reverse and
    # shuffled order: fixed-order reductions give the same bits, a missing barrier does not.
    for name, fn, x in _every_op(kernel_device):
        runs = []
        for order in ("forward", "reverse", "shuffle"):
            monkeypatch.setenv("AGKD_CUDA_EMU_ORDER", order)
            runs.append(_run(fn, x))
        for out, grad in runs[1:]:
            assert torch.equal(out, runs[0][0]), name
            assert torch.equal(grad, runs[0][1]), name


# ---------------------------------------------------------------------- real GPU only


@pytest.mark.cuda
def test_kernels_run_on_the_current_stream():
    x = torch.rand(8, 3, 56, 56, device="cuda", requires_grad=True)
    y = torch.rand(8, 3, 56, 56, device="cuda")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        x.grad = None
        loss = agkd_ops.hybrid_loss(x, y, padding="reflect")
        loss.backward()
        got = (loss.detach().clone(), x.grad.clone())
    side.synchronize()
    x.grad = None
    loss = agkd_ops.hybrid_loss(x, y, padding="reflect")
    loss.backward()
    assert torch.equal(got[0], loss) and torch.equal(got[1], x.grad)


@pytest.mark.cuda
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_no_op_syncs_the_device_on_its_eager_path(reduction):
    # Forward and backward of every public function with the CUDA runtime told to raise on
    # any call that waits for the device (a value read on the host, a pageable copy).
    g = torch.Generator().manual_seed(3)
    maps, other = torch.rand(2, 4, 1, 16, 16, generator=g).cuda()
    small = torch.rand(4, 1, 7, 7, generator=g).cuda()
    s, t = torch.randn(2, 4, 10, generator=g).cuda()
    y = torch.randint(0, 10, (4,), generator=g).cuda()
    kl = "batchmean" if reduction == "mean" else reduction
    calls = {
        "ssim_loss": (lambda a: agkd_ops.ssim_loss(a, other, window_size=5, reduction=reduction), maps),
        "hybrid_loss": (lambda a: agkd_ops.hybrid_loss(a, other, window_size=5, reduction=reduction), maps),
        "cosine_loss": (lambda a: agkd_ops.cosine_loss(a, other, reduction=reduction), maps),
        "kd_kl_div": (lambda a: agkd_ops.kd_kl_div(a, t, reduction=kl), s),
        "kd_loss": (lambda a: agkd_ops.kd_loss(a, t, y, reduction=reduction), s),
        "align hybrid": (lambda a: agkd_ops.attention_align_loss(a, other, loss="hybrid", window_size=5,
                                                                 reduction=reduction), small),
        "align mse": (lambda a: agkd_ops.attention_align_loss(a, other, reduction=reduction), small),
        "attention_map": (lambda a: agkd_ops.attention_map(a).sum((1, 2, 3)), maps),
    }
    for name, (fn, x) in calls.items():
        _run(fn, x)  # warm-up: first-call allocations and device attribute queries
        x = x.detach().clone().requires_grad_(True)
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn(x).sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert torch.isfinite(x.grad).all(), name
