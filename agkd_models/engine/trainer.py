"""One training loop for teacher training and distillation, on one process or many.

What it trains is a :class:`~.task.Task`: ``forward`` returns the loss terms and the
logits, ``trainable_parameters()`` is what the main optimizer updates, and a task with
optimisation steps of its own declares them (``extra_optimizers``, ``extra_step``). Every epoch ends with validation, a line in
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

import csv
import io
import json
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from . import distributed
from .amp import autocast
from .checkpoint import (CheckpointError, atomic_write_text, previous_path, read_checkpoint, read_newest_checkpoint,
                         save_rotating, signals_deferred)
from .evaluation import classification_metrics, evaluate_logits
from .progress import progress_bar
from .run_folder import remove_stale_temporaries
from .rng import rng_state, seed_everything, set_rng_state
from .task import Task, TaskOutput
from .train_config import TrainConfig

__all__ = ["Trainer", "TrainConfig", "NonFiniteLossError"]

CHECKPOINT = "checkpoint.pt"


class NonFiniteLossError(RuntimeError):
    pass


def _frozen(task: Task, key: str) -> bool:
    """Whether a state key belongs to one of the task's frozen modules (a distiller's
    teacher), which are rebuilt from their own files, not stored in every checkpoint."""
    return key.startswith(tuple(f"{name}." for name in task.frozen_modules))


def _trainable_state(task: Task) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in task.state_dict().items() if not _frozen(task, k)}


def _set_epoch(dataset: Dataset, epoch: int) -> None:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)


def _batch_mixer(config: TrainConfig, num_classes: Optional[int]):
    """timm's Mixup for train.mixup / train.cutmix (None when both are off). Its targets
    are mixed one-hot rows without smoothing: the losses apply train.label_smoothing to
    them themselves, as F.cross_entropy does to probability targets."""
    if not (config.mixup > 0 or config.cutmix > 0):
        return None
    if num_classes is None:
        raise ValueError("train.mixup / train.cutmix need the number of classes (Trainer(num_classes=...))")
    from timm.data import Mixup
    return Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, prob=config.mixup_prob,
                 label_smoothing=0.0, num_classes=num_classes)


@contextmanager
def _batchnorm_eval_if_single(module: nn.Module, batch_size: int):
    """BatchNorm layers of ``module`` in eval mode for a batch of one sample (see
    ``Trainer._step``); their modes are restored afterwards."""
    if batch_size != 1:
        yield
        return
    switched = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    for m in switched:
        m.eval()
    try:
        yield
    finally:
        for m in switched:
            m.train()


class Trainer:
    """Trains ``task`` with ``config`` (the ``train`` section of a configuration), writing
    logs and checkpoints to ``out_dir``; validation runs ``task.inference_model()`` (the
    student when distilling)."""

    def __init__(self, task: Task, config: TrainConfig, out_dir: Path, *, num_classes: Optional[int] = None,
                 run_record: Optional[Dict[str, Any]] = None):
        self.task, self.config, self.out_dir = task, config, Path(out_dir)
        self.run_record = run_record  # what the run was made from, kept in every checkpoint (resume checks it)
        if task.label_smoothing != config.label_smoothing:
            raise ValueError(f"Trainer: the task was built with label_smoothing={task.label_smoothing}, but "
                             f"train.label_smoothing is {config.label_smoothing}: build it with the trainer's value")
        self.mixup = _batch_mixer(config, num_classes)
        self.world, self.device = distributed.setup(config.device)
        autocast(self.device, config.amp)  # validates the mode early
        if config.batch_size % self.world.size:
            raise ValueError(f"train.batch_size={config.batch_size} is the global batch and must be divisible "
                             f"by the {self.world.size} processes")
        self.evaluate_model = task.inference_model()
        self.kept_models = task.kept_models()  # validated beside it
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
        else:  # "sgd": TrainConfig admits no other
            self.optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                                             weight_decay=config.weight_decay)
        self.scheduler = self._scheduler(config)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.amp == "fp16")
        self.model: nn.Module = task
        if self.world.distributed:
            ignored = distributed.ddp_ignored_names(task)
            for name, tensor in task.state_dict(keep_vars=True).items():
                if name in ignored and getattr(tensor, "requires_grad", False):
                    torch.distributed.broadcast(tensor.data, 0)  # self-synced modules start alike
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(task, ignored)
            self.model = DistributedDataParallel(
                task, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=task.ddp_find_unused_parameters)
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
        rng = distributed.gather_objects(rng_state())  # every rank's, so resume is exact per rank
        if not self.world.is_main:
            return
        state = {"epoch": epoch, "task": _trainable_state(self.task),
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict(),
                 "extra_optimizers": [opt.state_dict() for opt in self.task.extra_optimizers()],
                 "rng": rng, "world_size": self.world.size, "history": self.history}
        if self.run_record is not None:
            state["run"] = self.run_record
        try:
            save_rotating(state, self.checkpoint_path)
        except OSError as exc:  # a full disk or a lost mount: the previous checkpoint is intact
            kept = [p.name for p in (self.checkpoint_path, previous_path(self.checkpoint_path)) if p.exists()]
            raise CheckpointError(f"could not write the checkpoint of epoch {epoch + 1} to {self.out_dir} "
                                  f"({exc.strerror or exc}); {' and '.join(kept) or 'no checkpoint'} kept, "
                                  f"--resume continues from there") from None

    def load_checkpoint(self, state: Optional[Dict[str, Any]] = None) -> None:
        if state is None:
            state = read_checkpoint(self.checkpoint_path)
        missing, unexpected = self.task.load_state_dict(state["task"], strict=False)
        # Frozen modules are not in checkpoints; an older checkpoint may hold some.
        missing = [k for k in missing if not _frozen(self.task, k)]
        unexpected = [k for k in unexpected if not _frozen(self.task, k)]
        if missing or unexpected:
            raise CheckpointError(f"checkpoint {self.checkpoint_path} was written by another model or method "
                                  f"({len(missing)} weights missing, e.g. {missing[:2]}, {len(unexpected)} "
                                  f"unexpected, e.g. {unexpected[:2]}); use another --out to start a new run")
        self.optimizer.load_state_dict(state["optimizer"])
        self._replay_schedule(int(state["epoch"]) + 1)
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        for opt, opt_state in zip(self.task.extra_optimizers(), state["extra_optimizers"]):
            opt.load_state_dict(opt_state)
        rng = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
        self.start_epoch = int(state["epoch"]) + 1
        if len(rng) == self.world.size:
            set_rng_state({k: (v.cpu() if torch.is_tensor(v) else v) for k, v in rng[self.world.rank].items()})
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
        record = self._validate_model(self.evaluate_model, val_set)
        for name, model in self.kept_models.items():
            record.update({f"{key}_{name}": value for key, value in self._validate_model(model, val_set).items()})
        return record

    def _validate_model(self, model: nn.Module, val_set: Dataset) -> Dict[str, float]:
        distributed.average_buffers(model)
        model.eval()
        # Each rank takes every world-size-th sample: the whole set, each sample once.
        shard = Subset(val_set, range(self.world.rank, len(val_set), self.world.size))
        logits, targets = evaluate_logits(model, self._loader(shard, shuffle=False, epoch=0, shard=False),
                                          self.device, amp=self.config.amp, channels_last=self.config.channels_last)
        local = classification_metrics(logits, targets)
        loss_sum, correct, count = distributed.all_reduce_sums(
            [local["loss_sum"], local["correct"], local["count"]], self.device)
        return {"val_loss": loss_sum / count, "val_acc": correct / count}

    def read_resume_state(self) -> Optional[Dict[str, Any]]:
        """The newest checkpoint to resume from, or None where there is none."""
        return read_newest_checkpoint(self.checkpoint_path, warn=self.world.is_main)

    def fit(self, train_set: Dataset, val_set: Dataset, *, resume: bool = False,
            state: Optional[Dict[str, Any]] = None) -> List[Dict[str, float]]:
        """Trains to ``config.epochs``; with ``resume``, from the newest checkpoint (or
        ``state``, one the caller has read and checked already)."""
        if self.world.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.out_dir)
        if resume and state is None:
            state = self.read_resume_state()
        if state is not None:
            self.load_checkpoint(state)
        else:
            seed_everything(self.config.seed + self.world.rank)
        for epoch in range(self.start_epoch, self.config.epochs):
            record = self._train_epoch(train_set, epoch)
            record.update(self._validate(val_set))
            record.update(epoch=epoch, lr=self.optimizer.param_groups[0]["lr"])
            with signals_deferred():  # the epoch's log and checkpoint are written whole, or not at all
                self.scheduler.step()
                self.history.append(record)
                try:
                    self.save_checkpoint(epoch)
                except CheckpointError:
                    self.history.pop()  # the logs list only epochs a checkpoint holds
                    raise
                self._log(record)
        return self.history

    def _step(self, batch, epoch: int) -> TaskOutput:
        # BatchNorm cannot normalise one sample by its own statistics (the last batch of a
        # data set one larger than a multiple of the batch, or batch_size=1): such a batch
        # trains with BatchNorm in eval mode, normalised by the running statistics, which it
        # leaves unchanged. Every rank has the same per-rank batch size, so all agree.
        with _batchnorm_eval_if_single(self.task, len(batch[1])):
            return self._train_step(batch, epoch)

    def _train_step(self, batch, epoch: int) -> TaskOutput:
        images, targets, *extra = batch
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        # timm mixes a batch with its reverse, so it needs an even batch; an odd last batch
        # trains on its class targets.
        if self.mixup is not None and len(images) % 2 == 0:
            images, targets = self.mixup(images, targets)
        if self.config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        kwargs = {"teacher_out": extra[0].to(self.device)} if extra else {}
        with autocast(self.device, self.config.amp):
            output: TaskOutput = self.model(images, targets, **kwargs)
        terms = output.terms
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
        extra = self.task.extra_step(output)  # the task's own steps, outside DDP and autocast
        return output._replace(terms={**terms, **extra}) if extra else output

    def _train_epoch(self, train_set: Dataset, epoch: int) -> Dict[str, float]:
        self.task.train()
        _set_epoch(train_set, epoch)
        sums: Dict[str, float] = {}
        seen = correct = 0
        start = time.time()
        batches = self._loader(train_set, shuffle=True, epoch=epoch, shard=True)
        self.task.start_epoch(epoch, len(batches))
        bar = (progress_bar(batches, f"epoch {epoch + 1}/{self.config.epochs}")
               if self.config.progress and self.world.is_main else None)
        for batch in bar if bar is not None else batches:
            output = self._step(batch, epoch)
            targets = batch[1]
            n = len(targets)
            seen += n
            for k, v in output.terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) * n
            correct += int((output.logits.argmax(1).cpu() == targets).sum())
            if bar is not None:
                bar.set_postfix(loss=f"{sums['total'] / seen:.4f}", acc=f"{correct / seen:.3f}")
        keys = sorted(sums)
        seen, correct, *totals = distributed.all_reduce_sums([seen, correct] + [sums[k] for k in keys], self.device)
        record = {f"train_{k}" if k != "total" else "train_loss": v / seen for k, v in zip(keys, totals)}
        record.update(train_acc=correct / seen, epoch_seconds=time.time() - start)
        return record

    def _log(self, record: Dict[str, float]) -> None:
        if not self.world.is_main:
            return
        # Rewritten from the history each epoch (after the checkpoint), so the logs always
        # match the checkpoint; each file whole or not at all.
        try:
            atomic_write_text(self.out_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.history))
            keys = sorted({k for r in self.history for k in r})
            table = io.StringIO()
            writer = csv.DictWriter(table, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.history)
            atomic_write_text(self.out_dir / "metrics.csv", table.getvalue())
        except OSError as exc:
            raise CheckpointError(f"could not write the metrics of epoch {record['epoch'] + 1} to {self.out_dir} "
                                  f"({exc.strerror or exc}); the epoch's checkpoint is saved, --resume continues "
                                  f"from it and writes them") from None
        if self.config.progress:
            print(f"epoch {record['epoch'] + 1}: train loss {record['train_loss']:.4f} acc {record['train_acc']:.3f}"
                  f" | val loss {record['val_loss']:.4f} acc {record['val_acc']:.3f}", flush=True)
