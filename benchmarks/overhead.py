"""Runs the per-call overhead suite (benchmarks/test_bench_overhead.py) and writes
benchmarks/results/overhead_<device>.json and .md: per case the median time of one forward
+ backward with agkd_ops and with the plain-PyTorch composition, and their ratio.

    python -m benchmarks.overhead [--device cpu|cuda]   (default: cuda when a GPU is visible)
    python -m benchmarks.overhead --baseline OLD.json    (adds the agkd_ops column of another
                                                          build's pytest-benchmark JSON of this suite)
"""
import argparse
import json
import os
from collections import defaultdict

from benchmarks.report import RESULTS, _machine, default_device, machine_line, run_benchmarks

SIZE_ORDER = {"tiny": 0, "paper": 1, "large": 2}


def per_step_us(bench):
    """(size, case) -> impl -> median µs per step, from a pytest-benchmark report."""
    per_step = defaultdict(dict)
    for b in bench["benchmarks"]:
        info = b["extra_info"]
        per_step[(info["size"], info["case"])][info["impl"]] = 1e6 * b["stats"]["median"] / info["inner"]
    return per_step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default=default_device())
    parser.add_argument("--baseline", help="pytest-benchmark JSON of this suite from another build")
    parser.add_argument("--baseline-label", default="the baseline", help="what the baseline build is")
    args = parser.parse_args()
    device = args.device
    per_step = per_step_us(run_benchmarks("benchmarks/test_bench_overhead.py", device))
    baseline = {}
    if args.baseline:
        with open(args.baseline) as f:
            baseline = per_step_us(json.load(f))
    machine = _machine()
    lines = [f"# agkd_ops per-call cost ({device})", "", machine_line(machine), "",
             "Forward + backward of a scalar loss, float32, gradient for the student only. Each round runs "
             "a case's steps back to back" + (" and synchronises once" if device == "cuda" else "")
             + "; the table gives the median round divided by its steps. torch: the composition a user "
             "would write (F.cross_entropy + F.kl_div of log_softmax; pytorch-msssim + "
             "F.cosine_similarity; F.normalize of the channel mean of squares; F.interpolate first). "
             "Ratio = torch / agkd_ops (higher: agkd_ops is faster)."
             + (f" Before: {args.baseline_label}, timed in a separate run on the same machine; its ratio "
                "is that run's torch / agkd_ops (each ratio column comes from one run)." if baseline else ""), "",
             "| size | case | agkd_ops µs | torch µs | ratio |" + (" before µs | ratio before |" if baseline else ""),
             "|---|---|---:|---:|---:|" + ("---:|---:|" if baseline else "")]
    rows = []
    for (size, case), impls in sorted(per_step.items(), key=lambda kv: (SIZE_ORDER[kv[0][0]], kv[0][1])):
        ours, theirs = impls["agkd_ops"], impls["torch"]
        old = baseline.get((size, case), {})
        before, ratio_before = old.get("agkd_ops"), old["torch"] / old["agkd_ops"] if "agkd_ops" in old else None
        rows.append({"size": size, "case": case, "agkd_ops_us": ours, "torch_us": theirs, "ratio": theirs / ours,
                     "before_us": before, "ratio_before": ratio_before})
        line = f"| {size} | {case} | {ours:.1f} | {theirs:.1f} | {theirs / ours:.2f}x |"
        if baseline:
            line += f" {before:.1f} | {ratio_before:.2f}x |" if before else " | |"
        lines.append(line)
    with open(os.path.join(RESULTS, f"overhead_{device}.json"), "w") as f:
        json.dump({"machine": machine, "results": rows}, f, indent=1)
    with open(os.path.join(RESULTS, f"overhead_{device}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
