"""Forward + backward timings of every implementation of every loss (native, reference,
and the libraries or compositions users would otherwise write) on the same inputs in one
run. Run: pytest benchmarks/ --benchmark-only (see benchmarks/report.py)."""
import pytest
import torch

from benchmarks.cases import IMPLEMENTATIONS, SHAPES, make_inputs, step

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = [(loss, impl, name, shape, kw) for loss, impls in IMPLEMENTATIONS.items()
         for impl in impls for name, shape, kw in SHAPES[loss]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss,impl_name,shape_name,shape,kw", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_forward_backward(benchmark, device, loss, impl_name, shape_name, shape, kw):
    impl = IMPLEMENTATIONS[loss][impl_name]
    inputs = make_inputs(loss, shape, device)
    if not step(impl, inputs, kw):
        pytest.skip(f"{impl_name} has no {kw.get('padding')} padding")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        step(impl, inputs, kw)
        sync()

    benchmark.group = f"{loss} {shape_name} {device}"
    benchmark.extra_info.update(loss=loss, impl=impl_name, shape=list(shape), device=device, kwargs=kw)
    benchmark.pedantic(run, rounds=15, iterations=1, warmup_rounds=2)
