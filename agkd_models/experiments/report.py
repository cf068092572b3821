"""Run reports: the AGKD paper's Table I columns (train/val loss and accuracy of teacher
and students), the KD review's metrics (relative error, distillation factor,
teacher–student KL, correlation), parameter counts, FLOPs and measured latency, in
Markdown, plus training curves as PNG."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn

from .metrics import count_parameters, probability_correlation, relative_error, teacher_student_kl

__all__ = ["model_costs", "comparison_metrics", "write_report", "plot_curves"]


@torch.no_grad()
def model_costs(model: nn.Module, image_size: int, device: torch.device, *, repeats: int = 30,
                warmup: int = 5, min_seconds: float = 0.5) -> Dict[str, float]:
    """Parameters, forward FLOPs for one image (torch.utils.flop_counter) and the latency of
    a batch-1 forward on ``device``: ``warmup`` untimed calls (oneDNN/cuDNN pick and cache
    their kernels on the first ones), then at least ``repeats`` timed calls and at least
    ``min_seconds`` of them; the median and the interquartile range, with the thread count
    they ran on. Every model in a report is measured by this one function."""
    from torch.utils.flop_counter import FlopCounterMode
    model.eval()
    x = torch.randn(1, 3, image_size, image_size, device=device)
    with FlopCounterMode(display=False) as counter:
        model(x)

    def timed() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(warmup):
        timed()
    times: List[float] = []
    while len(times) < repeats or sum(times) < min_seconds:
        times.append(timed())
    q1, median, q3 = (float(v) for v in torch.tensor(times).quantile(torch.tensor([0.25, 0.5, 0.75]), 
                                                                     interpolation="midpoint"))
    return {"params": count_parameters(model), "gflops": counter.get_total_flops() / 1e9,
            "latency_ms": 1e3 * median, "latency_iqr_ms": 1e3 * (q3 - q1), "latency_repeats": len(times),
            "threads": torch.get_num_threads() if device.type == "cpu" else None, "device": str(device)}


def comparison_metrics(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       targets: torch.Tensor, teacher_params: int, student_params: int) -> Dict[str, float]:
    """The review's student-vs-teacher metrics on one evaluation set."""
    student_error = 1 - (student_logits.argmax(1) == targets).float().mean().item()
    teacher_error = 1 - (teacher_logits.argmax(1) == targets).float().mean().item()
    return {"relative_error": relative_error(student_error, teacher_error),
            "distillation_factor": teacher_params / student_params,
            "kl": teacher_student_kl(student_logits, teacher_logits),
            "correlation": probability_correlation(student_logits, teacher_logits)}


def _fmt(value, digits=4):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def write_report(path: Path, title: str, runs: Dict[str, Dict], notes: Optional[List[str]] = None) -> None:
    """``runs``: name -> {"history": [...], "costs": {...}, "compare": {...} (students)}."""
    lines = [f"# {title}", ""]
    lines += ["## Table I: final epoch", "",
              "| model | train loss | val loss | train acc | val acc | epochs |", "|---|---:|---:|---:|---:|---:|"]
    for name, run in runs.items():
        last = run["history"][-1]
        lines.append(f"| {name} | {_fmt(last['train_loss'])} | {_fmt(last['val_loss'])} | "
                     f"{_fmt(last['train_acc'])} | {_fmt(last['val_acc'])} | {len(run['history'])} |")
    students = {n: r for n, r in runs.items() if r.get("compare")}
    if students:
        lines += ["", "## Students against the teacher (test set)", "",
                  "| student | relative error E_s/E_t | distillation factor P_t/P_s | KL(teacher ‖ student) | correlation |",
                  "|---|---:|---:|---:|---:|"]
        for name, run in students.items():
            c = run["compare"]
            lines.append(f"| {name} | {_fmt(c['relative_error'], 3)} | {_fmt(c['distillation_factor'], 1)} | "
                         f"{_fmt(c['kl'])} | {_fmt(c['correlation'])} |")
    costs = {n: r["costs"] for n, r in runs.items() if r.get("costs")}
    if costs:
        lines += ["", "## Cost (batch 1)", "", "| model | parameters | GFLOPs | latency ms (median) | IQR ms | repeats |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, c in costs.items():
            lines.append(f"| {name} | {c['params']:,} | {c['gflops']:.3f} | {c['latency_ms']:.2f} | "
                         f"{c.get('latency_iqr_ms', float('nan')):.2f} | {c.get('latency_repeats', '')} |")
        first = next(iter(costs.values()))
        where = first.get("device", "")
        if first.get("threads"):
            where += f", {first['threads']} threads"
        lines += ["", f"Latency: one image, after 5 untimed warm-up calls, median of at least 30 timed calls "
                      f"({where}); every model measured the same way."]
    if notes:
        lines += ["", *notes]
    path.write_text("\n".join(lines) + "\n")


def plot_curves(path: Path, histories: Dict[str, List[Dict[str, float]]]) -> None:
    """Validation cross-entropy and accuracy of every model on shared axes (comparable
    across methods), then each model's own training objective on a panel of its own (a KD
    objective and a plain cross-entropy are different quantities)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    n = len(histories)
    fig = plt.figure(figsize=(11, 7.5))
    grid = fig.add_gridspec(2, max(n, 2))
    half = max(n, 2) // 2
    val_ax = fig.add_subplot(grid[0, :half])
    acc_ax = fig.add_subplot(grid[0, half:])
    for i, (name, history) in enumerate(histories.items()):
        epochs = [r["epoch"] + 1 for r in history]
        color = f"C{i % 10}"
        val_ax.plot(epochs, [r["val_loss"] for r in history], marker="o", color=color, label=name)
        acc_ax.plot(epochs, [r["val_acc"] for r in history], marker="o", color=color, label=f"{name} val")
        acc_ax.plot(epochs, [r["train_acc"] for r in history], "--", color=color, label=f"{name} train")
        own = fig.add_subplot(grid[1, i])
        own.plot(epochs, [r["train_loss"] for r in history], marker="o", color=color)
        own.set_title(f"{name}\ntraining objective", fontsize=8)
        own.set_xlabel("epoch", fontsize=8)
        own.tick_params(labelsize=7)
        own.xaxis.set_major_locator(MaxNLocator(integer=True))
    val_ax.set_ylabel("validation cross-entropy")
    acc_ax.set_ylabel("accuracy")
    for ax in (val_ax, acc_ax):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
