"""One training loop for teacher training and distillation.

A *task* is a module whose ``forward(images, targets)`` returns named loss terms with
``"total"`` and leaves the logits it produced in ``last_logits``; the trainer optimises
``task.trainable_parameters()``. Every epoch ends with validation, a line in
``metrics.jsonl`` / ``metrics.csv`` and an atomic checkpoint (temp file + rename) holding
the task's trainable state, optimizer, scheduler, RNG states and history, loadable with
``torch.load(weights_only=True)``. ``resume=True`` continues from it and, on the CPU,
reaches the same final metrics as an uninterrupted run with the same seed. A non-finite
loss stops the run with a clear error and leaves the last good checkpoint in place.
"""
from __future__ import annotations

import csv
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

__all__ = ["Trainer", "TeacherTask", "NonFiniteLossError", "seed_everything", "limit", "evaluate_logits",
           "resolve_device"]

CHECKPOINT = "checkpoint.pt"


class NonFiniteLossError(RuntimeError):
    pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def limit(dataset: Dataset, count: Optional[int], seed: int) -> Dataset:
    """A fixed random subset of ``count`` samples (all when None)."""
    if count is None or count >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count]
    return Subset(dataset, order.tolist())


class TeacherTask(nn.Module):
    """Supervised training of a model whose output has ``.logits`` (or is the logits)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.last_logits: Optional[torch.Tensor] = None

    def trainable_parameters(self):
        return self.model.parameters()

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        out = self.model(images)
        logits = getattr(out, "logits", out)
        self.last_logits = logits.detach()
        ce = F.cross_entropy(logits, targets)
        return {"ce": ce, "total": ce}


def _rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0], "python_gauss": random.getstate()[2],
             "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
             "numpy_has_gauss": int(np_state[3]), "numpy_gauss": float(np_state[4])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _trainable_state(task: nn.Module) -> Dict[str, torch.Tensor]:
    # A frozen teacher is rebuilt from its own checkpoint, not stored in every one.
    return {k: v for k, v in task.state_dict().items() if not k.startswith("teacher.")}


def atomic_save(obj: Any, path: Path) -> None:
    """Write to a temporary file beside ``path``, flush it to disk, then rename over it:
    a crash leaves either the old file or the new one, never a truncated one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@torch.no_grad()
