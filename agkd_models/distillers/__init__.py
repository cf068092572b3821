"""The distillation methods, and the registry from a method's name to its class and the
``distill`` settings it reads.

``build_task(method, teacher, student, settings)`` is how the pipeline turns a
configuration into what the trainer trains; ``METHODS[name]`` says what a method needs.
Adding a method is one class and one entry here (its settings go in
``agkd_models.config.DistillConfig``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping

from torch import nn

from ..engine.task import SupervisedTask, Task
from .agkd import AGKD, ATTENTION_LOSSES
from .base import Distiller
from .cakd import (CAKD, PCA_ATTENTION, VIEW_TERMS, GLProjector, MultiViewDiscriminator, MultiViewGenerator,
                   PCAProjector, match_teacher_grid, pca_loss)
from .logit import LogitKD

__all__ = ["Distiller", "LogitKD", "AGKD", "CAKD", "ATTENTION_LOSSES", "Method", "METHODS", "build_task",
           "PCAProjector", "GLProjector", "MultiViewGenerator", "MultiViewDiscriminator", "pca_loss",
           "match_teacher_grid", "PCA_ATTENTION", "VIEW_TERMS"]


@dataclass(frozen=True)
class Method:
    """A distillation method: how to build its task, which keyword argument comes from
    which ``distill`` setting, and whether a teacher cache (logits and attention maps
    written ahead) can stand in for the online teacher."""
    build: Callable[..., Task]
    settings: Mapping[str, str]  # constructor keyword -> key in the `distill` section
    cacheable: bool


def _student_alone(teacher: nn.Module, student: nn.Module) -> Task:
    return SupervisedTask(student)


METHODS: Dict[str, Method] = {
    "agkd": Method(AGKD, {k: k for k in ("attention_loss", "alpha", "beta", "temperature", "kd_alpha",
                                         "hybrid_alpha", "hybrid_beta", "window_size", "padding",
                                         "perceptual_layers")}, cacheable=True),
    "logit": Method(LogitKD, {"temperature": "temperature", "alpha": "kd_alpha"}, cacheable=True),
    "cakd": Method(CAKD, {k: k for k in ("projected_stage", "pca_attention", "pca_attention_weight",
                                         "pca_value_weight", "replace_prob", "replace_elementwise", "lam",
                                         "ce_weight", "distill_weight", "ce_only_epochs", "ramp_epochs",
                                         "view_terms", "discriminator_every", "discriminator_lr", "dropout",
                                         "view_prob")}, cacheable=False),
    "none": Method(_student_alone, {}, cacheable=False),  # the student on the labels alone
}


def build_task(method: str, teacher: nn.Module, student: nn.Module, settings: Mapping[str, Any]) -> Task:
    """The task of ``method`` with its keyword arguments taken from ``settings`` (the
    resolved ``distill`` section of a configuration)."""
    try:
        m = METHODS[method]
    except KeyError:
        raise ValueError(f"unknown distillation method {method!r}; choose one of {', '.join(METHODS)}") from None
    return m.build(teacher, student, **{kw: settings[key] for kw, key in m.settings.items()})
