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
def model_costs(model: nn.Module, image_size: int, device: torch.device, repeats: int = 10) -> Dict[str, float]:
    """Parameters, forward FLOPs for one image (torch.utils.flop_counter) and the median
    latency of a batch-1 forward on ``device``."""
    from torch.utils.flop_counter import FlopCounterMode
    model.eval()
    x = torch.randn(1, 3, image_size, image_size, device=device)
    with FlopCounterMode(display=False) as counter:
        model(x)
    times = []
    for _ in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    times = sorted(times[2:])
    return {"params": count_parameters(model), "gflops": counter.get_total_flops() / 1e9,
            "latency_ms": 1e3 * times[len(times) // 2]}


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
        lines += ["", "## Students against the teacher (validation set)", "",
                  "| student | relative error E_s/E_t | distillation factor P_t/P_s | KL(teacher ‖ student) | correlation |",
                  "|---|---:|---:|---:|---:|"]
        for name, run in students.items():
            c = run["compare"]
            lines.append(f"| {name} | {_fmt(c['relative_error'], 3)} | {_fmt(c['distillation_factor'], 1)} | "
                         f"{_fmt(c['kl'])} | {_fmt(c['correlation'])} |")
    costs = {n: r["costs"] for n, r in runs.items() if r.get("costs")}
    if costs:
        lines += ["", "## Cost (batch 1)", "", "| model | parameters | GFLOPs | latency ms |", "|---|---:|---:|---:|"]
        for name, c in costs.items():
            lines.append(f"| {name} | {c['params']:,} | {c['gflops']:.3f} | {c['latency_ms']:.2f} |")
    if notes:
        lines += ["", *notes]
    path.write_text("\n".join(lines) + "\n")


def plot_curves(path: Path, histories: Dict[str, List[Dict[str, float]]]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, history in histories.items():
        epochs = [r["epoch"] + 1 for r in history]
        axes[0].plot(epochs, [r["train_loss"] for r in history], label=f"{name} train")
        axes[0].plot(epochs, [r["val_loss"] for r in history], "--", label=f"{name} val")
        axes[1].plot(epochs, [r["train_acc"] for r in history], label=f"{name} train")
        axes[1].plot(epochs, [r["val_acc"] for r in history], "--", label=f"{name} val")
    for ax, label in zip(axes, ("loss", "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
