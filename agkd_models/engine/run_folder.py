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

__all__ = ["RunFolder", "RunFolderError", "RUN_FILES", "check_out_path"]

# What a training run writes; a folder holding any of these belongs to a run.
RUN_FILES = ("checkpoint.pt", "checkpoint.prev.pt", "metrics.jsonl", "metrics.csv", "teacher.pt", "student.pt",
             "teacher_identity.json", "report.md", "curves.png", "config.yaml")
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
    the block ends (see the module docstring). ``run_files`` are the names that mark a
    folder as holding a run."""

    def __init__(self, out: Path, *, resume: bool = False, overwrite: bool = False, flag: str = "--out",
                 run_files: Sequence[str] = RUN_FILES):
        if resume and overwrite:
            raise RunFolderError("--resume continues the run in the folder and --overwrite replaces it: give one")
        self.out, self.resume, self.overwrite, self.flag = Path(out), resume, overwrite, flag
        self.run_files = tuple(run_files)
        self._lock_file: Optional[int] = None

    def existing_run_files(self):
        return [name for name in self.run_files if (self.out / name).exists()]

    def __enter__(self) -> "RunFolder":
        check_out_path(self.out, self.flag)
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunFolderError(f"{self.flag} {self.out}: cannot create the folder ({exc.strerror})") from None
        self._lock()
        try:
            found = self.existing_run_files()
            if found and self.overwrite:
                for name in found:
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
