"""Runs the end-to-end distillation-step benchmark and writes
benchmarks/results/distill_step_<device>.json and .md (medians, cached/online and
reference/native ratios, machine and torch version).

    python -m benchmarks.step_report
"""
import json
import os

from benchmarks.report import RESULTS, _machine, default_device, machine_line, run_benchmarks


def main():
    bench = run_benchmarks("benchmarks/test_bench_distill_step.py")
    ms = {(b["extra_info"]["source"], b["extra_info"]["backend"]): 1e3 * b["stats"]["median"]
          for b in bench["benchmarks"]}
    info = bench["benchmarks"][0]["extra_info"]
    machine = _machine()
    device = default_device()
    lines = [f"# One AGKD distillation step ({device})", "",
             machine_line(machine), "",
             f"Teacher {info['teacher']}, student {info['student']}, {info['image_size']} px, batch {info['batch']}, "
             "100 classes, hybrid attention loss on student stages 3-5, float32, median of 7 rounds. A step: "
             "fetch and augment the batch (cached: plus reading the teacher's rows from the memory-mapped "
             "float16 cache), forward, backward, Adam step.", "",
             "| teacher | ops | median ms | vs online (same ops) | vs native (same teacher) |",
             "|---|---|---:|---:|---:|"]
    rows = []
    for (source, backend), median in sorted(ms.items()):
        vs_online = median / ms[("online", backend)]
        vs_native = median / ms[(source, "native")] if (source, "native") in ms else None
        rows.append({"source": source, "backend": backend, "median_ms": median, "ratio_vs_online": vs_online,
                     "ratio_vs_native": vs_native})
        lines.append(f"| {source} | {backend} | {median:.0f} | {vs_online:.3f} | "
                     f"{'' if vs_native is None else f'{vs_native:.3f}'} |")
    with open(os.path.join(RESULTS, f"distill_step_{device}.json"), "w") as f:
        json.dump({"machine": machine, "config": info, "results": rows}, f, indent=1)
    with open(os.path.join(RESULTS, f"distill_step_{device}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
