"""The training engine: the task interface, the loop, checkpoints, evaluation, mixed
precision, random state and multi-process helpers. It knows nothing of particular models,
distillers or data sets."""
from .amp import AMP_MODES, autocast
from .checkpoint import CheckpointError
from .distributed import resolve_device
from .evaluation import classification_metrics, evaluate_logits
from .rng import seed_everything
from .task import SupervisedTask, Task, TaskOutput
from .trainer import NonFiniteLossError, TrainConfig, Trainer

__all__ = ["Task", "TaskOutput", "SupervisedTask", "Trainer", "TrainConfig", "NonFiniteLossError", "CheckpointError",
           "AMP_MODES", "autocast", "evaluate_logits", "classification_metrics", "seed_everything",
           "resolve_device"]
