"""Files that runs write and read back: training checkpoints (atomic, with the previous one
kept beside the newest) and model weights, with one-line errors that say which file is
wrong and how.

A training checkpoint is replaced in three steps: the new state is written to a temporary
file and flushed to disk, the current checkpoint becomes ``<name>.prev.pt``, then the
temporary file takes the checkpoint's name. A crash or a full disk at any point leaves at
least one complete checkpoint, so a run never loses more than the epoch in progress.
"""
from __future__ import annotations

import errno
import os
import shutil
import signal
import sys
import threading
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from ..settings import unreadable

__all__ = ["CheckpointError", "unreadable", "check_readable", "atomic_save", "atomic_write_text", "save_file",
           "previous_path", "save_rotating", "read_checkpoint",
           "read_newest_checkpoint",
           "read_weights", "load_model_weights", "describe_weights"]

# What every training checkpoint holds (written by Trainer.save_checkpoint).
CHECKPOINT_KEYS = ("epoch", "task", "optimizer", "scheduler", "rng", "history")


class CheckpointError(ValueError):
    """A checkpoint or weights file that is missing, unreadable or holds something else."""


def atomic_save(obj: Any, path: Path) -> None:
    """Write to a temporary file beside ``path``, flush it to disk, then rename over it:
    a crash leaves either the old file or the new one, never a truncated one. A write the
    file system refuses (a full disk) is an OSError naming ``path``, whatever torch.save
    turned it into."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written file behind
        raise
    except RuntimeError as exc:  # torch's zip writer reports a failed write as a RuntimeError
        tmp.unlink(missing_ok=True)
        raise OSError(errno.EIO, _write_failure(path.parent, exc), str(path)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    """``path`` replaced by ``text`` through a temporary file beside it: whole or not at all."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_failure(folder: Path, exc: BaseException) -> str:
    """Why a write into ``folder`` failed, in a few words."""
    try:
        if shutil.disk_usage(folder).free < (1 << 20):
            return os.strerror(errno.ENOSPC)
    except OSError:
        pass
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"write failed: {first[:120]}"


def save_file(obj: Any, path: Path, what: str) -> None:
    """``atomic_save`` for the files a run ends with (``teacher.pt``, ``student.pt``): a
    write that fails is a CheckpointError naming the file, and the previous file (if any)
    is left as it was."""
    try:
        atomic_save(obj, path)
    except OSError as exc:
        raise CheckpointError(f"could not write {what} {path} ({exc.strerror or exc}); the run's checkpoint is "
                              f"kept: free some space and run the same command with --resume to write it") from None


def previous_path(path: Path) -> Path:
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


