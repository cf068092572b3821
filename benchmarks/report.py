"""Runs the benchmark suite and the memory measurement, and writes
benchmarks/results/<device>.json and <device>.md (medians, ratios to native, peak extra
memory, machine and torch version).

    python -m benchmarks.report [--device cpu|cuda]   (default: cuda when a GPU is visible)
"""
import argparse
import json
import os
import platform
import subprocess
import sys
from collections import defaultdict

import torch

from benchmarks.cases import IMPLEMENTATIONS, shape_label, shapes_for
from benchmarks.memory import peak_extra_bytes, peak_extra_cuda_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Where the reports go: the committed results, or another folder (.ci/gpu's OUT).
RESULTS = os.environ.get("AGKD_BENCH_RESULTS") or os.path.join(ROOT, "benchmarks", "results")


def case_label(shape, kw):
    """The shape, plus the compared loss where one op serves several (attention alignment)."""
    return shape_label(shape) + (f" ({kw['loss']})" if "loss" in kw else "")


def _machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "torch": torch.__version__, "python": platform.python_version()}


def machine_line(machine):
    return (f"Machine: {machine['cpu']}, {machine['cores']} cores, torch threads {machine['torch_threads']}"
            + (f", GPU {machine['gpu']}" if machine["gpu"] else "")
            + f"; torch {machine['torch']}, Python {machine['python']}.")


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_benchmarks(test_file, device=None):
    """Runs one pytest-benchmark suite (on one device, if given) and returns its JSON report."""
    os.makedirs(RESULTS, exist_ok=True)
    raw = os.path.join(RESULTS, "pytest-benchmark.json")
    env = dict(os.environ, **({"AGKD_BENCH_DEVICES": device} if device else {}))
    subprocess.run([sys.executable, "-m", "pytest", test_file, "--benchmark-only", "-q",
                    f"--benchmark-json={raw}", "-p", "no:cacheprovider"], cwd=ROOT, env=env, check=True)
    with open(raw) as f:
        bench = json.load(f)
    os.remove(raw)
    return bench


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default=default_device())
    device = parser.parse_args().device
    bench = run_benchmarks("benchmarks/test_bench_losses.py", device)
    medians = defaultdict(dict)  # (loss, shape, device) -> impl -> ms
    for b in bench["benchmarks"]:
        info = b["extra_info"]
        key = (info["loss"], case_label(info["shape"], info["kwargs"]), info["device"])
        medians[key][info["impl"]] = 1e3 * b["stats"]["median"]
    memory = {}
    for loss, impls in IMPLEMENTATIONS.items():
        for name, shape, kw in shapes_for(loss, device):
            for impl in impls:
                measure = peak_extra_cuda_bytes if device == "cuda" else peak_extra_bytes
                memory[(loss, case_label(shape, kw), impl)] = measure(loss, impl, name)

    machine = _machine()
    rows = []
    lines = [f"# agkd_ops benchmark ({device})", "",
             machine_line(machine), "",
             "Forward + backward of a scalar loss, float32, median of 15 rounds; the gradient is taken for the "
             "first input (the student) only. KD losses at temperature 4 (kd_loss with alpha 0.9), logits "
             "3·N(0, 1). Ratio = median / native median (higher means native is faster). Peak extra memory: "
             + ("the CUDA caching allocator's peak during one step minus what was allocated before it "
                "(after warm-up)." if device == "cuda" else
                "growth of max RSS during one CPU step (fresh process, after warm-up)."), "",
             f"| loss | shape | device | impl | median ms | ratio vs native | peak extra MiB ({device}) |",
             "|---|---|---|---|---:|---:|---:|"]
    for (loss, shape, dev), impls in sorted(medians.items()):
        native = impls.get("native")
        for impl, ms in sorted(impls.items(), key=lambda kv: kv[1]):
            mem = memory.get((loss, shape, impl))
            ratio = ms / native if native else None
            rows.append({"loss": loss, "shape": shape, "device": dev, "impl": impl, "median_ms": ms,
                         "ratio_vs_native": ratio, f"peak_extra_bytes_{device}": mem})
            lines.append(f"| {loss} | {shape} | {dev} | {impl} | {ms:.2f} | "
                         f"{'' if ratio is None else f'{ratio:.1f}x'} | "
                         f"{'' if mem is None else f'{mem / 2**20:.1f}'} |")
    with open(os.path.join(RESULTS, f"{device}.json"), "w") as f:
        json.dump({"machine": machine, "results": rows}, f, indent=1)
    with open(os.path.join(RESULTS, f"{device}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
