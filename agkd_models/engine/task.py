"""What the trainer asks of whatever it trains: the :class:`Task` interface, all of it.

- ``forward(images, targets, teacher_out=None)`` returns a :class:`TaskOutput`: the named
  loss terms (``"total"`` is what the main optimizer minimises; every term is logged) and
  the logits of the model being trained, for the accuracy.
- ``trainable_parameters()``: what the main optimizer updates.
- ``inference_model()``: the model that is validated each epoch and kept afterwards.
- ``kept_models()``: other models trained alongside and kept too, by name (DML's other
  peers): each is validated every epoch (``val_acc_<name>``, ``val_loss_<name>`` in the
  history) and saved by the run as ``<name>.pt``.
- ``frozen_modules``: submodules that are never trained and are rebuilt from their own
  files (a distiller's teacher); checkpoints leave them out.
- ``enable_compile(model=True, loss=True)``: the trainer's ``compile`` option.
- ``start_epoch(epoch, batches)``: heard at each training epoch's start, by tasks whose
  loss follows a schedule.
- ``extra_optimizers()`` and ``extra_step(output)``: optimisation steps of the task's own
  (CAKD's discriminator), taken by the trainer after each main step, outside the forward
  pass and outside DistributedDataParallel; the optimizers are saved in checkpoints.
- Anything else a task must carry across a resume goes in its ``state_dict`` (an
  ``nn.Module``'s ``get_extra_state`` for plain values).
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

    # Label smoothing of the task's cross-entropy terms, given when the task is built (the
    # trainer checks that it is its train.label_smoothing). ``targets`` are class indices
    # (N,), or probabilities (N, K) when the trainer mixes batches (mixup / cutmix).
    label_smoothing: float = 0.0

    # Submodule names whose gradients the task averages itself (DDP must ignore them), and
    # whether some parameters may go unused in a step (DDP then looks for them).
    ddp_self_synced: Tuple[str, ...] = ()
    ddp_find_unused_parameters: bool = False

    # Submodules never trained (their parameters do not require grad) and rebuilt from
    # their own files: checkpoints leave them out.
    frozen_modules: Tuple[str, ...] = ()

    def forward(self, images: torch.Tensor, targets: torch.Tensor,
                teacher_out=None) -> TaskOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """What the main optimizer updates."""
        raise NotImplementedError

    def inference_model(self) -> nn.Module:
        """The model validated after each epoch and kept when training ends."""
        raise NotImplementedError

    def kept_models(self) -> Dict[str, nn.Module]:
        """Other trained models kept beside :meth:`inference_model`, by name (see the module
        docstring); none by default."""
        return {}

    def enable_compile(self, *, model: bool = True, loss: bool = True) -> None:
        """``torch.compile`` the trained model (``model``) and the loss path (``loss``), where
        the task has one worth compiling apart (the trainer's ``compile`` option)."""

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

    def __init__(self, model: nn.Module, *, label_smoothing: float = 0.0):
        super().__init__()
        self.model, self.label_smoothing = model, float(label_smoothing)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return self.model.parameters()

    def inference_model(self) -> nn.Module:
        return self.model

    def enable_compile(self, *, model: bool = True, loss: bool = True) -> None:
        if model:
            self.model.compile()  # the loss is one cross-entropy: nothing to compile apart

    def forward(self, images: torch.Tensor, targets: torch.Tensor, teacher_out=None) -> TaskOutput:
        out = self.model(images)
        logits = getattr(out, "logits", out)
        ce = F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing)
        return TaskOutput({"ce": ce, "total": ce}, logits.detach())
