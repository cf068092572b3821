"""Public API contract (docs/design.md, section 3) of the map losses: reductions, dtypes,
modules, backend controls and every bad input, with messages that name the function and
the argument. KD's contract is in tests/test_kd.py."""
import importlib
import os
import subprocess
import sys
import warnings

import pytest
import torch

import agkd_ops
from agkd_ops import reference as R

from .backends import assert_clear_error

LOSSES = [agkd_ops.ssim, agkd_ops.ssim_loss, agkd_ops.hybrid_loss]


def maps(*shape, dtype=torch.float32):
    return torch.rand(*shape, dtype=dtype)


@pytest.mark.parametrize("fn", LOSSES + [agkd_ops.cosine_loss])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_reductions_shapes_and_dtypes(fn, dtype):
    x, y = maps(3, 2, 12, 12, dtype=dtype), maps(3, 2, 12, 12, dtype=dtype)
    none = fn(x, y, reduction="none")
    assert none.shape == (3,) and none.dtype == dtype
    for reduction in ("mean", "sum"):
        out = fn(x, y, reduction=reduction)
        assert out.shape == () and out.dtype == dtype
    torch.testing.assert_close(fn(x, y, reduction="mean").float(), none.float().mean(), rtol=1e-2, atol=1e-3)


def test_identical_inputs():
    x = maps(2, 3, 16, 16)
    assert agkd_ops.ssim(x, x).item() == pytest.approx(1.0, abs=1e-6)
    assert agkd_ops.hybrid_loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert agkd_ops.cosine_loss(x, -x).item() == pytest.approx(2.0, abs=1e-6)


def test_python_numbers_of_either_type_are_accepted():
    x, y = maps(2, 1, 16, 16), maps(2, 1, 16, 16)
    a = agkd_ops.ssim(x * 255, y * 255, data_range=255)
    b = agkd_ops.ssim(x * 255, y * 255, data_range=255.0)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, agkd_ops.ssim(x, y), rtol=1e-4, atol=1e-5)


def test_modules_mirror_functions():
    x, y = maps(2, 1, 16, 16), maps(2, 1, 16, 16)
    assert torch.equal(agkd_ops.HybridLoss(ssim_weight=0.2, cosine_weight=0.7, padding="zeros")(x, y),
                       agkd_ops.hybrid_loss(x, y, ssim_weight=0.2, cosine_weight=0.7, padding="zeros"))
    assert torch.equal(agkd_ops.SSIMLoss(window_size=5)(x, y), agkd_ops.ssim_loss(x, y, window_size=5))
    assert torch.equal(agkd_ops.CosineLoss(reduction="sum")(x, y), agkd_ops.cosine_loss(x, y, reduction="sum"))
    assert "ssim_weight=0.2" in repr(agkd_ops.HybridLoss(ssim_weight=0.2))


def test_zero_padding_accepts_maps_smaller_than_window():
    x, y = maps(2, 1, 3, 2), maps(2, 1, 3, 2)
    torch.testing.assert_close(agkd_ops.ssim(x, y, padding="zeros"), R.ssim(x, y, padding="zeros"))


