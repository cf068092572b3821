"""What ``scale="minmax"`` costs: ``attention_align_loss`` (hybrid, window 3) forward +
backward of the AGKD student's three attention maps against a 14x14 teacher map, unscaled,
with the fused scaling, and with the scaling written as torch ops before the call.

    python -m benchmarks.minmax_cost [--device cpu] [--repeats 15] [--out benchmarks/results]

The three are timed alternately in one run; medians. Writes ``minmax_cost_<device>.md``
and ``.json``.
"""
from __future__ import annotations


import torch

import agkd_ops
from agkd_ops import reference

from .tables import alternating_medians, machine_name, results_parser, write_results

STAGES = [(40, 28), (112, 14), (320, 7)]  # EfficientNet-B0 stages 3-5 at 224 px: channels, grid
BATCH, TEACHER = 128, 14


def run(device="cpu", repeats=15, batch=BATCH, stages=STAGES, teacher_size=TEACHER):
    agkd_ops.set_backend("native")
    g = torch.Generator().manual_seed(0)
    maps = [agkd_ops.attention_map(torch.randn(batch, c, s, s, generator=g)).to(device).requires_grad_(True)
            for c, s in stages]
    teacher = torch.rand(batch, 1, teacher_size, teacher_size, generator=g).to(device)

    def step(scale_first, scale):
        for m in maps:
            m.grad = None
        t = scale_first(teacher)
        sum(agkd_ops.attention_align_loss(scale_first(m), t, loss="hybrid", window_size=3, scale=scale)
            for m in maps).backward()

    cases = {"unscaled": lambda: step(lambda x: x, None),
             "scale='minmax' (fused)": lambda: step(lambda x: x, "minmax"),
             "torch ops, then unscaled": lambda: step(reference.minmax_scale, None)}
    med = alternating_medians(cases, device, repeats)
    return [{"case": name, "ms": 1e3 * t, "vs_unscaled": t / med["unscaled"]} for name, t in med.items()]


def main(argv=None):
    parser = results_parser(__doc__)
    parser.add_argument("--small", action="store_true", help="tiny shapes (the GPU check's dry run)")
    args = parser.parse_args(argv)
    shape = dict(batch=2, stages=[(4, 8), (8, 4)], teacher_size=6) if args.small else {}
    rows = run(args.device, args.repeats, **shape)
    machine = machine_name(args.device)
    lines = [f"# The cost of scale=\"minmax\" ({args.device})", "",
             f"`attention_align_loss(loss=\"hybrid\", window_size=3)` forward + backward of three student maps "
             f"({BATCH}x1x28x28, 14x14, 7x7, from EfficientNet-B0 stages 3-5) against a {BATCH}x1x{TEACHER}x{TEACHER} "
             f"teacher map, float32; median of {args.repeats} alternating rounds; machine: {machine}; torch "
             f"{torch.__version__}. Command: `python -m benchmarks.minmax_cost --device {args.device}`.", "",
             "| case | ms | vs unscaled |", "|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['ms']:.2f} | {r['vs_unscaled']:.3f} |")
    write_results(args.out, f"minmax_cost_{args.device}", lines, {"machine": machine, "rows": rows})


if __name__ == "__main__":
    main()
