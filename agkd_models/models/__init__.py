"""The networks: the hybrid CNN + ViT teacher, the student, and attention-map extraction."""
from .attention import (ViTAttentionRecorder, attention_rollout, cls_attention, combine_attention,
                        minmax_normalize)
from .student import Student, StudentOutput, StudentTeacher, StudentTeacherOutput
from .teacher import HybridTeacher, TeacherOutput, create_timm_model

__all__ = ["HybridTeacher", "TeacherOutput", "Student", "StudentOutput", "StudentTeacher",
           "StudentTeacherOutput", "create_timm_model",
           "ViTAttentionRecorder", "cls_attention", "attention_rollout", "combine_attention", "minmax_normalize"]