MAP_BAD_INPUTS = [
    (lambda: agkd_ops.ssim(maps(2, 1, 16, 16), maps(2, 1, 16, 15)), ValueError, ["ssim", "same shape", "(2, 1, 16, 15)"]),
    (lambda: agkd_ops.ssim(maps(2, 16, 16), maps(2, 16, 16)), ValueError, ["ssim", "x", "rank-4"]),
    (lambda: agkd_ops.ssim(maps(2, 1, 16, 16), maps(2, 1, 16, 16, dtype=torch.float64)), TypeError, ["ssim", "dtype"]),
    (lambda: agkd_ops.ssim(torch.ones(2, 1, 16, 16, dtype=torch.int64), torch.ones(2, 1, 16, 16, dtype=torch.int64)), TypeError, ["ssim", "x", "floating"]),
    (lambda: agkd_ops.ssim(maps(0, 1, 16, 16), maps(0, 1, 16, 16)), ValueError, ["ssim", "empty"]),
    (lambda: agkd_ops.ssim(maps(2, 1, 16, 16), [1.0]), TypeError, ["ssim", "y", "Tensor"]),
    (lambda: agkd_ops.ssim(maps(2, 1, 16, 16), maps(2, 1, 16, 16), window_size=4), ValueError, ["ssim", "window_size", "odd"]),
    (lambda: agkd_ops.ssim(maps(2, 1, 16, 16), maps(2, 1, 16, 16), window_size=-3), ValueError, ["window_size"]),
    (lambda: agkd_ops.ssim(maps(2, 1, 16, 16), maps(2, 1, 16, 16), window_size=3.0), TypeError, ["window_size", "int"]),
    (lambda: agkd_ops.ssim(maps(2, 1, 8, 16), maps(2, 1, 8, 16)), ValueError, ["ssim", "valid", "window_size=11"]),
    (lambda: agkd_ops.ssim(maps(2, 1, 5, 16), maps(2, 1, 5, 16), padding="reflect"), ValueError, ["reflect", "window_size // 2"]),
    (lambda: agkd_ops.ssim(maps(2, 1, 16, 16), maps(2, 1, 16, 16), padding="same"), ValueError, ["padding", "'same'"]),
    (lambda: agkd_ops.ssim(maps(2, 1, 16, 16), maps(2, 1, 16, 16), sigma=0), ValueError, ["sigma", "> 0"]),
    (lambda: agkd_ops.ssim(maps(2, 1, 16, 16), maps(2, 1, 16, 16), data_range=-1), ValueError, ["data_range"]),
    (lambda: agkd_ops.ssim(maps(2, 1, 16, 16), maps(2, 1, 16, 16), k1=0), ValueError, ["k1"]),
    (lambda: agkd_ops.ssim(maps(2, 1, 16, 16), maps(2, 1, 16, 16), k2=float("nan")), ValueError, ["k2", "finite"]),
    (lambda: agkd_ops.ssim(maps(2, 1, 16, 16), maps(2, 1, 16, 16), reduction="batchmean"), ValueError, ["reduction", "'batchmean'"]),
    (lambda: agkd_ops.ssim_loss(maps(2, 1, 16, 16), maps(3, 1, 16, 16)), ValueError, ["ssim_loss", "same shape"]),
    (lambda: agkd_ops.hybrid_loss(maps(2, 1, 16, 16), maps(2, 1, 16, 16), ssim_weight=-1), ValueError, ["hybrid_loss", "ssim_weight", ">= 0"]),
    (lambda: agkd_ops.hybrid_loss(maps(2, 1, 16, 16), maps(2, 1, 16, 16), cosine_weight="1"), TypeError, ["hybrid_loss", "cosine_weight"]),
    (lambda: agkd_ops.hybrid_loss(maps(2, 1, 16, 16), maps(2, 1, 16, 16), eps=0), ValueError, ["hybrid_loss", "eps"]),
    (lambda: agkd_ops.cosine_loss(torch.rand(4), torch.rand(4)), ValueError, ["cosine_loss", "at least 2"]),
    (lambda: agkd_ops.cosine_loss(torch.rand(2, 4), torch.rand(2, 5)), ValueError, ["cosine_loss", "same shape"]),
    (lambda: agkd_ops.cosine_loss(torch.rand(2, 4), torch.rand(2, 4), eps=-1e-8), ValueError, ["cosine_loss", "eps"]),
]


# (KD's bad inputs are in tests/test_kd.py.)
@pytest.mark.parametrize("call,exc,words", MAP_BAD_INPUTS)
def test_bad_inputs_raise_clear_errors(call, exc, words):
    assert_clear_error(call, exc, words)


def test_different_devices_rejected():
    x = maps(2, 1, 16, 16)
    y = torch.empty(2, 1, 16, 16, device="meta")
    with pytest.raises(ValueError, match="same device"):
        agkd_ops.hybrid_loss(x, y)


def test_set_backend_validates_and_round_trips():
    previous = agkd_ops.get_backend()
    try:
        with pytest.raises(ValueError, match="set_backend"):
            agkd_ops.set_backend("fast")
        assert agkd_ops.get_backend() == previous
        agkd_ops.set_backend("reference")
        assert agkd_ops.get_backend() == "reference"
        x, y = maps(2, 1, 16, 16, dtype=torch.float64), maps(2, 1, 16, 16, dtype=torch.float64)
        torch.testing.assert_close(agkd_ops.hybrid_loss(x, y), R.hybrid_loss(x, y), rtol=0, atol=0)
    finally:
        agkd_ops.set_backend(previous)


def test_native_backend_refuses_what_it_cannot_serve():
    previous = agkd_ops.get_backend()
    try:
        agkd_ops.set_backend("native")
        x = torch.empty(2, 1, 16, 16, device="meta")
        with pytest.raises(NotImplementedError, match=r"hybrid_loss.*meta"):
            agkd_ops.hybrid_loss(x, x)
    finally:
        agkd_ops.set_backend(previous)


def test_environment_variable_sets_the_starting_backend(monkeypatch):
    import agkd_ops._backend as backend

    monkeypatch.setenv("AGKD_OPS_BACKEND", "reference")
    assert backend._initial_backend() == ("reference", None)
    monkeypatch.setenv("AGKD_OPS_BACKEND", "bogus")  # the import goes on; each call says why not
    name, why = backend._initial_backend()
    assert name is None and "AGKD_OPS_BACKEND='bogus'" in why


