"""What a backward costs on top of its forward, for the logit losses whose forward writes
the gradient: forward + backward against the forward alone under ``torch.no_grad()``
(the ideal is 1: the backward only hands the gradient over), and against the plain torch
composition a user would write (forward + backward).

    python -m benchmarks.backward_cost [--device cpu] [--repeats 15] [--out benchmarks/results]

The three are timed alternately in one run, rounds of each in turn, so that all see the
same machine state; medians. Writes ``backward_cost_<device>.md`` and ``.json``.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

import agkd_ops

from .tables import alternating_medians, machine_name, results_parser, write_results

SHAPES = [(128, 100), (4096, 1000)]
TEMPERATURE, KD_WEIGHT = 4.0, 0.5


def _composed_kd_loss(s, t, y):
    kl = F.kl_div(F.log_softmax(s / TEMPERATURE, 1), F.log_softmax(t / TEMPERATURE, 1), reduction="batchmean",
                  log_target=True)
    return (1 - KD_WEIGHT) * F.cross_entropy(s, y) + KD_WEIGHT * TEMPERATURE ** 2 * kl


def _composed_kd_kl_div(s, t, y):
    kl = F.kl_div(F.log_softmax(s / TEMPERATURE, 1), F.log_softmax(t / TEMPERATURE, 1), reduction="batchmean",
                  log_target=True)
    return TEMPERATURE ** 2 * kl


CASES = {
    "kd_loss": (lambda s, t, y: agkd_ops.kd_loss(s, t, y, temperature=TEMPERATURE, kd_weight=KD_WEIGHT),
                _composed_kd_loss),
    "kd_kl_div": (lambda s, t, y: agkd_ops.kd_kl_div(s, t, temperature=TEMPERATURE), _composed_kd_kl_div),
}


def run(device="cpu", repeats=15, shapes=SHAPES):
    agkd_ops.set_backend("native")
    rows = []
    for name, (ours, composed) in CASES.items():
        for n, k in shapes:
            g = torch.Generator().manual_seed(0)
            s = (3 * torch.randn(n, k, generator=g)).to(device).requires_grad_(True)
            t = (3 * torch.randn(n, k, generator=g)).to(device)
            y = torch.randint(0, k, (n,), generator=g).to(device)

            def forward():
                with torch.no_grad():
                    ours(s, t, y)

            def forward_backward(fn=ours):
                s.grad = None
                fn(s, t, y).backward()

            steps = {"forward": forward, "forward_backward": forward_backward,
                     "composed": lambda: forward_backward(composed)}
            med = {key: 1e3 * t for key, t in alternating_medians(steps, device, repeats).items()}
            rows.append({"loss": name, "shape": f"{n}x{k}", "forward_ms": med["forward"],
                         "forward_backward_ms": med["forward_backward"], "composed_ms": med["composed"],
                         "backward_factor": med["forward_backward"] / med["forward"],
                         "vs_composed": med["composed"] / med["forward_backward"]})
    return rows


def main(argv=None):
    parser = results_parser(__doc__)
    parser.add_argument("--shapes", default=None, metavar="NxK,...",
                        help=f"logit shapes (default: {','.join(f'{n}x{k}' for n, k in SHAPES)})")
    args = parser.parse_args(argv)
    shapes = SHAPES if args.shapes is None else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    rows = run(args.device, args.repeats, shapes)
    machine = machine_name(args.device)
    lines = [f"# Backward cost of the logit losses ({args.device})", "",
             f"float32 logits 3·N(0, 1), τ = {TEMPERATURE:g}, kd_weight {KD_WEIGHT:g}; median of {args.repeats} "
             f"alternating rounds; machine: {machine}; torch {torch.__version__}. Command: "
             f"`python -m benchmarks.backward_cost --device {args.device}`. The forward writes the gradient "
             f"when the logits require grad; the backward hands it over.", "",
             "| loss | shape | forward, no_grad (ms) | forward + backward (ms) | ratio | torch composition, "
             "forward + backward (ms) | composition / ours |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['loss']} | {r['shape']} | {r['forward_ms']:.2f} | {r['forward_backward_ms']:.2f} | "
                     f"{r['backward_factor']:.2f} | {r['composed_ms']:.2f} | {r['vs_composed']:.2f}× |")
    write_results(args.out, f"backward_cost_{args.device}", lines, {"machine": machine, "rows": rows})


if __name__ == "__main__":
    main()
