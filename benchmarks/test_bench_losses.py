"""Forward + backward timings, native vs reference vs pytorch-msssim vs kornia, on the
same inputs in one run. Run: pytest benchmarks/ --benchmark-only (see benchmarks/report.py)."""
import pytest
import torch

from benchmarks.cases import IMPLEMENTATIONS, SHAPES, make_inputs, step

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape_name,shape,kw", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("loss,impl_name", [(loss, impl) for loss, impls in IMPLEMENTATIONS.items() for impl in impls])
def test_forward_backward(benchmark, device, shape_name, shape, kw, loss, impl_name):
    impl = IMPLEMENTATIONS[loss][impl_name]
    x, y = make_inputs(shape, device)
    if not step(impl, x, y, kw):
        pytest.skip(f"{impl_name} has no {kw.get('padding')} padding")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        step(impl, x, y, kw)
        sync()

    benchmark.group = f"{loss} {shape_name} {device}"
    benchmark.extra_info.update(loss=loss, impl=impl_name, shape=list(shape), device=device, **kw)
    benchmark.pedantic(run, rounds=15, iterations=1, warmup_rounds=2)
