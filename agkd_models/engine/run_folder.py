"""An output folder belongs to one run.

:class:`RunFolder` claims ``--out`` for the lifetime of a command: it refuses a path that
is a file (or lies inside one), holds an exclusive lock on ``OUT/.agkd.lock`` so a second
run into the same folder stops at once instead of interleaving its checkpoints with the
first's, and refuses a folder that already holds a run's files unless the user said what
to do with them: ``resume`` (continue that run) or ``overwrite`` (delete its files first).

The lock is an advisory ``flock``: the kernel drops it when the process dies, however it
dies, so a killed run never leaves a stale lock behind. Where ``fcntl`` does not exist
(Windows) folders are not locked.

A folder is agkd's only when agkd made it: ``OUT/.agkd-run`` names the kind of run that
owns it (``train-teacher``, ``distill``, ``compare``). A folder that holds anything else
and no such mark is the user's own and is never written into; a folder marked for another
kind of run is refused without ``--overwrite`` (a comparison would replace a teacher's
``config.yaml``). ``--out`` may not be the root of the file system or the home folder,
may not lie inside the data set's folder (its plots would become training images) or
hold it, and ``--overwrite`` may not delete the run's own inputs (``--teacher``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional, Sequence, Tuple

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["RunFolder", "RunFolderError", "WORK_FILES", "RUN_FILES", "check_out_path", "mark_run_folder",
           "remove_stale_temporaries"]

# A folder holding any of these holds a run's work (a finished epoch at least); a folder
# with only a configuration (a run stopped before its first epoch ended) is free.
WORK_FILES = ("checkpoint.pt", "checkpoint.prev.pt", "metrics.jsonl", "teacher.pt", "student.pt")
# What --overwrite deletes: everything a training run writes.
RUN_FILES = WORK_FILES + ("metrics.csv", "teacher_recipe.json", "teacher_identity.json", "report.md", "curves.png",
                          "config.yaml")  # teacher_identity.json: the recipe file's earlier name
LOCK_NAME = ".agkd.lock"
MARK_NAME = ".agkd-run"
RUN_KINDS = ("train-teacher", "distill", "compare", "chain")


class RunFolderError(ValueError):
    """The output folder cannot be used as asked (one line for the user)."""


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies below it (both resolved)."""
    return path == folder or folder in path.parents


def check_out_path(out: Path, flag: str = "--out", *, data_root: Optional[str] = None) -> None:
    """A RunFolderError when ``out`` is a file or lies inside one, is the root of the file
    system or the home folder, or overlaps the data set's folder ``data_root``."""
    out = Path(out)
    if out.is_symlink() and not out.exists():
        raise RunFolderError(f"{flag} {out} is a symbolic link to {os.readlink(out)}, which does not exist")
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"{flag} {out} is a file, not a folder")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise RunFolderError(f"{flag} {out} lies inside {parent}, which is a file")
            break
    where = out.expanduser().resolve()
    for name, folder in (("the root of the file system", Path(where.anchor)), ("your home folder", Path.home())):
        if where == folder.resolve():
            raise RunFolderError(f"{flag} {out} is {name}; give a folder of the run's own, e.g. runs/NAME")
    if data_root:
        root = Path(data_root).expanduser().resolve()
        if _inside(where, root):
            raise RunFolderError(f"{flag} {out} lies inside the data set's folder data.root={data_root}: the run's "
                                 f"files (curves.png) would become training images; give a folder outside it")
        if _inside(root, where):
            raise RunFolderError(f"{flag} {out} holds the data set's folder data.root={data_root}; give a folder "
                                 f"of the run's own")


# What a folder agkd wrote before marks existed holds, by kind of run (it has a lock file).
_KIND_BY_FILES = (("compare", ("comparison.json", "summary.json")), ("train-teacher", ("teacher.pt",)),
                  ("distill", ("student.pt",)))


def _kind_of(out: Path) -> Optional[str]:
    """The kind of run that marked ``out``; for a folder agkd wrote before marks existed
    (it holds a lock file) the kind its files show, or "" when they show none; None for a
    folder agkd did not make."""
    try:
        return (out / MARK_NAME).read_text().strip()
    except FileNotFoundError:
        if not (out / LOCK_NAME).exists():
            return None
        return next((kind for kind, files in _KIND_BY_FILES if any((out / f).exists() for f in files)), "")


