"""Peak extra memory of one forward + backward.

On the CPU: peak extra host memory of one forward + backward, measured as the growth of the
process's maximum resident set size in a fresh subprocess (after a small warm-up call, so
one-time initialisation is not counted). Large tensors are mmap-backed and returned on
free, so the growth is the peak of what the step allocated beyond its inputs.
On CUDA: the caching allocator's peak during the step minus what was allocated before it.

    python -m benchmarks.memory LOSS IMPL SHAPE_NAME   -> prints bytes
"""
import json
import os
import resource
import subprocess
import sys


def _maxrss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _measure(loss, impl_name, shape_name):
    import torch

    from benchmarks.cases import IMPLEMENTATIONS, find_shape, make_inputs, step, with_batch

    torch.set_num_threads(int(os.environ.get("AGKD_BENCH_THREADS", torch.get_num_threads())))
    shape, kw = find_shape(loss, shape_name)
    impl = IMPLEMENTATIONS[loss][impl_name]
    if not step(impl, make_inputs(loss, with_batch(shape, 1)), kw):
        return None
    inputs = make_inputs(loss, shape)
    before = _maxrss_bytes()
    step(impl, inputs, kw)
    return _maxrss_bytes() - before


def peak_extra_bytes(loss, impl_name, shape_name):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "benchmarks.memory", loss, impl_name, shape_name],
                         cwd=root, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_extra_cuda_bytes(loss, impl_name, shape_name):
    import torch

    from benchmarks.cases import IMPLEMENTATIONS, find_shape, make_inputs, step

    shape, kw = find_shape(loss, shape_name)
    impl = IMPLEMENTATIONS[loss][impl_name]
    inputs = make_inputs(loss, shape, "cuda")
    if not step(impl, inputs, kw):  # also the warm-up
        return None
    inputs[0].grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step(impl, inputs, kw)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


if __name__ == "__main__":
    print(json.dumps(_measure(*sys.argv[1:4])))
