"""agkd_models: the hybrid VGG + ViT teacher, the EfficientNet student, attention-map
extraction, the distillers (logit KD, attention-guided KD, cross-architecture KD) and the
review's metrics, built on :mod:`agkd_ops`; the data sets and the teacher cache; the
training engine, on one process or many. Models come from timm by name with
``pretrained=False`` by default; nothing downloads unless asked to.

The subpackages, lowest layer first (a layer imports only from those before it):
``settings`` (how a configuration section is declared and checked), ``models`` (networks),
``engine`` (task interface, trainer and its settings, checkpoints, DDP), ``distillers``
(methods, their settings and their registry), ``data`` (data sets, teacher cache),
``config`` (the whole configuration), ``experiments`` (pipeline, comparisons, reports), ``cli``.
"""
from .entry import missing_train_extra

try:
    from .data import AugmentedDataset, CachedTeacherDataset, CachedTeacherOutput, ReplayableAugment, TeacherCache
    from .data import TeacherCacheError, write_teacher_cache
    from .distillers import (AGKD, ATTENTION_LOSSES, CAKD, METHODS, AGKDSettings, CAKDSettings, Distiller, GLProjector,
                             LogitKD, LogitKDSettings, MultiViewDiscriminator, MultiViewGenerator, PCAProjector,
                             build_task, pca_loss)
    from .engine import SupervisedTask, Task, TaskOutput, Trainer
    from .experiments.metrics import (count_parameters, distillation_factor, probability_correlation, relative_error,
                                      teacher_student_kl, topk_accuracy, transferability)
    from .models import (HybridTeacher, Student, StudentOutput, TeacherOutput, ViTAttentionRecorder, attention_rollout,
                         cls_attention, combine_attention, create_timm_model, minmax_normalize)
except ModuleNotFoundError as _missing:  # the train extra is not installed
    if not missing_train_extra(_missing):
        raise
    _MISSING = _missing.name

    def __getattr__(name: str):
        raise ModuleNotFoundError(f"agkd_models.{name} needs the 'train' extra ({_MISSING} is not installed): "
                                  f"pip install --no-build-isolation 'agkd[train]'")

__all__ = [
    "HybridTeacher", "TeacherOutput", "Student", "StudentOutput", "create_timm_model",
    "Distiller", "LogitKD", "AGKD", "CAKD", "LogitKDSettings", "AGKDSettings", "CAKDSettings",
    "ATTENTION_LOSSES", "METHODS", "build_task",
    "PCAProjector", "GLProjector", "MultiViewGenerator", "MultiViewDiscriminator", "pca_loss",
    "Task", "TaskOutput", "SupervisedTask", "Trainer",
    "ViTAttentionRecorder", "cls_attention", "attention_rollout", "combine_attention", "minmax_normalize",
    "topk_accuracy", "relative_error", "distillation_factor", "count_parameters",
    "teacher_student_kl", "probability_correlation", "transferability",
    "AugmentedDataset", "ReplayableAugment", "TeacherCache", "TeacherCacheError", "CachedTeacherDataset",
    "CachedTeacherOutput", "write_teacher_cache",
]
