"""agkd_models: the hybrid VGG + ViT teacher, the EfficientNet student, attention-map
extraction, the distillers (logit KD, attention-guided KD, cross-architecture KD) and the
review's metrics, built on :mod:`agkd_ops`; replayable augmentation and the teacher cache
(:mod:`.data`, :mod:`.cache`); the trainer runs on one process or many (:mod:`.trainer`). Models come from timm by name with
``pretrained=False`` by default; nothing downloads unless asked to."""
from .attention import (ViTAttentionRecorder, attention_rollout, cls_attention, combine_attention,
                        minmax_normalize)
from .cache import CachedTeacherDataset, CachedTeacherOutput, TeacherCache, TeacherCacheError, write_teacher_cache
from .cakd import CAKD, GLProjector, MultiViewDiscriminator, MultiViewGenerator, PCAProjector, pca_loss
from .data import AugmentedDataset, ReplayableAugment
from .distill import AGKD, ATTENTION_LOSSES, Distiller, LogitKD
from .metrics import (count_parameters, distillation_factor, probability_correlation, relative_error,
                      teacher_student_kl, topk_accuracy, transferability)
from .student import Student, StudentOutput
from .teacher import HybridTeacher, TeacherOutput, create_timm_model

__all__ = [
    "HybridTeacher", "TeacherOutput", "Student", "StudentOutput", "create_timm_model",
    "Distiller", "LogitKD", "AGKD", "CAKD", "ATTENTION_LOSSES",
    "PCAProjector", "GLProjector", "MultiViewGenerator", "MultiViewDiscriminator", "pca_loss",
    "ViTAttentionRecorder", "cls_attention", "attention_rollout", "combine_attention", "minmax_normalize",
    "topk_accuracy", "relative_error", "distillation_factor", "count_parameters",
    "teacher_student_kl", "probability_correlation", "transferability",
    "AugmentedDataset", "ReplayableAugment", "TeacherCache", "TeacherCacheError", "CachedTeacherDataset",
    "CachedTeacherOutput", "write_teacher_cache",
]
