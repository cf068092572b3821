"""The distillers' common part: a frozen teacher, a trainable student, and the loss path
between them. A distiller is a :class:`~agkd_models.engine.task.Task`; a method is written
by giving :meth:`Distiller.loss_terms` (the named loss terms, ``"total"`` among them) and
declaring its settings class (``settings_class``, a :class:`~agkd_models.settings.Settings`
section with every knob's default and meaning).

The teacher is frozen: no parameter requires grad, it stays in ``eval()`` even when the
distiller is put in ``train()`` (no BatchNorm statistics drift, no dropout), and
checkpoints leave it out (it is rebuilt from its own file).
"""
from __future__ import annotations

from typing import ClassVar, Dict, Iterator, Mapping, NamedTuple, Optional, Tuple

import torch
from torch import nn

from ..engine.task import Task, TaskOutput
from ..models.student import StudentOutput
from ..models.teacher import TeacherOutput
from ..settings import Settings

__all__ = ["Distiller", "ModelFacts"]


class ModelFacts(NamedTuple):
    """What a method's settings are checked against before any work (a method's ``check``
    in the registry): the chosen student and how many stages it has."""
    student: str          # the timm name (student.name)
    student_stages: int   # len(student.blocks): stages 0 to student_stages - 1


class Distiller(Task):
    """Holds a frozen teacher and a trainable student; subclasses write :meth:`loss_terms`
    and may name, in ``extra_inputs``, terms that are not losses but the detached inputs of
    their :meth:`~agkd_models.engine.task.Task.extra_step`."""

    settings_class: ClassVar[Optional[type]] = None
    frozen_modules = ("teacher",)
    extra_inputs: ClassVar[Tuple[str, ...]] = ()
    # Whether loss_terms traces whole under torch.compile(fullgraph=True).
    compiles_whole: ClassVar[bool] = True

    def __init__(self, teacher: nn.Module, student: nn.Module, *, label_smoothing: float = 0.0):
        super().__init__()
        self.teacher, self.student = teacher, student
        self.label_smoothing = float(label_smoothing)  # of the method's cross-entropy terms
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()

    def settings_from(self, settings: Optional[Settings], changes: Mapping[str, object]) -> Settings:
        """The distiller's settings: ``settings`` (default: every field at its default)
        with ``changes`` applied, checked like any configuration."""
        cls = self.settings_class
        if settings is None:
            settings = cls()
        elif not isinstance(settings, cls):
            raise TypeError(f"{type(self).__name__}: settings must be a {cls.__name__}, got "
                            f"{type(settings).__name__}")
        return settings.replace(**changes)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # frozen: BatchNorm statistics and dropout stay as they are
        return self

    @torch.no_grad()
    def teacher_outputs(self, images: torch.Tensor) -> TeacherOutput:
        return self.teacher(images)

    def loss_terms(self, s: StudentOutput, t, targets: torch.Tensor, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The loss path: named terms from the student's and teacher's outputs (``t`` is a
        :class:`TeacherOutput` or a cached one with ``logits`` and ``attention``); ``images``
        is the batch the student saw, for methods that look at it again."""
        raise NotImplementedError

    def student_inputs(self, images: torch.Tensor) -> torch.Tensor:
        """What the student's forward pass sees (the batch itself unless a method says)."""
        return images

    def inference_model(self) -> nn.Module:
        return self.student

    def enable_compile(self, *, model: bool = True, loss: bool = True) -> None:
        """``torch.compile`` the student (``model``), and the loss path with
        ``fullgraph=True`` (``loss``; the agkd_ops kernels trace without graph breaks)
        where the method's loss path compiles whole."""
        if model:
            self.student.compile()
        if loss and self.compiles_whole:
            self._compiled_loss_terms = torch.compile(self.loss_terms, fullgraph=True)

    def forward(self, images: torch.Tensor, targets: torch.Tensor,
                teacher_out: Optional[TeacherOutput] = None) -> TaskOutput:
        t = teacher_out if teacher_out is not None else self.teacher_outputs(images)
        s: StudentOutput = self.student(self.student_inputs(images))
        terms = getattr(self, "_compiled_loss_terms", self.loss_terms)(s, t, targets, images)
        extra = {name: terms.pop(name) for name in self.extra_inputs if name in terms}
        return TaskOutput(terms, s.logits.detach(), extra or None)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """What the main optimizer updates."""
        return self.student.parameters()
