"""What the benchmark modules that write a results table share: the machine's name, one
timed call, and writing the table (Markdown) with its rows (JSON) under the results folder."""
from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import time
from typing import Any, Callable, Dict, List

import torch


def machine_name(device: str) -> str:
    """The GPU's name, or the CPU's and the threads torch uses."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def timed(fn: Callable[[], Any], device: str) -> float:
    """Seconds of one ``fn()``: CUDA events on a GPU (after the work queued before), the
    host clock on the CPU."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def write_results(out: str, stem: str, lines: List[str], payload: Dict[str, Any]) -> None:
    """``OUT/<stem>.md`` (the table) and ``OUT/<stem>.json`` (``payload``), then the table
    on standard output."""
    folder = pathlib.Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (folder / f"{stem}.json").write_text(json.dumps(payload, indent=1))
    print("\n".join(lines))


def results_parser(doc: str) -> argparse.ArgumentParser:
    """The options every such module takes: --device, --repeats, --out."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default="benchmarks/results")
    return parser


def alternating_medians(cases: Dict[str, Callable[[], Any]], device: str, repeats: int,
                        warmup: int = 3) -> Dict[str, float]:
    """Median seconds of each case, timed in rounds that run every case in turn, so that
    all see the same machine state; ``warmup`` untimed rounds first."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    times: Dict[str, List[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            times[name].append(timed(fn, device))
    return {name: statistics.median(v) for name, v in times.items()}
