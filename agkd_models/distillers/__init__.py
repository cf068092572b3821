"""The distillation methods, and the registry from a method's name to its class and its
settings class.

``build_task(method, teacher, student, settings)`` is how the pipeline turns a
configuration into what the trainer trains; ``METHODS[name]`` says what a method needs.
Adding a method is one file (its :class:`Distiller` and its settings class) and one entry
here; the configuration gains the section of its settings by itself (docs/design.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Type

from torch import nn

from ..engine.task import SupervisedTask, Task
from ..settings import Settings
from .agkd import AGKD, ATTENTION_LOSSES, AGKDSettings
from .base import Distiller, ModelFacts
from .cakd import (CAKD, PCA_ATTENTION, VIEW_TERMS, CAKDSettings, GLProjector, MultiViewDiscriminator,
                   MultiViewGenerator, PCAProjector, check_cakd_settings, match_teacher_grid, pca_loss)
from .logit import LogitKD, LogitKDSettings

__all__ = ["Distiller", "ModelFacts", "LogitKD", "AGKD", "CAKD", "LogitKDSettings", "AGKDSettings", "CAKDSettings",
           "ATTENTION_LOSSES", "Method", "METHODS", "build_task",
           "PCAProjector", "GLProjector", "MultiViewGenerator", "MultiViewDiscriminator", "pca_loss",
           "match_teacher_grid", "PCA_ATTENTION", "VIEW_TERMS"]


@dataclass(frozen=True)
class Method:
    """A distillation method: how to build its task from the teacher, the student and its
    settings (an object of ``settings``, the configuration section named after the method;
    None for a method without settings), whether a teacher cache (logits and attention
    maps written ahead) can stand in for the online teacher, its name in reports, and the
    setting (if any) whose every choice ``agkd compare`` runs as a variant of its own
    (``agkd-mse``, ``agkd-ssim``, ...), and the checks of its settings against the models
    (``check(settings, facts)``, called by every command before any work: a ConfigError
    naming the setting)."""
    build: Callable[..., Task]
    settings: Optional[Type[Settings]]
    cacheable: bool
    label: str
    variants: Optional[str] = None
    check: Optional[Callable[[Settings, ModelFacts], None]] = None


def _student_alone(teacher: nn.Module, student: nn.Module, settings: None = None, *,
                   label_smoothing: float = 0.0) -> Task:
    return SupervisedTask(student, label_smoothing=label_smoothing)


METHODS: Dict[str, Method] = {
    "none": Method(_student_alone, None, cacheable=False, label="no KD"),  # the student on the labels alone
    "logit": Method(LogitKD, LogitKDSettings, cacheable=True, label="logit KD"),
    "agkd": Method(AGKD, AGKDSettings, cacheable=True, label="AGKD", variants="attention_loss"),
    "cakd": Method(CAKD, CAKDSettings, cacheable=False, label="CAKD", check=check_cakd_settings),
}


def build_task(method: str, teacher: nn.Module, student: nn.Module, settings: Optional[Settings] = None, *,
               label_smoothing: float = 0.0) -> Task:
    """The task of ``method`` with its settings (default: the method's defaults) and the
    label smoothing of its cross-entropy terms (``train.label_smoothing``)."""
    try:
        m = METHODS[method]
    except KeyError:
        raise ValueError(f"unknown distillation method {method!r}; choose one of {', '.join(METHODS)}") from None
    return m.build(teacher, student, settings, label_smoothing=label_smoothing)