def evaluate_logits(model_fn, loader: DataLoader, device: torch.device):
    """All logits and targets of a loader under ``model_fn`` (eval mode is the caller's)."""
    logits, targets = [], []
    for images, labels in loader:
        out = model_fn(images.to(device))
        logits.append(getattr(out, "logits", out).float().cpu())
        targets.append(labels)
    return torch.cat(logits), torch.cat(targets)


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 128
    optimizer: str = "adam"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    scheduler: str = "cosine"
    step_size: int = 10
    gamma: float = 0.1
    grad_clip: Optional[float] = 5.0
    num_workers: int = 0
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class Trainer:
    def __init__(self, task: nn.Module, config: TrainConfig, out_dir: Path, *,
                 evaluate_model: Optional[nn.Module] = None):
        self.task, self.config, self.out_dir = task, config, Path(out_dir)
        self.device = resolve_device(config.device)
        self.task.to(self.device)
        # What validation runs: the trained model itself (the student when distilling).
        self.evaluate_model = evaluate_model if evaluate_model is not None else task
        params = [p for p in task.trainable_parameters() if p.requires_grad]
        if config.optimizer == "adam":
            self.optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
        elif config.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                                             weight_decay=config.weight_decay)
        else:
            raise ValueError(f"train.optimizer must be 'adam' or 'sgd', got {config.optimizer!r}")
        if config.scheduler == "cosine":
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=max(1, config.epochs))
        elif config.scheduler == "step":
            self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, config.step_size, config.gamma)
        else:
            raise ValueError(f"train.scheduler must be 'cosine' or 'step', got {config.scheduler!r}")
        self.history: List[Dict[str, float]] = []
        self.start_epoch = 0

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT

    def save_checkpoint(self, epoch: int) -> None:
        atomic_save({"epoch": epoch, "task": _trainable_state(self.task),
                     "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "extra_optimizers": self._extra_optimizer_states(), "rng": _rng_state(),
                     "history": self.history}, self.checkpoint_path)

    def _extra_optimizers(self):
        opt = getattr(self.task, "discriminator_optimizer", None)
        return [opt] if opt is not None else []

    def _extra_optimizer_states(self):
        return [opt.state_dict() for opt in self._extra_optimizers()]

    def load_checkpoint(self) -> None:
        state = torch.load(self.checkpoint_path, map_location=self.device, weights_only=True)
        missing, unexpected = self.task.load_state_dict(state["task"], strict=False)
        missing = [k for k in missing if not k.startswith("teacher.")]
        if missing or unexpected:
            raise RuntimeError(f"checkpoint {self.checkpoint_path} does not match this task: "
                               f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for opt, opt_state in zip(self._extra_optimizers(), state["extra_optimizers"]):
            opt.load_state_dict(opt_state)
        _set_rng_state(state["rng"])
        self.history = list(state["history"])
        self.start_epoch = int(state["epoch"]) + 1

    # ------------------------------------------------------------------- the loop
    def _loader(self, dataset: Dataset, shuffle: bool, epoch: int) -> DataLoader:
        generator = torch.Generator().manual_seed(self.config.seed * 1000003 + epoch)
        return DataLoader(dataset, batch_size=self.config.batch_size, shuffle=shuffle, generator=generator,
                          num_workers=self.config.num_workers, drop_last=False)

    def _validate(self, val_set: Dataset) -> Dict[str, float]:
        self.evaluate_model.eval()
        logits, targets = evaluate_logits(self.evaluate_model, self._loader(val_set, False, 0), self.device)
        return {"val_loss": F.cross_entropy(logits, targets).item(),
                "val_acc": (logits.argmax(1) == targets).float().mean().item()}

    def fit(self, train_set: Dataset, val_set: Dataset, *, resume: bool = False) -> List[Dict[str, float]]:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume and self.checkpoint_path.exists():
            self.load_checkpoint()
        else:
            seed_everything(self.config.seed)
        for epoch in range(self.start_epoch, self.config.epochs):
            record = self._train_epoch(train_set, epoch)
            record.update(self._validate(val_set))
            record.update(epoch=epoch, lr=self.optimizer.param_groups[0]["lr"])
            self.scheduler.step()
            self.history.append(record)
            self._log(record)
            self.save_checkpoint(epoch)
        return self.history

    def _train_epoch(self, train_set: Dataset, epoch: int) -> Dict[str, float]:
        self.task.train()
        sums: Dict[str, float] = {}
        seen = correct = 0
        start = time.time()
        batches = self._loader(train_set, True, epoch)
        if self.config.progress:
            from tqdm import tqdm
            batches = tqdm(batches, desc=f"epoch {epoch + 1}/{self.config.epochs}", leave=False)
        for images, targets in batches:
            images, targets = images.to(self.device), targets.to(self.device)
            terms = self.task(images, targets)
            total = terms["total"]
            if not torch.isfinite(total):
                raise NonFiniteLossError(
                    f"non-finite loss ({total.item()}) in epoch {epoch + 1}; terms "
                    f"{ {k: float(v.detach()) for k, v in terms.items()} }; the last good checkpoint "
                    f"({self.checkpoint_path if self.checkpoint_path.exists() else 'none yet'}) is kept")
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
            if self.config.grad_clip:
                nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                         self.config.grad_clip)
            self.optimizer.step()
            n = len(targets)
            seen += n
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) * n
            logits = self.task.last_logits
            correct += int((logits.argmax(1) == targets).sum())
            if self.config.progress:
                batches.set_postfix(loss=f"{sums['total'] / seen:.4f}", acc=f"{correct / seen:.3f}")
        record = {f"train_{k}" if k != "total" else "train_loss": v / seen for k, v in sums.items()}
        record.update(train_acc=correct / seen, epoch_seconds=time.time() - start)
        return record

    def _log(self, record: Dict[str, float]) -> None:
        # Rewritten from the history each epoch, so the logs always match the checkpoint.
        with open(self.out_dir / "metrics.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.history)
        keys = sorted({k for r in self.history for k in r})
        with open(self.out_dir / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.history)
        if self.config.progress:
            print(f"epoch {record['epoch'] + 1}: train loss {record['train_loss']:.4f} acc {record['train_acc']:.3f}"
                  f" | val loss {record['val_loss']:.4f} acc {record['val_acc']:.3f}", flush=True)