def test_build_info_reports_the_build():
    info = agkd_ops.build_info()
    for key in ("compiled", "cpu", "cuda", "cuda_archs", "torch_version", "num_threads", "openmp"):
        assert key in info
    assert info["cpu"] == agkd_ops.native_available("cpu")
    if info["compiled"]:
        assert info["compiled_torch_version"] == torch.__version__


def test_cuda_emulation_switch(monkeypatch):
    import agkd_ops._backend as backend

    emulated = os.environ.get("AGKD_OPS_CUDA_EMULATION") == "1"
    assert agkd_ops.build_info()["cuda_emulation"] is emulated
    if agkd_ops.build_info()["compiled"]:
        assert bool(backend._C.cuda_emulation) is emulated  # which extension was loaded
    monkeypatch.setenv("AGKD_OPS_CUDA_EMULATION", "yes")
    with pytest.raises(ValueError, match="AGKD_OPS_CUDA_EMULATION must be 0 or 1, got 'yes'"):
        backend._cuda_emulation_requested()


def test_asking_for_emulation_without_its_build_fails_at_import():
    # A None entry in sys.modules makes the import fail as if the build had no emulator.
    code = "import sys; sys.modules['agkd_ops._C_cuda_emu'] = None; import agkd_ops"
    env = dict(os.environ, AGKD_OPS_CUDA_EMULATION="1")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "AGKD_OPS_CUDA_EMULATION=1, but this install has no CUDA emulation build" in result.stderr


def test_reference_importable_without_compiled_library():
    module = importlib.import_module("agkd_ops.reference")
    assert "_C" not in module.__dict__


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_losses_run_in_float32_under_autocast(backend):
    """Inside autocast, bf16 activations meet float32 loss math (as torch's own losses do),
    mixed input dtypes are accepted, and the value is that of the float32 inputs."""
    if backend == "native" and not agkd_ops.native_available("cpu"):
        pytest.skip("native ops not built")
    previous = agkd_ops.get_backend()
    agkd_ops.set_backend(backend)
    try:
        torch.manual_seed(0)
        s = torch.randn(6, 10).bfloat16().requires_grad_()
        t = torch.randn(6, 10)
        target = torch.randint(0, 10, (6,))
        a = torch.rand(6, 1, 7, 7).bfloat16().requires_grad_()
        b = torch.rand(6, 1, 14, 14)
        features = torch.randn(6, 4, 8, 8).bfloat16()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = {"kd_loss": agkd_ops.kd_loss(s, t, target), "kd_kl_div": agkd_ops.kd_kl_div(s, t),
                   "align": agkd_ops.attention_align_loss(a, b, loss="hybrid", window_size=3),
                   "hybrid": agkd_ops.hybrid_loss(a, a.detach().float() * 0.5, window_size=3),
                   "map": agkd_ops.attention_map(features)}
        want = {"kd_loss": agkd_ops.kd_loss(s.float(), t, target), "kd_kl_div": agkd_ops.kd_kl_div(s.float(), t),
                "align": agkd_ops.attention_align_loss(a.float(), b, loss="hybrid", window_size=3),
                "hybrid": agkd_ops.hybrid_loss(a.float(), a.detach().float() * 0.5, window_size=3),
                "map": agkd_ops.attention_map(features.float())}
        for key in want:
            assert got[key].dtype == torch.float32, key
            torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7)
        got["kd_loss"].backward()
        assert s.grad.dtype == torch.bfloat16 and torch.isfinite(s.grad.float()).all()
        with pytest.raises(TypeError, match="same dtype"):  # outside autocast, mixed dtypes stay an error
            agkd_ops.kd_loss(s, t, target)
    finally:
        agkd_ops.set_backend(previous)


# What a native loss puts on the autograd graph: the op's own C++ Function (with the
# reduction inside it), nothing in Python, no separate mean or cast node.
_ONE_NODE = {
    "ssim_loss": ("HybridFunction", lambda x, y, s, t, k: agkd_ops.ssim_loss(x, y, window_size=3)),
    "cosine_loss": ("HybridFunction", lambda x, y, s, t, k: agkd_ops.cosine_loss(x, y, reduction="sum")),
    "hybrid_loss": ("HybridFunction", lambda x, y, s, t, k: agkd_ops.hybrid_loss(x, y, window_size=3)),
    "attention_align_loss": ("AlignFunction",
                             lambda x, y, s, t, k: agkd_ops.attention_align_loss(x[..., :4, :4], y)),
    "attention_map": ("AttentionMapFunction", lambda x, y, s, t, k: agkd_ops.attention_map(x)),
    "kd_kl_div": ("KdFunction", lambda x, y, s, t, k: agkd_ops.kd_kl_div(s, t)),
    "kd_loss": ("KdFunction", lambda x, y, s, t, k: agkd_ops.kd_loss(s, t, k, reduction="none")),
}


