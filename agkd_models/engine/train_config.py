"""The ``train`` section of a configuration: what the :class:`~.trainer.Trainer` reads."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

from ..settings import ConfigError, Settings, setting
from .amp import AMP_MODES

__all__ = ["TrainConfig"]


@dataclass
class TrainConfig(Settings, section="train"):
    epochs: int = setting(20, "training epochs (a resumed run may be given more)", minimum=1, resume="more")
    batch_size: int = setting(128, "global batch, split evenly over torchrun's processes", minimum=1)
    optimizer: str = setting("adam", "optimizer", choices=("adam", "sgd"))
    lr: float = setting(0.01, "learning rate", above=0)
    momentum: float = setting(0.9, "SGD momentum", minimum=0, below=1)
    weight_decay: float = setting(0.0, "weight decay", minimum=0)
    scheduler: str = setting("cosine", "learning-rate schedule", choices=("cosine", "step"))
    warmup_epochs: int = setting(0, "epochs of linear learning-rate warm-up before the schedule", minimum=0)
    step_size: int = setting(10, "step schedule: epochs between decays", minimum=1)
    gamma: float = setting(0.1, "step schedule: decay factor", above=0)
    grad_clip: Optional[float] = setting(5.0, "gradient-norm clip (null: none)", above=0)
    label_smoothing: float = setting(0.0, "label smoothing ε of every cross-entropy term, as "
                                     "F.cross_entropy's (the teacher's, the student's, kd_loss's)",
                                     minimum=0, maximum=1)
    mixup: float = setting(0.0, "mixup's Beta(α, α) parameter (timm Mixup); 0: off. Training targets "
                           "become probabilities and the teacher sees the mixed images", minimum=0)
    cutmix: float = setting(0.0, "cutmix's Beta(α, α) parameter (timm Mixup); 0: off", minimum=0)
    mixup_prob: float = setting(1.0, "probability that a batch is mixed (when mixup or cutmix is on; with "
                                "both on, half the mixed batches use each)", minimum=0, maximum=1)
    num_workers: int = setting(0, "data-loader worker processes (augmentation draws do not depend on them)",
                               minimum=0, resume="any")
    seed: int = setting(0, "training seed (NumPy and scikit-learn take seeds below 2**32)", minimum=0,
                        maximum=2**32 - 1)
    device: str = setting("auto", "auto, cpu, cuda or cuda:N (a run resumed on another device agrees to float "
                          "rounding, not bit for bit)", resume="any")
    progress: bool = setting(True, "progress bars and per-epoch lines", resume="any")
    amp: str = setting("off", "autocast precision", choices=AMP_MODES)
    channels_last: bool = setting(False, "channels_last memory format")
    compile: bool = setting(False, "torch.compile the model and the loss path (how the run executes: like the "
                            "device, it may change float rounding, not what is trained)", resume="any")
    sync_bn: bool = setting(False, "SyncBatchNorm across GPU processes")

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "amp" and value in (False, None):
            value = "off"  # YAML reads a bare `off` as false
        if name == "device" and not (isinstance(value, str) and re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value)):
            raise ConfigError(f"train.device: got {value!r}; expected auto, cpu, cuda or cuda:N")
        super().__setattr__(name, value)
