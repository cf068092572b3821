"""Runs the per-call overhead suite (benchmarks/test_bench_overhead.py) and writes
benchmarks/results/overhead_<device>.json and .md: per case the median time of one forward
+ backward with agkd_ops and with the plain-PyTorch composition, and their ratio.

    python -m benchmarks.overhead [--device cpu|cuda]   (default: cuda when a GPU is visible)
"""
import argparse
import json
import os
from collections import defaultdict

from benchmarks.report import RESULTS, _machine, default_device, machine_line, run_benchmarks

SIZE_ORDER = {"tiny": 0, "paper": 1, "large": 2}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default=default_device())
    device = parser.parse_args().device
    bench = run_benchmarks("benchmarks/test_bench_overhead.py", device)
    per_step = defaultdict(dict)  # (size, case) -> impl -> µs per step
    for b in bench["benchmarks"]:
        info = b["extra_info"]
        per_step[(info["size"], info["case"])][info["impl"]] = 1e6 * b["stats"]["median"] / info["inner"]
    machine = _machine()
    lines = [f"# agkd_ops per-call cost ({device})", "", machine_line(machine), "",
             "Forward + backward of a scalar loss, float32, gradient for the student only. Each round runs "
             "a case's steps back to back" + (" and synchronises once" if device == "cuda" else "")
             + "; the table gives the median round divided by its steps. torch: the composition a user "
             "would write (F.cross_entropy + F.kl_div of log_softmax; pytorch-msssim + "
             "F.cosine_similarity; F.normalize of the channel mean of squares; F.interpolate first). "
             "Ratio = torch / agkd_ops (higher: agkd_ops is faster).", "",
             "| size | case | agkd_ops µs | torch µs | ratio |", "|---|---|---:|---:|---:|"]
    rows = []
    for (size, case), impls in sorted(per_step.items(), key=lambda kv: (SIZE_ORDER[kv[0][0]], kv[0][1])):
        ours, theirs = impls["agkd_ops"], impls["torch"]
        rows.append({"size": size, "case": case, "agkd_ops_us": ours, "torch_us": theirs, "ratio": theirs / ours})
        lines.append(f"| {size} | {case} | {ours:.1f} | {theirs:.1f} | {theirs / ours:.2f}x |")
    with open(os.path.join(RESULTS, f"overhead_{device}.json"), "w") as f:
        json.dump({"machine": machine, "results": rows}, f, indent=1)
    with open(os.path.join(RESULTS, f"overhead_{device}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
