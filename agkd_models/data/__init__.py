"""Data: the data sets with their fixed splits and replayable augmentation, and the
teacher cache (the teacher's outputs written ahead, replayed in training)."""
from .cache import CachedTeacherDataset, CachedTeacherOutput, TeacherCache, TeacherCacheError, write_teacher_cache
from .datasets import DATASETS, AugmentedDataset, DataError, ReplayableAugment, build_datasets

__all__ = ["DATASETS", "AugmentedDataset", "ReplayableAugment", "DataError", "build_datasets",
           "TeacherCache", "TeacherCacheError", "CachedTeacherDataset", "CachedTeacherOutput", "write_teacher_cache"]
