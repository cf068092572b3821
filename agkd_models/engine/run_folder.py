"""An output folder belongs to one run.

:class:`RunFolder` claims ``--out`` for the lifetime of a command: it refuses a path that
is a file (or lies inside one), holds an exclusive lock on ``OUT/.agkd.lock`` so a second
run into the same folder stops at once instead of interleaving its checkpoints with the
first's, and refuses a folder that already holds a run's files unless the user said what
to do with them: ``resume`` (continue that run) or ``overwrite`` (delete its files first).

The lock is an advisory ``flock``: the kernel drops it when the process dies, however it
dies, so a killed run never leaves a stale lock behind. Where ``fcntl`` does not exist
(Windows) folders are not locked.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["RunFolder", "RunFolderError", "WORK_FILES", "RUN_FILES", "check_out_path"]

# A folder holding any of these holds a run's work (a finished epoch at least); a folder
# with only a configuration (a run stopped before its first epoch ended) is free.
WORK_FILES = ("checkpoint.pt", "checkpoint.prev.pt", "metrics.jsonl", "teacher.pt", "student.pt")
# What --overwrite deletes: everything a training run writes.
RUN_FILES = WORK_FILES + ("metrics.csv", "teacher_identity.json", "report.md", "curves.png", "config.yaml")
LOCK_NAME = ".agkd.lock"


class RunFolderError(ValueError):
    """The output folder cannot be used as asked (one line for the user)."""


def check_out_path(out: Path, flag: str = "--out") -> None:
    """A RunFolderError when ``out`` is a file or lies inside one."""
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"{flag} {out} is a file, not a folder")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise RunFolderError(f"{flag} {out} lies inside {parent}, which is a file")
            break


class RunFolder:
    """``with RunFolder(out, resume=..., overwrite=...):`` — the folder is this run's until
    the block ends (see the module docstring). ``work_files`` are the names that mark a
    folder as holding a run's work (none: the folder is only locked)."""

    def __init__(self, out: Path, *, resume: bool = False, overwrite: bool = False, flag: str = "--out",
                 work_files: Sequence[str] = WORK_FILES):
        if resume and overwrite:
            raise RunFolderError("--resume continues the run in the folder and --overwrite replaces it: give one")
        self.out, self.resume, self.overwrite, self.flag = Path(out), resume, overwrite, flag
        self.work_files = tuple(work_files)
        self._lock_file: Optional[int] = None

    def existing(self, names: Sequence[str]):
        return [name for name in names if (self.out / name).exists()]

    def __enter__(self) -> "RunFolder":
        check_out_path(self.out, self.flag)
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunFolderError(f"{self.flag} {self.out}: cannot create the folder ({exc.strerror})") from None
        self._lock()
        try:
            found = self.existing(self.work_files)
            if self.overwrite and self.work_files:
                for name in self.existing(RUN_FILES):
                    (self.out / name).unlink()
            elif found and not self.resume:
                raise RunFolderError(
                    f"{self.flag} {self.out} holds another run's files ({', '.join(found)}); give --resume to "
                    f"continue that run, --overwrite to replace it, or another {self.flag}")
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._unlock()

    def _lock(self) -> None:
        if fcntl is None:  # pragma: no cover - Windows
            return
        path = self.out / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunFolderError(f"{self.flag} {self.out} is in use by another agkd run (pid {holder}); wait for "
                                 f"it to finish or choose another {self.flag}") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_file = fd

    def _unlock(self) -> None:
        if self._lock_file is not None:
            # The file stays: removing it would let a third run lock a fresh file while a
            # second still waits on the old one.
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            os.close(self._lock_file)
            self._lock_file = None
