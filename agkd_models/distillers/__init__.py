"""The distillation methods, and the registry from a method's name to its class and its
settings class.

``build_task(method, teacher, student, settings)`` is how the pipeline turns a
configuration into what the trainer trains; ``METHODS[name]`` says what a method needs.
Adding a method is one file (its :class:`Distiller` and its settings class) and one entry
here; the configuration gains the section of its settings by itself (docs/design.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional, Tuple, Type

from torch import nn

from ..engine.task import SupervisedTask, Task
from ..settings import Settings
from .agkd import AGKD, ATTENTION_LOSSES, AGKDSettings
from .base import Distiller, ModelFacts
from .cakd import (CAKD, PCA_ATTENTION, VIEW_TERMS, CAKDSettings, GLProjector, MultiViewDiscriminator,
                   MultiViewGenerator, PCAProjector, check_cakd_settings, match_teacher_grid, pca_loss)
from .ctkd import CTKD, CTKDSettings
from .dist import DIST, DISTSettings
from .dkd import DKD, DKDSettings
from .dml import DMLSettings, MutualLearning, check_dml_settings
from .fitnet import FitNet, FitNetSettings, check_fitnet_settings
from .logit import LogitKD, LogitKDSettings
from .lskd import LSKD, LSKDSettings, check_lskd_settings
from .ofa import OFA, OFASettings, check_ofa_settings
from .rkd import RKD, RKDSettings
from .ttm import TTM, TTMSettings
from .wttm import WTTM, WTTMSettings

__all__ = ["Distiller", "ModelFacts", "LogitKD", "AGKD", "CAKD", "LogitKDSettings", "AGKDSettings", "CAKDSettings",
           "DKD", "DKDSettings", "DIST", "DISTSettings", "LSKD", "LSKDSettings", "TTM", "TTMSettings", "WTTM",
           "WTTMSettings", "CTKD", "CTKDSettings", "OFA", "OFASettings", "FitNet", "FitNetSettings", "RKD",
           "RKDSettings", "MutualLearning", "DMLSettings",
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
    (``agkd-mse``, ``agkd-ssim``, ...), the checks of its settings against the models
    (``check(settings, facts)``, called by every command before any work: a ConfigError
    naming the setting), and the other methods' sections its loss is built from
    (``reads(settings)``, e.g. AGKD's logit term ``agkd.logit_loss=dkd`` reads ``dkd``):
    ``build`` then receives them as ``sections``, and a comparison counts them in a run's
    identity; and whether it runs the teacher at all (``reads_teacher``: not ``none``, not
    DML), so that any teacher, several combined among them, serves it."""
    build: Callable[..., Task]
    settings: Optional[Type[Settings]]
    cacheable: bool
    label: str
    variants: Optional[str] = None
    check: Optional[Callable[[Settings, ModelFacts], None]] = None
    reads: Optional[Callable[[Settings], Tuple[str, ...]]] = None
    reads_teacher: bool = True  # False: the method never runs the teacher (a teacher's kind is no matter)

    def sections_read(self, settings: Optional[Settings]) -> Tuple[str, ...]:
        return self.reads(settings) if self.reads is not None and settings is not None else ()


def _student_alone(teacher: nn.Module, student: nn.Module, settings: None = None, *,
                   label_smoothing: float = 0.0) -> Task:
    return SupervisedTask(student, label_smoothing=label_smoothing)


METHODS: Dict[str, Method] = {
    "none": Method(_student_alone, None, cacheable=False, label="no KD", reads_teacher=False),  # the student on the labels alone
    "logit": Method(LogitKD, LogitKDSettings, cacheable=True, label="logit KD"),
    "agkd": Method(AGKD, AGKDSettings, cacheable=True, label="AGKD", variants="attention_loss",
                   reads=lambda s: () if s.logit_loss == "kd" else (s.logit_loss,)),
    "cakd": Method(CAKD, CAKDSettings, cacheable=False, label="CAKD", check=check_cakd_settings),
    "dkd": Method(DKD, DKDSettings, cacheable=True, label="DKD"),
    "dist": Method(DIST, DISTSettings, cacheable=True, label="DIST"),
    "lskd": Method(LSKD, LSKDSettings, cacheable=True, label="logit-standardized KD", check=check_lskd_settings),
    "ttm": Method(TTM, TTMSettings, cacheable=True, label="TTM"),
    "wttm": Method(WTTM, WTTMSettings, cacheable=True, label="WTTM"),
    "ctkd": Method(CTKD, CTKDSettings, cacheable=True, label="CTKD"),
    "ofa": Method(OFA, OFASettings, cacheable=True, label="OFA", check=check_ofa_settings),  # branches read the student
    "fitnet": Method(FitNet, FitNetSettings, cacheable=False, label="FitNets", check=check_fitnet_settings),
    "rkd": Method(RKD, RKDSettings, cacheable=False, label="RKD"),
    "dml": Method(MutualLearning, DMLSettings, cacheable=False, label="DML", check=check_dml_settings,
                  reads_teacher=False),
}


def build_task(method: str, teacher: nn.Module, student: nn.Module, settings: Optional[Settings] = None, *,
               label_smoothing: float = 0.0, sections: Optional[Mapping[str, Settings]] = None) -> Task:
    """The task of ``method`` with its settings (default: the method's defaults), the label
    smoothing of its cross-entropy terms (``train.label_smoothing``) and, for a method that
    builds on other methods' sections (``Method.reads``), those sections (from
    ``sections``; their defaults where absent)."""
    try:
        m = METHODS[method]
    except KeyError:
        raise ValueError(f"unknown distillation method {method!r}; choose one of {', '.join(METHODS)}") from None
    if m.reads is None:
        return m.build(teacher, student, settings, label_smoothing=label_smoothing)
    read = m.sections_read(settings if settings is not None else m.settings())
    given = sections or {}
    return m.build(teacher, student, settings, label_smoothing=label_smoothing,
                   sections={name: given.get(name) or METHODS[name].settings() for name in read})
