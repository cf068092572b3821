"""The distillers' common part: a frozen teacher, a trainable student, and the loss path
between them. A distiller is a :class:`~agkd_models.engine.task.Task`: ``forward`` returns
the named loss terms (``"total"`` among them, so the trainer logs every term) and the
student's logits.

The teacher is frozen: no parameter requires grad, and it stays in ``eval()`` even when
the distiller is put in ``train()`` (no BatchNorm statistics drift, no dropout). Every
loss goes through the public ``agkd_ops`` API, so the native kernels serve where they are
compiled and the reference elsewhere.
"""
from __future__ import annotations

from typing import Dict, Iterator, Optional

import torch
from torch import nn

from ..engine.task import Task, TaskOutput
from ..models.student import StudentOutput
from ..models.teacher import TeacherOutput

__all__ = ["Distiller"]


class Distiller(Task):
    """Holds a frozen teacher and a trainable student; subclasses write :meth:`loss_terms`."""

    def __init__(self, teacher: nn.Module, student: nn.Module):
        super().__init__()
        self.teacher, self.student = teacher, student
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # frozen: BatchNorm statistics and dropout stay as they are
        return self

    @torch.no_grad()
    def teacher_outputs(self, images: torch.Tensor) -> TeacherOutput:
        return self.teacher(images)

    def loss_terms(self, s: StudentOutput, t, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The loss path: named terms from the student's and teacher's outputs (``t`` is a
        :class:`TeacherOutput` or a cached one with ``logits`` and ``attention``)."""
        raise NotImplementedError

    def enable_compile(self, student: bool = True) -> None:  # type: ignore[override]
        """``torch.compile`` the student (unless ``student=False``), and the loss path with
        ``fullgraph=True`` (the agkd_ops kernels trace without graph breaks)."""
        if student:
            self.student.compile()
        self._compiled_loss_terms = torch.compile(self.loss_terms, fullgraph=True)

    def forward(self, images: torch.Tensor, targets: torch.Tensor,
                teacher_out: Optional[TeacherOutput] = None) -> TaskOutput:
        t = teacher_out if teacher_out is not None else self.teacher_outputs(images)
        s: StudentOutput = self.student(images)
        terms = getattr(self, "_compiled_loss_terms", self.loss_terms)(s, t, targets)
        return TaskOutput(terms, s.logits.detach())

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """What the main optimizer updates."""
        return self.student.parameters()

    def student_state_dict(self) -> Dict[str, torch.Tensor]:
        """What is saved for inference: the student alone."""
        return self.student.state_dict()
