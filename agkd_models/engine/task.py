"""What the trainer asks of whatever it trains: the :class:`Task` interface.

A task is an ``nn.Module`` whose ``forward(images, targets, teacher_out=None)`` returns a
:class:`TaskOutput`: the named loss terms (``"total"`` is what the main optimizer
minimises; every term is logged) and the logits of the model being trained, for the
accuracy. The main optimizer updates ``trainable_parameters()``. A task with optimisation
steps of its own (CAKD's discriminator) declares their optimizers in
``extra_optimizers()`` (saved in and restored from checkpoints) and takes those steps in
``extra_step(output)``, which the trainer calls after each main step, outside the
forward pass and outside DistributedDataParallel. A task whose loss follows a schedule
hears of each training epoch's start in ``start_epoch(epoch, batches)``.
"""
from __future__ import annotations

from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Task", "TaskOutput", "SupervisedTask"]


class TaskOutput(NamedTuple):
    """One training step's result. A NamedTuple, so DistributedDataParallel can walk it."""
    terms: Dict[str, torch.Tensor]   # named loss terms, "total" among them
    logits: torch.Tensor             # the trained model's logits (detached), for accuracy
    extra: Optional[Dict[str, torch.Tensor]] = None  # detached inputs of extra_step


class Task(nn.Module):
    """Base class of everything the trainer trains (see the module docstring)."""

    # Label smoothing of the task's cross-entropy terms; the trainer sets it from its
    # configuration (train.label_smoothing). ``targets`` are class indices (N,), or
    # probabilities (N, K) when the trainer mixes batches (mixup / cutmix).
    label_smoothing: float = 0.0

    # Submodule names whose gradients the task averages itself (DDP must ignore them), and
    # whether some parameters may go unused in a step (DDP then looks for them).
    ddp_self_synced: Tuple[str, ...] = ()
    ddp_find_unused_parameters: bool = False

    def forward(self, images: torch.Tensor, targets: torch.Tensor,
                teacher_out=None) -> TaskOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """What the main optimizer updates."""
        raise NotImplementedError

    def enable_compile(self) -> None:
        """``torch.compile`` what is worth compiling (the trainer's ``compile`` option)."""

    def start_epoch(self, epoch: int, batches: int) -> None:
        """Called by the trainer before each training epoch (``epoch`` from 0, ``batches``
        steps in it), for tasks whose loss follows a schedule; a resumed run calls it too."""

    def extra_optimizers(self) -> List[torch.optim.Optimizer]:
        """Optimizers the task steps itself in :meth:`extra_step`, in a fixed order."""
        return []

    def extra_step(self, output: TaskOutput) -> Dict[str, torch.Tensor]:
        """Optimisation steps of the task's own, after the main step; returns terms to log."""
        return {}


class SupervisedTask(Task):
    """Cross-entropy training of a model whose output has ``.logits`` (or is the logits):
    the teacher's training, and a student trained on the labels alone."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return self.model.parameters()

    def enable_compile(self) -> None:
        self.model.compile()

    def forward(self, images: torch.Tensor, targets: torch.Tensor, teacher_out=None) -> TaskOutput:
        out = self.model(images)
        logits = getattr(out, "logits", out)
        ce = F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing)
        return TaskOutput({"ce": ce, "total": ce}, logits.detach())
