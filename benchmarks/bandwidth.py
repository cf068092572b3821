"""The logit ops at the memory floor: achieved bandwidth as a fraction of the device's peak.

    python -m benchmarks.bandwidth [--device cuda] [--shape 8192x32000] [--repeats 20] [--out DIR]

Each op runs one forward + backward on float32 logits (the student requires grad, the
teacher does not), timed with CUDA events on a GPU (``perf_counter`` on the CPU). Two byte
counts per op, N·K·4 bytes per logit tensor:

* ``floor``: what any fused forward + backward must move: read the student and the teacher
  once, write the student's gradient (3 tensors);
* ``design``: what our kernels move by design: Hinton KD's forward reads both and its
  backward reads both again and writes the gradient (5); the logit-KD family computes the
  gradient in its forward, so it reads both, writes the gradient in float32, and the
  backward reads that and writes the scaled one (5); DIST also writes and reads the two
  probability tables for its column pass (9).

Achieved bandwidth is bytes ÷ median time; the fraction is of the device's peak
(``PEAK_TBPS`` by device name, or ``--peak`` in TB/s). Writes ``bandwidth_<device>.md`` and
``.json``.
"""
from __future__ import annotations

import argparse
import statistics

import torch

import agkd_ops

from .tables import timed, write_results

# Peak memory bandwidth (TB/s) of the GPUs this project is lent, from their data sheets.
PEAK_TBPS = {"H100": 3.35, "H200": 4.8}

# name, call(s, t, y), design tensors moved (in units of one N×K float32 tensor)
OPS = [
    ("kd_loss", lambda s, t, y: agkd_ops.kd_loss(s, t, y, kd_weight=0.5), 5),
    ("kd_kl_div", lambda s, t, y: agkd_ops.kd_kl_div(s, t), 5),
    ("kd_kl_div standardize", lambda s, t, y: agkd_ops.kd_kl_div(s, t, temperature=2.0, standardize=True), 5),
    ("kd_kl_div teacher_temperature", lambda s, t, y: agkd_ops.kd_kl_div(s, t, temperature=1.0,
                                                                       teacher_temperature=5.0), 5),
    ("dkd_loss", lambda s, t, y: agkd_ops.dkd_loss(s, t, y), 5),
    ("ofa_loss", lambda s, t, y: agkd_ops.ofa_loss(s, t, y), 5),
    ("dist_loss", lambda s, t, y: agkd_ops.dist_loss(s, t), 9),
]
FLOOR_TENSORS = 3


def peak_tbps(device: str, given: float | None) -> float | None:
    if given is not None:
        return given
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TBPS.items() if k in name), None)


def measure(device: str, shape, repeats: int):
    n, k = shape
    g = torch.Generator().manual_seed(0)
    s = (3 * torch.randn(n, k, generator=g)).to(device).requires_grad_()
    t = (3 * torch.randn(n, k, generator=g)).to(device)
    y = torch.randint(0, k, (n,), generator=g).to(device)
    agkd_ops.set_backend("native")
    tensor_bytes = n * k * 4
    rows = []
    for name, call, design in OPS:
        def step():
            s.grad = None
            call(s, t, y).backward()
        for _ in range(3):
            step()
        seconds = statistics.median(timed(step, device) for _ in range(repeats))
        rows.append({"op": name, "shape": f"{n}x{k}", "ms": 1e3 * seconds,
                     "floor_gbps": FLOOR_TENSORS * tensor_bytes / seconds / 1e9,
                     "design_gbps": design * tensor_bytes / seconds / 1e9, "design_tensors": design})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", default="8192x32000", help="N x K of the logits")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--peak", type=float, default=None, help="the device's peak bandwidth in TB/s")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split("x"))
    rows = measure(args.device, shape, args.repeats)
    peak = peak_tbps(args.device, args.peak)
    machine = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    for r in rows:
        r["floor_fraction"] = r["floor_gbps"] / (1e3 * peak) if peak else None
        r["design_fraction"] = r["design_gbps"] / (1e3 * peak) if peak else None
    lines = [f"# Logit ops against the memory floor ({args.device})", "",
             f"One forward + backward, float32 {args.shape}, median of {args.repeats}; {machine}; torch "
             f"{torch.__version__}; peak {'%.2f TB/s' % peak if peak else 'unknown (give --peak)'}. Command: "
             f"`python -m benchmarks.bandwidth --device {args.device} --shape {args.shape}`. Floor: read student "
             f"and teacher, write the gradient (3 tensors); design: what the kernels move (see the module).", "",
             "| op | ms | floor GB/s | of peak | design GB/s (tensors) | of peak |", "|---|---:|---:|---:|---:|---:|"]
    pct = lambda f: "—" if f is None else f"{100 * f:.0f}%"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['op']} | {r['ms']:.3f} | {r['floor_gbps']:.0f} | {pct(r['floor_fraction'])} | "
                     f"{r['design_gbps']:.0f} ({r['design_tensors']}) | {pct(r['design_fraction'])} |")
    write_results(args.out, f"bandwidth_{args.device}", lines,
                  {"machine": machine, "torch": torch.__version__, "peak_tbps": peak, "shape": args.shape, "rows": rows})


if __name__ == "__main__":
    main()