def mark_run_folder(out: Path, kind: str) -> None:
    """Marks ``out`` (made if need be) as a folder of a ``kind`` run."""
    assert kind in RUN_KINDS, kind
    out.mkdir(parents=True, exist_ok=True)
    if _kind_of(out) != kind:
        (out / MARK_NAME).write_text(kind + "\n")


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (of any user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def remove_stale_temporaries(out: Path) -> None:
    """Removes the temporary files of writes that were killed (``.NAME.tmp-PID`` and
    ``.NAME.new-PID``, see :mod:`.checkpoint`; up to a checkpoint's size each), where their
    process is no longer alive."""
    if not out.is_dir():
        return
    for path in out.glob(".*-*"):
        kind, _, pid = path.name.rpartition("-")
        if (kind.endswith(".tmp") or kind.endswith(".new")) and pid.isdigit() and path.is_file() \
                and int(pid) != os.getpid() and not pid_alive(int(pid)):
            path.unlink(missing_ok=True)


class RunFolder:
    """``with RunFolder(out, resume=..., overwrite=...):`` — the folder is this run's until
    the block ends (see the module docstring). ``work_files`` are the names that mark a
    folder as holding a run's work (none: the folder is only locked)."""

    def __init__(self, out: Path, *, kind: str, resume: bool = False, overwrite: bool = False,
                 flag: str = "--out", work_files: Sequence[str] = WORK_FILES,
                 inputs: Iterable[Tuple[str, Optional[str]]] = (), data_root: Optional[str] = None):
        if resume and overwrite:
            raise RunFolderError("--resume continues the run in the folder and --overwrite replaces it: give one")
        if kind not in RUN_KINDS:
            raise ValueError(f"RunFolder: kind must be one of {', '.join(RUN_KINDS)}, got {kind!r}")
        self.out, self.kind, self.resume, self.overwrite, self.flag = Path(out), kind, resume, overwrite, flag
        self.work_files = tuple(work_files)
        self.inputs = [(name, Path(path)) for name, path in inputs if path]
        self.data_root = data_root
        self._lock_file: Optional[int] = None

    def existing(self, names: Sequence[str]):
        return [name for name in names if (self.out / name).exists()]

    def _check_not_foreign(self) -> None:
        """The folder is new, empty, or agkd's (of this kind, or replaced with --overwrite)."""
        if not self.out.is_dir():
            return
        kind = _kind_of(self.out)
        if kind is None:
            entries = sorted(p.name for p in self.out.iterdir())
            if entries:
                shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
                raise RunFolderError(f"{self.flag} {self.out} holds files agkd did not write ({shown}); agkd writes "
                                     f"only into a new or empty folder, or one of its own runs: give another "
                                     f"{self.flag}")
        elif kind and kind != self.kind and not self.overwrite:
            raise RunFolderError(f"{self.flag} {self.out} holds a {kind} run, this is {self.kind}: give another "
                                 f"{self.flag} (or --overwrite to replace that run)")

    def _check_inputs_kept(self) -> None:
        """--overwrite deletes the run's files: never one this run reads."""
        if not (self.overwrite and self.work_files):
            return
        doomed = {(self.out / name).resolve(): name for name in self.existing(RUN_FILES)}
        for flag, path in self.inputs:
            if path.exists() and path.resolve() in doomed:
                raise RunFolderError(f"{self.flag} {self.out} --overwrite would delete {path}, which {flag} reads; "
                                     f"write this run into another {self.flag}")

    def __enter__(self) -> "RunFolder":
        check_out_path(self.out, self.flag, data_root=self.data_root)
        self._check_not_foreign()
        self._check_inputs_kept()
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunFolderError(f"{self.flag} {self.out}: cannot create the folder ({exc.strerror})") from None
        self._lock()
        try:
            self._check_not_foreign()  # again, under the lock
            found = self.existing(self.work_files)
            if self.overwrite and self.work_files:
                for name in self.existing(RUN_FILES):
                    (self.out / name).unlink()
            elif found and not self.resume:
                raise RunFolderError(
                    f"{self.flag} {self.out} holds another run's files ({', '.join(found)}); give --resume to "
                    f"continue that run, --overwrite to replace it, or another {self.flag}")
            mark_run_folder(self.out, self.kind)
            remove_stale_temporaries(self.out)
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
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:  # a read-only folder or file system
            raise RunFolderError(f"{self.flag} {self.out}: cannot write in the folder ({exc.strerror})") from None
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
