"""``attention_map`` forward + backward against its memory floor.

    python -m benchmarks.attention_floor [--device cpu] [--repeats 15] [--out benchmarks/results]

The op must read the features once in the forward, read them again in the backward and
write their gradient into fresh memory. The floor is the time torch's own streaming
kernels take to move the same bytes: ``features.sum()`` (one read) plus a copy into a
freshly allocated tensor of the features' layout (one read, one write to fresh memory).
Both are timed alternately in one run, for EfficientNet-B0's stages 3-5 at 224 px and
batch 128 (the AGKD student's attention stages) and one large map, in the NCHW and
channels_last layouts; the table gives medians and floor / op (1.0: at the floor).
Writes ``attention_floor_<device>.md`` and ``.json``.
"""
from __future__ import annotations


import torch

import agkd_ops

from .tables import alternating_medians, machine_name, results_parser, write_results

PAPER_STAGES = [(128, 40, 28, 28), (128, 112, 14, 14), (128, 320, 7, 7)]
LARGE = (64, 512, 56, 56)
LAYOUTS = {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}


def measure(shapes, layout, device, repeats):
    """(op seconds, floor seconds): medians over alternating rounds, each round every shape."""
    g = torch.Generator().manual_seed(0)
    features = [torch.randn(s, generator=g).to(device).contiguous(memory_format=LAYOUTS[layout]).requires_grad_(True)
                for s in shapes]
    upstream = [torch.rand(s[0], 1, s[2], s[3], generator=g).to(device) for s in shapes]

    def op():
        for f, u in zip(features, upstream):
            f.grad = None
            agkd_ops.attention_map(f).backward(u)

    def floor():
        for f in features:
            f.detach().sum()
            torch.empty_like(f).copy_(f.detach())

    med = alternating_medians({"op": op, "floor": floor}, device, repeats, warmup=2)
    return med["op"], med["floor"]


def run(device="cpu", repeats=15, paper=PAPER_STAGES, large=LARGE):
    agkd_ops.set_backend("native")
    rows = []
    for label, shapes, reps in (("paper stages 3-5", paper, repeats), ("large map", [large], max(3, repeats // 3))):
        for layout in LAYOUTS:
            op_s, floor_s = measure(shapes, layout, device, reps)
            mb = sum(torch.Size(s).numel() for s in shapes) * 4 / 2**20
            rows.append({"case": label, "shapes": [list(s) for s in shapes], "layout": layout, "features_mib": mb,
                         "op_ms": 1e3 * op_s, "floor_ms": 1e3 * floor_s, "fraction": floor_s / op_s})
    return rows


def main(argv=None):
    parser = results_parser(__doc__)
    parser.add_argument("--small", action="store_true", help="tiny shapes (the GPU check's dry run)")
    args = parser.parse_args(argv)
    paper, large = ([(2, 4, 8, 8), (2, 8, 4, 4)], (2, 8, 16, 16)) if args.small else (PAPER_STAGES, LARGE)
    rows = run(args.device, args.repeats, paper, large)
    machine = machine_name(args.device)
    lines = [f"# attention_map against its memory floor ({args.device})", "",
             f"Forward + backward (p = 2, normalised, float32), against torch's `sum` plus a copy into fresh "
             f"memory of the same features (the bytes the op must move); medians of alternating rounds; "
             f"machine: {machine}; torch {torch.__version__}. Command: "
             f"`python -m benchmarks.attention_floor --device {args.device}`.", "",
             "| case | layout | features (MiB) | op (ms) | floor (ms) | floor / op |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['layout']} | {r['features_mib']:.1f} | {r['op_ms']:.2f} | "
                     f"{r['floor_ms']:.2f} | {r['fraction']:.2f} |")
    write_results(args.out, f"attention_floor_{args.device}", lines, {"machine": machine, "rows": rows})


if __name__ == "__main__":
    main()
