"""pytest-benchmark cases of the logit-KD family: our fused op and its authors'
composition at each shape, grouped so that each group's table compares the two
(``python -m pytest benchmarks/test_bench_logit_family.py``). The cases and compositions
are those of :mod:`benchmarks.logit_family`, which also reports the ratios."""
import pytest

import agkd_ops

from .logit_family import SHAPES, cases, make_inputs, step

CASES = cases()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("implementation", ["fused", "composed"])
@pytest.mark.parametrize("case", range(len(CASES)), ids=[c[0] for c in CASES])
def test_logit_family(benchmark, case, implementation, shape):
    name, ours, theirs = CASES[case]
    agkd_ops.set_backend("native")
    benchmark.group = f"{name} {shape[0]}x{shape[1]}"
    args = make_inputs(shape, "cpu")
    benchmark(step, ours if implementation == "fused" else theirs, *args)
