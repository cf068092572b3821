"""One training loop for teacher training and distillation, on one process or many.

A *task* is a module whose ``forward(images, targets)`` returns named loss terms with
``"total"`` and leaves the logits it produced in ``last_logits``; the trainer optimises
``task.trainable_parameters()``. Every epoch ends with validation, a line in
``metrics.jsonl`` / ``metrics.csv`` and an atomic checkpoint (see :mod:`.checkpoint`: the
one it replaces is kept as ``checkpoint.prev.pt`` and used when the newest is damaged) holding
the task's trainable state, optimizer, scheduler, gradient scaler, every rank's RNG
states and history, loadable with ``torch.load(weights_only=True)``. ``resume=True``
continues from it and, on the CPU, reaches the same final metrics as an uninterrupted run
with the same seed. A non-finite loss stops the run with a clear error and leaves the
last good checkpoint in place.

Under ``torchrun`` (see :mod:`.distributed`) the task is wrapped in
``DistributedDataParallel``, each rank draws its shard with a ``DistributedSampler``
reseeded every epoch, ``train.batch_size`` is the *global* batch (split evenly over the
ranks, so results do not depend on how many processes share it), training and
validation metrics are summed over all ranks (validation covers the whole validation
set, each sample once), and only rank 0 writes files or prints.

Options: ``amp`` (``"bf16"`` or ``"fp16"`` autocast; fp16 uses a ``GradScaler``),
``channels_last``, ``compile`` (``torch.compile`` of the model and, for distillers, of the
loss path with ``fullgraph=True``) and ``sync_bn`` (``SyncBatchNorm`` across GPU ranks).
"""
from __future__ import annotations

import contextlib
import csv
import json
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torch.nn.parallel import DistributedDataParallel

from . import distributed
from .checkpoint import CheckpointError, previous_path, read_checkpoint, save_rotating
from .config import AMP_MODES, TrainConfig
from .distributed import resolve_device

__all__ = ["Trainer", "TeacherTask", "TrainConfig", "NonFiniteLossError", "seed_everything",
           "evaluate_logits", "classification_metrics", "resolve_device", "autocast", "AMP_MODES"]

CHECKPOINT = "checkpoint.pt"


class NonFiniteLossError(RuntimeError):
    pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast(device: torch.device, amp: str):
    """The autocast context of ``amp`` (``"off"``, ``"bf16"``, ``"fp16"``) on ``device``."""
    if amp not in AMP_MODES:
        raise ValueError(f"train.amp must be one of {', '.join(AMP_MODES)}, got {amp!r}")
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


class TeacherTask(nn.Module):
    """Supervised training of a model whose output has ``.logits`` (or is the logits)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.last_logits: Optional[torch.Tensor] = None

    def trainable_parameters(self):
        return self.model.parameters()

    def enable_compile(self) -> None:
        self.model.compile()

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        out = self.model(images)
        logits = getattr(out, "logits", out)
        self.last_logits = logits.detach()
        ce = F.cross_entropy(logits.float(), targets)
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


@torch.no_grad()
def evaluate_logits(model_fn, loader: DataLoader, device: torch.device, *, amp: str = "off",
                    channels_last: bool = False):
    """All logits (float32, CPU) and targets of a loader under ``model_fn`` (eval mode is
    the caller's)."""
    logits, targets = [], []
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            out = model_fn(images)
        logits.append(getattr(out, "logits", out).float().cpu())
        targets.append(labels)
    return torch.cat(logits), torch.cat(targets)


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor) -> Dict[str, float]:
    """Summed cross-entropy (float64), correct predictions and count: what ranks add up."""
    return {"loss_sum": F.cross_entropy(logits.double(), targets, reduction="sum").item(),
            "correct": int((logits.argmax(1) == targets).sum()), "count": len(targets)}


def _set_epoch(dataset: Dataset, epoch: int) -> None:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)


