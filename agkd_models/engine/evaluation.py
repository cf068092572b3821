"""Running a model over a data set and the metrics that processes add up."""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .amp import autocast

__all__ = ["evaluate_logits", "classification_metrics"]


@torch.no_grad()
def evaluate_logits(model_fn: Callable, loader: DataLoader, device: torch.device, *, amp: str = "off",
                    channels_last: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """All logits (float32, CPU) and targets of a loader under ``model_fn`` (eval mode is
    the caller's)."""
    logits, targets = [], []
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            out = model_fn(images)
        logits.append(getattr(out, "logits", out).float().cpu())
        targets.append(labels)
    return torch.cat(logits), torch.cat(targets)


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor) -> Dict[str, float]:
    """Summed cross-entropy (float64), correct predictions and count: what ranks add up."""
    return {"loss_sum": F.cross_entropy(logits.double(), targets, reduction="sum").item(),
            "correct": int((logits.argmax(1) == targets).sum()), "count": len(targets)}