@pytest.mark.parametrize("name", sorted(_ONE_NODE))
def test_a_native_loss_is_one_cpp_autograd_node(native, name):
    function, call = _ONE_NODE[name]
    x = torch.rand(2, 1, 6, 6, device=native.device, requires_grad=True)
    y = torch.rand(2, 1, 6, 6, device=native.device)
    s = torch.randn(2, 5, device=native.device, requires_grad=True)
    out = call(x, y, s, torch.randn(2, 5, device=native.device), torch.tensor([1, 4], device=native.device))
    node = out.grad_fn
    assert function in node.name(), node.name()  # e.g. torch::autograd::CppNode<agkd::...::KdFunction>
    # Directly the inputs (or views of them: cosine_loss reads (N, 1, 1, D), align a slice).
    inputs = [type(f).__name__ for f, _ in node.next_functions if f is not None]
    assert inputs and set(inputs) <= {"AccumulateGrad", "ViewBackward0", "SliceBackward0"}, inputs


# ------------------------------------------------------------ one name per weight


def test_the_old_weight_names_warn_and_give_the_same_numbers():
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(2, 1, 16, 16, generator=g), torch.rand(2, 1, 16, 16, generator=g)
    small = torch.rand(2, 1, 8, 8, generator=g)
    s, t, target = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g), torch.tensor([0, 1, 2, 3])
    pairs = [
        (lambda: agkd_ops.hybrid_loss(x, y, alpha=0.2, beta=0.7),
         lambda: agkd_ops.hybrid_loss(x, y, ssim_weight=0.2, cosine_weight=0.7), "ssim_weight"),
        (lambda: agkd_ops.reference.hybrid_loss(x, y, alpha=0.2, beta=0.7),
         lambda: agkd_ops.reference.hybrid_loss(x, y, ssim_weight=0.2, cosine_weight=0.7), "ssim_weight"),
        (lambda: agkd_ops.attention_align_loss(small, y, loss="hybrid", alpha=0.2, beta=0.7),
         lambda: agkd_ops.attention_align_loss(small, y, loss="hybrid", ssim_weight=0.2, cosine_weight=0.7),
         "cosine_weight"),
        (lambda: agkd_ops.kd_loss(s, t, target, alpha=0.25), lambda: agkd_ops.kd_loss(s, t, target, kd_weight=0.25),
         "kd_weight"),
        (lambda: agkd_ops.reference.kd_loss(s, t, target, alpha=0.25),
         lambda: agkd_ops.reference.kd_loss(s, t, target, kd_weight=0.25), "kd_weight"),
        (lambda: agkd_ops.HybridLoss(alpha=0.2, beta=0.7)(x, y),
         lambda: agkd_ops.HybridLoss(ssim_weight=0.2, cosine_weight=0.7)(x, y), "ssim_weight"),
        (lambda: agkd_ops.AttentionAlignLoss(loss="hybrid", beta=0.7)(small, y),
         lambda: agkd_ops.AttentionAlignLoss(loss="hybrid", cosine_weight=0.7)(small, y), "cosine_weight"),
        (lambda: agkd_ops.KDLoss(alpha=0.25)(s, t, target), lambda: agkd_ops.KDLoss(kd_weight=0.25)(s, t, target),
         "kd_weight"),
    ]
    for old, new, name in pairs:
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            got = old()
        assert any(w.category is FutureWarning and f"deprecated, call it {name}" in str(w.message) for w in said)
        assert torch.equal(got, new())


def test_an_old_and_a_new_weight_name_together_are_refused():
    x = torch.rand(2, 1, 16, 16)
    s = torch.randn(4, 5)
    for call, words in ((lambda: agkd_ops.hybrid_loss(x, x, alpha=0.2, ssim_weight=0.3), ["alpha", "ssim_weight"]),
                        (lambda: agkd_ops.kd_loss(s, s, torch.tensor([0, 1, 2, 3]), alpha=0.2, kd_weight=0.3),
                         ["alpha", "kd_weight"]),
                        (lambda: agkd_ops.KDLoss(alpha=0.2, kd_weight=0.3), ["alpha", "kd_weight"])):
        with pytest.raises(TypeError) as caught:
            call()
        assert all(word in str(caught.value) for word in words), str(caught.value)
