"""Forward + backward timings of every implementation of every loss (native, reference,
and the libraries or compositions users would otherwise write) on the same inputs in one
run. Run: pytest benchmarks/ --benchmark-only (see benchmarks/report.py)."""
import os

import pytest
import torch

from benchmarks.cases import IMPLEMENTATIONS, make_inputs, shapes_for, step

# AGKD_BENCH_DEVICES=cuda times the GPU alone (benchmarks.report --device sets it).
DEVICES = os.environ.get("AGKD_BENCH_DEVICES", "cpu" + (",cuda" if torch.cuda.is_available() else "")).split(",")
CASES = [(device, loss, impl, name, shape, kw) for device in DEVICES for loss, impls in IMPLEMENTATIONS.items()
         for impl in impls for name, shape, kw in shapes_for(loss, device)]


@pytest.mark.parametrize("device,loss,impl_name,shape_name,shape,kw", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}-{c[3]}" for c in CASES])
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
