"""Multi-process training through PyTorch's own engine: ``torchrun`` sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`setup` joins the process group (NCCL on GPUs,
gloo on CPUs) and picks this process's device. Without ``torchrun`` everything here is a
no-op for a world of one, so the trainer has a single code path.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List, Sequence

import torch
import torch.distributed as dist

from ..settings import ConfigError

__all__ = ["World", "setup", "world", "resolve_device", "shutdown", "all_reduce_sums", "gather_objects", "average_gradients",
           "average_buffers", "barrier", "ddp_ignored_names"]


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and prints summaries."""
        return self.rank == 0


def world() -> World:
    """The current process's place in the process group (a world of one without it)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return World()


def check_device(name: str) -> None:
    """A ConfigError when ``train.device`` names a device this machine does not have."""
    if name in ("auto", "cpu"):
        return
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"train.device={name!r}, but this machine has no CUDA device (torch "
                              f"{torch.__version__}, CUDA build {torch.version.cuda}); use train.device=cpu or auto")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"train.device={name!r}, but this machine has {count} CUDA device(s) "
                              f"(cuda:0 to cuda:{count - 1})")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError(f"train.device={name!r}, but MPS is not available on this machine; use "
                              f"train.device=cpu or auto")


def resolve_device(name: str) -> torch.device:
    """``"auto"``: CUDA when available, else the CPU; any other name as torch reads it,
    once :func:`check_device` has found it on this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device(name)
    return torch.device(name)


def setup(device: str = "auto") -> tuple[World, torch.device]:
    """Joins the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1) and
    returns this process's world and device: ``cuda:LOCAL_RANK`` when CUDA is used, else
    the CPU. ``device`` is ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (single process)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    check_device(device)
    if size > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        here = world()
        return here, torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return World(), resolve_device(device)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sums(values: Sequence[float], device: torch.device) -> List[float]:
    """Element-wise sums over all ranks (float64), in one collective."""
    if not world().distributed:
        return [float(v) for v in values]
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def gather_objects(obj: Any) -> List[Any]:
    """``obj`` of every rank, in rank order (a list of one without a process group)."""
    here = world()
    if not here.distributed:
        return [obj]
    out: List[Any] = [None] * here.size
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if world().distributed:
        dist.barrier()


def average_gradients(parameters) -> None:
    """Averages ``.grad`` over the ranks, for modules stepped outside DDP."""
    here = world()
    if not here.distributed:
        return
    for p in parameters:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(here.size)


def average_buffers(module: torch.nn.Module) -> None:
    """Makes ``module``'s buffers equal on every rank: floating ones (BatchNorm running
    statistics) become their mean over the ranks, integer ones (batch counters) rank 0's.
    Each rank's statistics saw only its own batches; after this, every rank evaluates and
    rank 0 saves the same model."""
    here = world()
    if not here.distributed:
        return
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer.div_(here.size)
        else:
            dist.broadcast(buffer, 0)


def ddp_ignored_names(task: torch.nn.Module) -> List[str]:
    """Parameters and buffers DistributedDataParallel must not touch: frozen ones (the
    teacher, loaded alike on every rank) and those of the submodules a task syncs itself
    (``task.ddp_self_synced``, e.g. CAKD's discriminator, which averages its own gradients)."""
    self_synced = tuple(f"{prefix}." for prefix in task.ddp_self_synced)
    names = [name for name, p in task.named_parameters(remove_duplicate=False)
             if not p.requires_grad or name.startswith(self_synced)]
    frozen = tuple(f"{name}." for name, module in task.named_children()
                   if not any(p.requires_grad for p in module.parameters()))
    names += [name for name, _ in task.named_buffers(remove_duplicate=False)
              if name.startswith(frozen + self_synced)]
    return names