@contextmanager
def signals_deferred(signals=(signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block is done, then take effect as usual: a
    checkpoint being written is finished rather than torn (torch.save's zip writer turns an
    interrupt into an unrelated error). Outside the main thread, signals are not deferred."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: List[int] = []
    previous = {s: signal.signal(s, lambda signum, _frame: caught.append(signum)) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for signum in caught[:1]:
            signal.raise_signal(signum)


def save_rotating(obj: Any, path: Path) -> None:
    """Save ``obj`` as ``path``, keeping the checkpoint it replaces as ``<stem>.prev.pt``.
    A signal that arrives meanwhile takes effect once both files are in place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.new-{os.getpid()}")
    with signals_deferred():
        atomic_save(obj, tmp)
        if path.exists():
            os.replace(path, previous_path(path))
        os.replace(tmp, path)


def _load(path: Path, what: str) -> Any:
    path = Path(path)
    check_readable(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise CheckpointError(f"{what} {path}: cannot be read ({exc.strerror or exc})") from None
    except Exception as exc:  # truncated zip, random bytes, a pickle of arbitrary objects, ...
        if not zipfile.is_zipfile(path):
            raise CheckpointError(f"{what} {path}: not a PyTorch file (torch.save writes a zip archive; this is "
                                  f"{path.stat().st_size} bytes of something else, or a truncated copy)") from None
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{what} {path}: damaged or not loadable without running code ({reason[:160]})") \
            from None


def check_readable(path: Path, what: str) -> None:
    """Fails early, before any work, for a file that is missing or cannot be opened."""
    reason = unreadable(path)
    if reason is not None:
        raise CheckpointError(f"{what} {path}: {reason}")


def read_checkpoint(path: Path) -> Dict[str, Any]:
    """A training checkpoint, verified to load and to hold what the trainer writes."""
    state = _load(path, "checkpoint")
    if not isinstance(state, dict) or not all(key in state for key in CHECKPOINT_KEYS):
        raise CheckpointError(f"checkpoint {path}: {describe_weights(state)}, not a training checkpoint "
                              f"(expected the keys {', '.join(CHECKPOINT_KEYS)})")
    return state


def describe_weights(state: Any) -> str:
    """What a loaded file holds, in a few words."""
    if not isinstance(state, dict):
        return f"a {type(state).__name__}"
    if all(key in state for key in CHECKPOINT_KEYS):
        return f"a training checkpoint (epoch {state['epoch'] + 1})"
    tensors = {k: v for k, v in state.items() if torch.is_tensor(v)}
    if not tensors:
        return f"a dictionary with keys {', '.join(map(str, list(state)[:5]))}"
    prefixes = {k.split(".", 1)[0] for k in tensors}
    if {"cnn", "vit", "fuse"} <= prefixes:
        return f"hybrid teacher weights ({state['fuse.weight'].shape[0]} classes)" if "fuse.weight" in state \
            else "hybrid teacher weights"
    if prefixes == {"model"}:
        return f"student weights ({_classes(tensors)} classes)"
    return f"weights of another model ({len(tensors)} tensors, e.g. {next(iter(tensors))})"


def _classes(tensors: Dict[str, torch.Tensor]) -> Optional[int]:
    last = [v for v in tensors.values() if v.dim() == 2]
    return last[-1].shape[0] if last else None


def read_weights(path: Path, what: str) -> Dict[str, torch.Tensor]:
    """A state dict from ``path`` (a bare ``state_dict`` file, or the weights inside a
    training checkpoint)."""
    state = _load(path, what)
    if isinstance(state, dict) and all(key in state for key in CHECKPOINT_KEYS):
        state = state["task"]  # task state: the model's keys under the task's prefix
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{what} {path}: holds {describe_weights(state)}, not model weights")
    return state


def load_model_weights(model: nn.Module, path: Path, what: str, expected: str) -> None:
    """Load ``path`` into ``model`` or raise one line naming the file, what it holds and
    what was expected (``expected``: e.g. "a student efficientnet_b0 for 10 classes")."""
    state = read_weights(path, what)
    own = model.state_dict()
    if set(state) != set(own):
        stripped = _strip_task_prefix(state, own)
        if stripped is not None:
            state = stripped
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{what} {path}: holds {describe_weights(state)}, expected {expected} "
                              f"({len(missing)} weights missing, {len(unexpected)} unexpected)")
    wrong: List[Tuple[str, torch.Size, torch.Size]] = [
        (k, state[k].shape, own[k].shape) for k in own if state[k].shape != own[k].shape]
    if wrong:
        key, got, want = wrong[0]
        raise CheckpointError(f"{what} {path}: holds {describe_weights(state)}, expected {expected} "
                              f"({key} is {tuple(got)}, this model's is {tuple(want)})")
    model.load_state_dict(state)


def _strip_task_prefix(state: Dict[str, torch.Tensor], own: Dict[str, Any]):
    """A task's state narrowed to one model's keys: those under the one prefix (a task's
    submodule name, e.g. ``student.``) below which every key of the model is found."""
    anchor = next(iter(own), None)
    for key in state:
        if anchor is not None and key.endswith("." + anchor):
            prefix = key[:-len(anchor)]
            sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if set(sub) == set(own):
                return sub
    return None


def read_newest_checkpoint(path: Path, *, warn: bool = True) -> Optional[Dict[str, Any]]:
    """The newest training checkpoint at ``path`` that loads, or None where there is none;
    the previous one (``<name>.prev.pt``) where the newest is damaged (a crash or a full
    disk while writing), said on standard error when ``warn``."""
    newest, previous = Path(path), previous_path(path)
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
        if warn:
            print(f"warning: {damaged}; resuming from the previous checkpoint {previous} "
                  f"(epoch {state['epoch'] + 1})", file=sys.stderr, flush=True)
        return state
