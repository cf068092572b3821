"""Our kernels next to the peers a GPU user would otherwise take, on the same device and
shapes, when the peers are importable: fused-ssim (or fussim) for SSIM, Liger-Kernel for the
KL divergence and the cross-entropy.

    python -m benchmarks.peers [--device cuda] [--repeats 20] [--out DIR] [--small]

Like with like: fused-ssim differentiates its first image only and is float32-only with
an 11-tap σ = 1.5 window and zero ("same") padding, so ours runs the same window, padding
and dtype with only the first map requiring grad. Liger's KL divergence takes
log-probabilities and probabilities, so the softmaxes it needs are part of its time. A
peer that is not installed is listed as absent. Writes ``peers_<device>.md`` and ``.json``.
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

import agkd_ops

from .tables import timed, write_results


def _fused_ssim():
    for module in ("fused_ssim", "fussim"):
        try:
            return __import__(module).fused_ssim
        except (ImportError, AttributeError):
            continue
    return None


def _liger():
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerKLDIVLoss
    except ImportError:
        return None
    return LigerKLDIVLoss, LigerCrossEntropyLoss


def cases(device: str, small: bool = False):
    """(name, shape, ours, peer or None, peer name) with ``ours``/``peer`` one forward + backward."""
    g = torch.Generator().manual_seed(0)
    image, (n, k) = ((2, 3, 16, 16), (8, 100)) if small else ((32, 3, 256, 256), (8192, 32000))
    x = torch.rand(*image, generator=g).to(device).requires_grad_()
    y = torch.rand(*image, generator=g).to(device)
    s = (3 * torch.randn(n, k, generator=g)).to(device).requires_grad_()
    t = (3 * torch.randn(n, k, generator=g)).to(device)
    target = torch.randint(0, k, (n,), generator=g).to(device)
    image_label, logit_label = "x".join(map(str, image)), f"{n}x{k}"

    def grad_of(loss_fn, leaf):
        def step():
            leaf.grad = None
            loss_fn().backward()
        return step

    ours_ssim = grad_of(lambda: agkd_ops.ssim_loss(x, y, window_size=11, sigma=1.5, padding="zeros"), x)
    fused_ssim = _fused_ssim()
    peer_ssim = grad_of(lambda: 1 - fused_ssim(x, y, padding="same"), x) if fused_ssim else None
    liger = _liger()
    ours_kl = grad_of(lambda: agkd_ops.kd_kl_div(s, t, temperature=1.0), s)
    ours_ce = grad_of(lambda: agkd_ops.kd_loss(s, t, target, kd_weight=0.0), s)
    peer_kl = peer_ce = None
    if liger:
        kl, ce = liger[0](reduction="batchmean"), liger[1]()
        peer_kl = grad_of(lambda: kl(F.log_softmax(s, 1), F.softmax(t, 1)), s)
        peer_ce = grad_of(lambda: ce(s, target), s)
    return [("SSIM loss, 11 taps, grad of x only", image_label, ours_ssim, peer_ssim, "fused-ssim"),
            ("KL divergence", logit_label, ours_kl, peer_kl, "Liger LigerKLDIVLoss"),
            ("cross-entropy", logit_label, ours_ce, peer_ce, "Liger LigerCrossEntropyLoss")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--small", action="store_true", help="tiny shapes (a check that the script runs)")
    args = parser.parse_args(argv)
    agkd_ops.set_backend("native")
    rows = []
    for name, shape, ours, peer, peer_name in cases(args.device, args.small):
        def median(step):
            for _ in range(3):
                step()
            return 1e3 * statistics.median(timed(step, args.device) for _ in range(args.repeats))
        ours_ms = median(ours)
        peer_ms = median(peer) if peer is not None else None
        rows.append({"case": name, "shape": shape, "ours_ms": ours_ms, "peer": peer_name, "peer_ms": peer_ms})
    machine = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    lines = [f"# agkd_ops next to its peers ({args.device})", "",
             f"Forward + backward, float32, median of {args.repeats}; {machine}; torch {torch.__version__}. "
             f"Command: `python -m benchmarks.peers --device {args.device}`.", "",
             "| case | shape | ours (ms) | peer | peer (ms) | peer / ours |", "|---|---|---:|---|---:|---:|"]
    for r in rows:
        if r["peer_ms"] is None:
            lines.append(f"| {r['case']} | {r['shape']} | {r['ours_ms']:.3f} | {r['peer']}: absent | — | — |")
        else:
            lines.append(f"| {r['case']} | {r['shape']} | {r['ours_ms']:.3f} | {r['peer']} | {r['peer_ms']:.3f} | "
                         f"{r['peer_ms'] / r['ours_ms']:.2f}× |")
    write_results(args.out, f"peers_{args.device}", lines, {"machine": machine, "rows": rows})


if __name__ == "__main__":
    main()
