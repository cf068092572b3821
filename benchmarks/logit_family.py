"""The logit-KD family against the compositions its authors ship, forward + backward.

    python -m benchmarks.logit_family [--device cpu] [--repeats 15] [--memory] [--out benchmarks/results]

Each case times our fused op (native backend) and the plain PyTorch composition of the
method's authors (as they write it: mdistiller's DKD with its masks, DIST's Pearson
relations, the logit-standardization normalize + KD, TTM's power-transformed teacher, MLKD's
instance term over five temperatures, CTKD's KL with a temperature tensor, OFA's loss),
alternately in one run, and reports medians and the ratio. Writes
``logit_family_<device>.md`` and ``.json``. The same cases run under pytest-benchmark in
``benchmarks/test_bench_logit_family.py``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

import agkd_ops

from .tables import machine_name, write_results

SHAPES = [(128, 100), (256, 1000), (4096, 1000)]


def _kl(log_p_s, p_t):
    return F.kl_div(log_p_s, p_t, reduction="none").sum(1).mean()


def composed_dkd(s, t, y, alpha=1.0, beta=8.0, tau=4.0):
    gt = torch.zeros_like(s).scatter_(1, y.unsqueeze(1), 1).bool()
    other = ~gt
    ps, pt = F.softmax(s / tau, 1), F.softmax(t / tau, 1)
    cat = lambda p: torch.cat([(p * gt).sum(1, keepdim=True), (p * other).sum(1, keepdim=True)], 1)  # noqa: E731
    tckd = F.kl_div(torch.log(cat(ps)), cat(pt), reduction="sum") * tau**2 / s.shape[0]
    nckd = F.kl_div(F.log_softmax(s / tau - 1000.0 * gt, 1), F.softmax(t / tau - 1000.0 * gt, 1),
                    reduction="sum") * tau**2 / s.shape[0]
    return alpha * tckd + beta * nckd


def composed_dist(s, t, beta=1.0, gamma=1.0, tau=1.0):
    def pearson(a, b):
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-8)
    ys, yt = (s / tau).softmax(1), (t / tau).softmax(1)
    return tau**2 * (beta * (1 - pearson(ys, yt).mean()) + gamma * (1 - pearson(ys.t(), yt.t()).mean()))


def composed_lskd(s, t, tau=2.0):
    def normalize(z):
        return (z - z.mean(-1, keepdim=True)) / (1e-7 + z.std(-1, keepdim=True))
    return _kl(F.log_softmax(normalize(s) / tau, 1), F.softmax(normalize(t) / tau, 1)) * tau**2


def composed_ttm(s, t, gamma=0.2):
    pt = F.softmax(t, 1).pow(gamma)
    return F.kl_div(F.log_softmax(s, 1), pt / pt.sum(1, keepdim=True), reduction="batchmean")


MLKD_TEMPERATURES = (2.0, 3.0, 4.0, 5.0, 6.0)


def composed_mlkd(s, t):
    return sum(_kl(F.log_softmax(s / tau, 1), F.softmax(t / tau, 1)) * tau**2 for tau in MLKD_TEMPERATURES)


def composed_ctkd(s, t, tau):
    return F.kl_div(F.log_softmax(s / tau, 1), F.softmax(t / tau, 1), reduction="batchmean") * tau * tau


def composed_ofa(s, t, y, eps=1.5, tau=1.0):
    m = F.one_hot(y, s.shape[1]).to(s.dtype)
    prod = (F.softmax(t / tau, 1) + m) ** eps
    return torch.sum(-(prod - m) * torch.log(F.softmax(s / tau, 1)), dim=-1).mean()


def cases():
    """(name, ours, theirs): each takes (student, teacher, target, tau) and returns a loss."""
    return [
        ("dkd_loss", lambda s, t, y, c: agkd_ops.dkd_loss(s, t, y), lambda s, t, y, c: composed_dkd(s, t, y)),
        ("dist_loss", lambda s, t, y, c: agkd_ops.dist_loss(s, t), lambda s, t, y, c: composed_dist(s, t)),
        ("lskd (standardize)", lambda s, t, y, c: agkd_ops.kd_kl_div(s, t, temperature=2.0, standardize=True),
         lambda s, t, y, c: composed_lskd(s, t)),
        ("ttm (teacher_temperature)", lambda s, t, y, c: agkd_ops.kd_kl_div(s, t, temperature=1.0,
                                                                           teacher_temperature=5.0),
         lambda s, t, y, c: composed_ttm(s, t)),
        ("mlkd (5 temperatures)", lambda s, t, y, c: agkd_ops.kd_kl_div(s, t, temperature=MLKD_TEMPERATURES),
         lambda s, t, y, c: composed_mlkd(s, t)),
        ("ctkd (learnable τ)", lambda s, t, y, c: agkd_ops.kd_kl_div(s, t, temperature=c),
         lambda s, t, y, c: composed_ctkd(s, t, c)),
        ("ofa_loss", lambda s, t, y, c: agkd_ops.ofa_loss(s, t, y, eps=1.5), lambda s, t, y, c: composed_ofa(s, t, y)),
    ]


def make_inputs(shape, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, k = shape
    s = (3 * torch.randn(n, k, generator=g)).to(device).requires_grad_()
    t = (3 * torch.randn(n, k, generator=g)).to(device)
    y = torch.randint(0, k, (n,), generator=g).to(device)
    tau = torch.tensor(4.0, device=device, requires_grad=True)
    return s, t, y, tau


def step(fn, s, t, y, tau):
    """One forward + backward; the gradients are cleared so that none accumulates."""
    s.grad = None
    tau.grad = None
    fn(s, t, y, tau).backward()


def _time(fn, args, device):
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step(fn, *args)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run(device="cpu", repeats=15, shapes=SHAPES):
    agkd_ops.set_backend("native")
    rows = []
    for name, ours, theirs in cases():
        for shape in shapes:
            args = make_inputs(shape, device)
            for _ in range(2):  # warm-up
                step(ours, *args), step(theirs, *args)
            ours_t, theirs_t = [], []
            for _ in range(repeats):  # alternately, so both see the same machine state
                ours_t.append(_time(ours, args, device))
                theirs_t.append(_time(theirs, args, device))
            o, c = statistics.median(ours_t), statistics.median(theirs_t)
            rows.append({"loss": name, "shape": f"{shape[0]}x{shape[1]}", "fused_ms": 1e3 * o,
                         "composed_ms": 1e3 * c, "ratio": c / o})
    return rows


def peak_extra_bytes(case: int, implementation: str, shape) -> int:
    """Peak extra host memory of one forward + backward of one case, in a fresh process:
    the growth of its resident-set high-water mark (VmHWM: per address space, so not the
    parent's, which getrusage's maxrss would carry over a fork) over a warm-up call at a
    tiny size."""
    import subprocess
    import sys
    code = (
        "import torch, agkd_ops\n"
        "def hwm():\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith('VmHWM:'):\n"
        "            return int(line.split()[1]) * 1024\n"
        "from benchmarks.logit_family import cases, make_inputs, step\n"
        f"name, ours, theirs = cases()[{case}]\n"
        f"fn = ours if {implementation!r} == 'fused' else theirs\n"
        "agkd_ops.set_backend('native')\n"
        "step(fn, *make_inputs((4, 10), 'cpu'))\n"
        f"args = make_inputs({tuple(shape)!r}, 'cpu')\n"
        "before = hwm()\n"
        "step(fn, *args)\n"
        "print(hwm() - before)\n")
    # A fixed mmap threshold: large blocks come from mmap and go back when freed, so the
    # resident-set peak is the step's own (glibc otherwise raises the threshold after the
    # first free and serves later blocks from a heap that stays resident).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env)
    return int(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--memory", action="store_true",
                        help="also measure the peak extra host memory at 4096x1000 (CPU only)")
    parser.add_argument("--shapes", default=None, metavar="NxK,...",
                        help=f"logit shapes (default: {','.join(f'{n}x{k}' for n, k in SHAPES)})")
    args = parser.parse_args(argv)
    shapes = SHAPES if args.shapes is None else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    rows = run(args.device, args.repeats, shapes)
    if args.memory and args.device == "cpu":
        for index, (name, _ours, _theirs) in enumerate(cases()):
            fused, composed = (peak_extra_bytes(index, impl, (4096, 1000)) for impl in ("fused", "composed"))
            for r in rows:
                if r["loss"] == name and r["shape"] == "4096x1000":
                    r["fused_peak_mb"], r["composed_peak_mb"] = fused / 2**20, composed / 2**20
    machine = machine_name(args.device)
    lines = [f"# The logit-KD family against its authors' compositions ({args.device})", "",
             f"Forward + backward, float32, median of {args.repeats} alternating runs; machine: {machine}; "
             f"torch {torch.__version__}. Command: `python -m benchmarks.logit_family --device {args.device}"
             f"{' --memory' if args.memory else ''}`.", "",
             "| loss | shape | fused (ms) | composition (ms) | composition / fused |", "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['loss']} | {r['shape']} | {r['fused_ms']:.3f} | {r['composed_ms']:.3f} | {r['ratio']:.2f}× |")
    peaks = [r for r in rows if "fused_peak_mb" in r]
    if peaks:
        lines += ["", "Peak extra host memory of one forward + backward at 4096x1000 (growth of the "
                  "resident-set high-water mark in a fresh process; the inputs are 15.6 MiB each):", "",
                  "| loss | fused (MiB) | composition (MiB) | fused / composition |", "|---|---:|---:|---:|"]
        for r in peaks:
            share = r["fused_peak_mb"] / r["composed_peak_mb"] if r["composed_peak_mb"] else float("nan")
            lines.append(f"| {r['loss']} | {r['fused_peak_mb']:.1f} | {r['composed_peak_mb']:.1f} | {share:.2f} |")
    write_results(args.out, f"logit_family_{args.device}", lines, {"machine": machine, "rows": rows})


if __name__ == "__main__":
    main()