def _ddp_ignored_names(task: nn.Module) -> List[str]:
    """Parameters and buffers DDP must not touch: frozen ones (the teacher, loaded alike on
    every rank) and those a task steps itself (``task.ddp_self_synced``, e.g. CAKD's
    discriminator, which averages its own gradients)."""
    self_synced = tuple(f"{prefix}." for prefix in getattr(task, "ddp_self_synced", ()))
    names = [name for name, p in task.named_parameters(remove_duplicate=False)
             if not p.requires_grad or name.startswith(self_synced)]
    frozen = tuple(f"{name}." for name, module in task.named_children()
                   if not any(p.requires_grad for p in module.parameters()))
    names += [name for name, _ in task.named_buffers(remove_duplicate=False)
              if name.startswith(frozen + self_synced)]
    return names


class Trainer:
    def __init__(self, task: nn.Module, config: TrainConfig, out_dir: Path, *,
                 evaluate_model: Optional[nn.Module] = None):
        self.task, self.config, self.out_dir = task, config, Path(out_dir)
        self.world, self.device = distributed.setup(config.device)
        autocast(self.device, config.amp)  # validates the mode early
        if config.batch_size % self.world.size:
            raise ValueError(f"train.batch_size={config.batch_size} is the global batch and must be divisible "
                             f"by the {self.world.size} processes")
        # What validation runs: the trained model itself (the student when distilling).
        self.evaluate_model = evaluate_model if evaluate_model is not None else task
        if config.sync_bn and self.world.distributed:
            if self.device.type != "cuda":
                raise ValueError("train.sync_bn needs CUDA devices (torch's SyncBatchNorm has no CPU kernel)")
            nn.SyncBatchNorm.convert_sync_batchnorm(task)
        self.task.to(self.device)
        if config.channels_last:
            self.task.to(memory_format=torch.channels_last)
        if config.compile:
            self.task.enable_compile()
        params = [p for p in task.trainable_parameters() if p.requires_grad]
        if config.optimizer == "adam":
            self.optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
        elif config.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                                             weight_decay=config.weight_decay)
        else:
            raise ValueError(f"train.optimizer must be 'adam' or 'sgd', got {config.optimizer!r}")
        self.scheduler = self._scheduler(config)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.amp == "fp16")
        self.model: nn.Module = task
        if self.world.distributed:
            ignored = _ddp_ignored_names(task)
            for name, tensor in task.state_dict(keep_vars=True).items():
                if name in ignored and getattr(tensor, "requires_grad", False):
                    torch.distributed.broadcast(tensor.data, 0)  # self-synced modules start alike
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(task, ignored)
            self.model = DistributedDataParallel(
                task, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=getattr(task, "ddp_find_unused_parameters", False))
        self.history: List[Dict[str, float]] = []
        self.start_epoch = 0

    def _scheduler(self, config: TrainConfig):
        """Per-epoch schedule: ``warmup_epochs`` of linear warm-up (from lr/(w+1) up to lr),
        then cosine annealing over the remaining epochs, or step decay."""
        lr_sched = torch.optim.lr_scheduler
        warmup = min(config.warmup_epochs, config.epochs - 1)
        if config.scheduler == "cosine":
            main = lr_sched.CosineAnnealingLR(self.optimizer, T_max=max(1, config.epochs - warmup))
        else:
            main = lr_sched.StepLR(self.optimizer, config.step_size, config.gamma)
        if warmup <= 0:
            return main
        ramp = lr_sched.LinearLR(self.optimizer, start_factor=1.0 / (warmup + 1), total_iters=warmup)
        return lr_sched.SequentialLR(self.optimizer, [ramp, main], milestones=[warmup])

    def _replay_schedule(self, epochs_done: int) -> None:
        """This run's schedule advanced past ``epochs_done`` epochs. Rebuilt and replayed
        rather than loaded from the checkpoint, so that a run resumed with more epochs or
        another warm-up follows its new schedule (a loaded one would keep the old cosine
        length, or not fit at all) and an unchanged run takes the very same steps."""
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"]
        self.scheduler = self._scheduler(self.config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()"
            for _ in range(epochs_done):
                self.scheduler.step()

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT

    def save_checkpoint(self, epoch: int) -> None:
        rng = distributed.gather_objects(_rng_state())  # every rank's, so resume is exact per rank
        if not self.world.is_main:
            return
        state = {"epoch": epoch, "task": _trainable_state(self.task),
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict(), "extra_optimizers": self._extra_optimizer_states(),
                 "rng": rng, "world_size": self.world.size, "history": self.history}
        try:
            save_rotating(state, self.checkpoint_path)
        except OSError as exc:  # a full disk or a lost mount: the previous checkpoint is intact
            kept = [p.name for p in (self.checkpoint_path, previous_path(self.checkpoint_path)) if p.exists()]
            raise CheckpointError(f"could not write the checkpoint of epoch {epoch + 1} to {self.out_dir} "
                                  f"({exc.strerror or exc}); {' and '.join(kept) or 'no checkpoint'} kept, "
                                  f"--resume continues from there") from None

    def _extra_optimizers(self):
        opt = getattr(self.task, "discriminator_optimizer", None)
        return [opt] if opt is not None else []

    def _extra_optimizer_states(self):
        return [opt.state_dict() for opt in self._extra_optimizers()]

    def _newest_readable_checkpoint(self) -> Optional[Dict[str, Any]]:
        """The newest checkpoint that loads; the previous one where the newest is damaged
        (a crash or a full disk while writing), said on standard error."""
        newest, previous = self.checkpoint_path, previous_path(self.checkpoint_path)
        if not newest.exists() and not previous.exists():
            return None
        try:
            return read_checkpoint(newest)
        except CheckpointError as damaged:
            if not previous.exists():
                raise CheckpointError(f"cannot resume: {damaged}; there is no previous checkpoint "
                                      f"({previous.name}); remove {newest} to start over") from None
            try:
                state = read_checkpoint(previous)
            except CheckpointError as also:
                raise CheckpointError(f"cannot resume: {damaged}; {also}; remove both to start over") from None
            if self.world.is_main:
                print(f"warning: {damaged}; resuming from the previous checkpoint {previous} "
                      f"(epoch {state['epoch'] + 1})", file=sys.stderr, flush=True)
            return state

    def load_checkpoint(self, state: Optional[Dict[str, Any]] = None) -> None:
        if state is None:
            state = read_checkpoint(self.checkpoint_path)
        missing, unexpected = self.task.load_state_dict(state["task"], strict=False)
        missing = [k for k in missing if not k.startswith("teacher.")]
        if missing or unexpected:
            raise CheckpointError(f"checkpoint {self.checkpoint_path} was written by another model or method "
                                  f"({len(missing)} weights missing, e.g. {missing[:2]}, {len(unexpected)} "
                                  f"unexpected, e.g. {unexpected[:2]}); use another --out to start a new run")
        self.optimizer.load_state_dict(state["optimizer"])
        self._replay_schedule(int(state["epoch"]) + 1)
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        for opt, opt_state in zip(self._extra_optimizers(), state["extra_optimizers"]):
            opt.load_state_dict(opt_state)
        rng = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
        self.start_epoch = int(state["epoch"]) + 1
        if len(rng) == self.world.size:
            _set_rng_state({k: (v.cpu() if torch.is_tensor(v) else v) for k, v in rng[self.world.rank].items()})
        else:
            if self.world.is_main:
                warnings.warn(f"{self.checkpoint_path} was written by {len(rng)} process(es), this run has "
                              f"{self.world.size}: training resumes, but not bit-for-bit", stacklevel=2)
            seed_everything(self.config.seed + 1000003 * self.start_epoch + self.world.rank)
        self.history = list(state["history"])

    # ------------------------------------------------------------------- the loop
    def _loader(self, dataset: Dataset, *, shuffle: bool, epoch: int, shard: bool) -> DataLoader:
        sampler, batch_size = None, self.config.batch_size
        if shard and self.world.distributed:
            # Padded to equal shard sizes: every rank must run the same number of steps.
            sampler = DistributedSampler(dataset, num_replicas=self.world.size, rank=self.world.rank,
                                         shuffle=shuffle, seed=self.config.seed)
            sampler.set_epoch(epoch)
            batch_size //= self.world.size
        generator = torch.Generator().manual_seed(self.config.seed * 1000003 + epoch)
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                          generator=generator, num_workers=self.config.num_workers, drop_last=False,
                          pin_memory=self.device.type == "cuda", collate_fn=getattr(dataset, "collate_fn", None))

    def _validate(self, val_set: Dataset) -> Dict[str, float]:
        distributed.average_buffers(self.evaluate_model)
        self.evaluate_model.eval()
        # Each rank takes every world-size-th sample: the whole set, each sample once.
        shard = Subset(val_set, range(self.world.rank, len(val_set), self.world.size))
        logits, targets = evaluate_logits(self.evaluate_model, self._loader(shard, shuffle=False, epoch=0, shard=False),
                                          self.device, amp=self.config.amp, channels_last=self.config.channels_last)
        local = classification_metrics(logits, targets)
        loss_sum, correct, count = distributed.all_reduce_sums(
            [local["loss_sum"], local["correct"], local["count"]], self.device)
        return {"val_loss": loss_sum / count, "val_acc": correct / count}

    def fit(self, train_set: Dataset, val_set: Dataset, *, resume: bool = False) -> List[Dict[str, float]]:
        if self.world.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        state = self._newest_readable_checkpoint() if resume else None
        if state is not None:
            self.load_checkpoint(state)
        else:
            seed_everything(self.config.seed + self.world.rank)
        for epoch in range(self.start_epoch, self.config.epochs):
            record = self._train_epoch(train_set, epoch)
            record.update(self._validate(val_set))
            record.update(epoch=epoch, lr=self.optimizer.param_groups[0]["lr"])
            self.scheduler.step()
            self.history.append(record)
            self._log(record)
            self.save_checkpoint(epoch)
        return self.history

    def _step(self, batch, epoch: int) -> Dict[str, torch.Tensor]:
        images, targets, *extra = batch
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        if self.config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        kwargs = {"teacher_out": extra[0].to(self.device)} if extra else {}
        with autocast(self.device, self.config.amp):
            terms = self.model(images, targets, **kwargs)
        total = terms["total"]
        finite = torch.isfinite(total.detach()).to(torch.float64)
        if self.world.distributed:  # every rank stops together, none waits forever
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if not bool(finite):
            raise NonFiniteLossError(
                f"non-finite loss ({total.item() if not torch.isfinite(total) else 'on another rank'}) in epoch "
                f"{epoch + 1}; terms "
                f"{ {k: float(v.detach()) for k, v in terms.items()} }; the last good checkpoint "
                f"({self.checkpoint_path if self.checkpoint_path.exists() else 'none yet'}) is kept")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.config.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                     self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return terms

    def _train_epoch(self, train_set: Dataset, epoch: int) -> Dict[str, float]:
        self.task.train()
        _set_epoch(train_set, epoch)
        sums: Dict[str, float] = {}
        seen = correct = 0
        start = time.time()
        batches = self._loader(train_set, shuffle=True, epoch=epoch, shard=True)
        show = self.config.progress and self.world.is_main
        if show:
            from tqdm import tqdm
            batches = tqdm(batches, desc=f"epoch {epoch + 1}/{self.config.epochs}", leave=False)
        for batch in batches:
            terms = self._step(batch, epoch)
            targets = batch[1]
            n = len(targets)
            seen += n
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) * n
            correct += int((self.task.last_logits.argmax(1).cpu() == targets).sum())
            if show:
                batches.set_postfix(loss=f"{sums['total'] / seen:.4f}", acc=f"{correct / seen:.3f}")
        keys = sorted(sums)
        seen, correct, *totals = distributed.all_reduce_sums([seen, correct] + [sums[k] for k in keys], self.device)
        record = {f"train_{k}" if k != "total" else "train_loss": v / seen for k, v in zip(keys, totals)}
        record.update(train_acc=correct / seen, epoch_seconds=time.time() - start)
        return record

    def _log(self, record: Dict[str, float]) -> None:
        if not self.world.is_main:
            return
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
