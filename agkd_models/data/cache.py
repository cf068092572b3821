"""Teacher cache with augmentation replay: run the frozen teacher once over ``E`` epochs of
augmentation draws, then distil any number of students (the AGKD paper's Table II compares
five attention losses) without running it again.

For every training sample ``i`` and cached epoch ``e`` the cache holds the augmentation
draw (crop box and flip, :class:`~agkd_models.data.ReplayableAugment`), the teacher's
logits (all of them, or the top ``k``) and its attention map ``A_T``. Distillation epoch
``n`` replays cached epoch ``n mod E``: the student sees exactly the images the teacher
saw, and the teacher's outputs are read instead of computed (the idea of FKD, Shen &
Xing 2022, which stores crop coordinates with soft labels).

Layout: a folder with ``manifest.json`` and one ``.npy`` file per field, epoch-major so one
epoch is one contiguous block, memory-mapped (never loaded whole, never one file per
sample)::

    manifest.json        format, version, shapes and dtypes, what it was made from
    labels.npy           (S,) int64
    augment.npy          (E, S, 5) int32: top, left, height, width, flip
    logits.npy           (E, S, K) float16 | float32                      (without top-k)
    topk_values.npy      (E, S, k) float16 | float32                      (with top-k)
    topk_indices.npy     (E, S, k) int16 | int32
    attention.npy        (E, S, C, H, W) float16 | float32

float16 keeps ~3 significant digits: logits move by at most 2⁻¹¹ of their size, far below
what changes a softmax at KD temperatures; attention maps are L2-normalised (≤ 1). Values
that float16 cannot hold (|x| > 65504) stop the writer with an error rather than saturate.
With top-k the other classes' logits are replayed as ``-inf``: the teacher's distribution
restricted to its k most likely classes and renormalised (the KD kernels treat ``-inf``
teacher logits as probability 0).

The writer works in a sibling folder and renames it into place after the manifest is on
disk, so a cache folder is complete or absent. Opening validates the format version, each
field file against the manifest, and the data set, augmentation and teacher fingerprints
against the run's: a mismatch is a :class:`TeacherCacheError` naming what differs.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import stat
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

from ..engine import distributed
from ..engine.progress import progress_bar
from ..engine.run_folder import pid_alive
from .datasets import AugmentedDataset, DataError, fingerprint

__all__ = ["CACHE_VERSION", "TeacherCacheError", "CachedTeacherOutput", "TeacherCache", "CachedTeacherDataset",
           "write_teacher_cache", "teacher_fingerprint", "teacher_identity", "cache_identity"]

CACHE_FORMAT = "agkd-teacher-cache"
CACHE_VERSION = 2  # 2: a SHA-256 of every field's file in the manifest
READABLE_VERSIONS = (1, 2)  # version 1 caches load, unverified (a warning says to rebuild them)
MANIFEST = "manifest.json"
STORAGE_DTYPES = ("float16", "float32")
_FLOAT16_MAX = float(np.finfo(np.float16).max)


class TeacherCacheError(ValueError):
    """A teacher cache that is missing, incomplete, of another format version, or made from
    other data, augmentation or teacher than the run that wants to use it."""


@dataclass
class CachedTeacherOutput:
    """What the distillers read from a teacher: ``logits (B, K)`` and ``attention (B, C, H, W)``."""
    logits: torch.Tensor
    attention: torch.Tensor

    def to(self, device: torch.device) -> "CachedTeacherOutput":
        return CachedTeacherOutput(self.logits.to(device, non_blocking=True),
                                   self.attention.to(device, non_blocking=True))

    def pin_memory(self) -> "CachedTeacherOutput":
        return CachedTeacherOutput(self.logits.pin_memory(), self.attention.pin_memory())


def teacher_fingerprint(teacher: nn.Module, config: Dict[str, Any]) -> str:
    """SHA-256 of the teacher's architecture settings and every tensor of its state dict."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(teacher.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        # reshape: batch norm's num_batches_tracked is 0-d, which cannot be viewed as bytes.
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def teacher_identity(teacher: nn.Module, teacher_config: Dict[str, Any]) -> str:
    """The teacher's one identity: a SHA-256 of its architecture settings and its weights
    (:func:`teacher_fingerprint`), not of where the weights came from, so that a weights
    file moved or saved again is the same teacher. Teacher caches and comparison results
    record it."""
    return teacher_fingerprint(teacher, teacher_architecture(teacher_config))


def teacher_architecture(teacher_config: Dict[str, Any]) -> Dict[str, Any]:
    """A teacher section less where its weights came from: what a teacher's identity counts."""
    return {k: v for k, v in teacher_config.items() if k not in ("cnn_weights", "vit_weights", "pretrained")}


def cache_identity(train_set: AugmentedDataset, teacher: str) -> Dict[str, Any]:
    """What a cache must have been made from to serve a run on ``train_set`` with the
    teacher whose :func:`teacher_identity` is ``teacher``."""
    if not isinstance(train_set, AugmentedDataset):
        raise TeacherCacheError(f"the teacher cache replays augmentation draws and needs an AugmentedDataset, "
                                f"got a {type(train_set).__name__}")
    return {"dataset": fingerprint(train_set), "num_samples": len(train_set),
            "augment": {**train_set.augment.config(), "seed": train_set.seed}, "teacher": teacher}


def _open_npy(path: Path, mode: str = "r") -> np.ndarray:
    return np.load(path, mmap_mode=mode, allow_pickle=False)


# Each field's file name, fixed: a manifest cannot point a field anywhere else.
FIELD_FILES = {"labels": "labels.npy", "augment": "augment.npy", "logits": "logits.npy",
               "topk_values": "topk_values.npy", "topk_indices": "topk_indices.npy", "attention": "attention.npy"}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_manifest(path: Path) -> Dict[str, Any]:
    """The manifest of the cache folder ``path``, checked entry by entry against what the
    writer writes: the counts (epochs, samples, classes, top-k) against every field's
    shape, each field's file name and dtype, and (format version 2) a SHA-256 for every
    field. Anything else is a TeacherCacheError naming the entry."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise TeacherCacheError(f"teacher cache {path}: no {MANIFEST}; not a teacher cache, or one whose "
                                f"writing did not finish. Make it with `agkd cache-teacher --out {path}`")

    def bad(what: str) -> TeacherCacheError:
        return TeacherCacheError(f"teacher cache {path}: {MANIFEST} {what}; it was not written by agkd "
                                 f"cache-teacher or was changed since: rebuild it with `agkd cache-teacher "
                                 f"--overwrite`")

    try:
        manifest = json.loads(manifest_path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise bad("is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise TeacherCacheError(f"teacher cache {path}: {MANIFEST} is not valid JSON ({exc})") from None
    except OSError as exc:
        raise TeacherCacheError(f"teacher cache {path}: {MANIFEST} cannot be read ({exc.strerror})") from None
    if not isinstance(manifest, dict):
        raise bad(f"holds a JSON {type(manifest).__name__}, not an object")
    if manifest.get("format") != CACHE_FORMAT:
        raise TeacherCacheError(f"teacher cache {path}: {MANIFEST} is not an {CACHE_FORMAT} manifest")
    if manifest.get("version") not in READABLE_VERSIONS:
        raise TeacherCacheError(f"teacher cache {path} has format version {manifest.get('version')}; this agkd "
                                f"reads versions {', '.join(map(str, READABLE_VERSIONS))}. Rebuild it with "
                                f"`agkd cache-teacher`")
    for key, minimum in (("epochs", 1), ("num_samples", 1), ("num_classes", 2)):
        if not _is_int(manifest.get(key)) or manifest[key] < minimum:
            raise bad(f"entry {key!r} is {manifest.get(key)!r}, not an integer >= {minimum}")
    epochs, samples, classes, topk = (manifest["epochs"], manifest["num_samples"], manifest["num_classes"],
                                      manifest.get("topk"))
    if topk is not None and not (_is_int(topk) and 0 < topk < classes):
        raise bad(f"entry 'topk' is {topk!r}, not null or an integer in [1, {classes - 1}]")
    dtype = manifest.get("dtype")
    if dtype not in STORAGE_DTYPES:
        raise bad(f"entry 'dtype' is {dtype!r}, not one of {', '.join(STORAGE_DTYPES)}")
    if not isinstance(manifest.get("made_from"), dict):
        raise bad("has no 'made_from' object")
    fields = manifest.get("fields")
    expected = {"labels": ("int64", [samples]), "augment": ("int32", [epochs, samples, 5]),
                "attention": (dtype, None)}
    if topk is None:
        expected["logits"] = (dtype, [epochs, samples, classes])
    else:
        expected["topk_values"] = (dtype, [epochs, samples, topk])
        expected["topk_indices"] = ("int16" if classes <= np.iinfo(np.int16).max else "int32", [epochs, samples, topk])
    if not isinstance(fields, dict) or set(fields) != set(expected):
        names = sorted(fields) if isinstance(fields, dict) else fields
        raise bad(f"lists the fields {names!r}; a cache with topk={topk} has {', '.join(sorted(expected))}")
    for name, (field_dtype, shape) in expected.items():
        spec = fields[name]
        if not isinstance(spec, dict):
            raise bad(f"field {name!r} is {spec!r}, not an object")
        if spec.get("file") != FIELD_FILES[name]:
            raise bad(f"field {name!r} names the file {spec.get('file')!r}; its file is {FIELD_FILES[name]!r}, "
                      f"inside the cache folder")
        got_shape = spec.get("shape")
        if not isinstance(got_shape, list) or not all(_is_int(v) and v > 0 for v in got_shape):
            raise bad(f"field {name!r} has the shape {got_shape!r}, not a list of positive integers")
        if shape is None:  # attention: (E, S, C, H, W)
            shape = [epochs, samples] + got_shape[2:]
            if len(got_shape) != 5:
                raise bad(f"field 'attention' has the shape {got_shape}, not (epochs, samples, C, H, W)")
        if got_shape != shape or spec.get("dtype") != field_dtype:
            raise bad(f"field {name!r} is {spec.get('dtype')} {got_shape}, but epochs={epochs}, "
                      f"num_samples={samples}, num_classes={classes}, topk={topk}, dtype={dtype} make it "
                      f"{field_dtype} {shape}")
        if manifest["version"] >= 2 and not (isinstance(spec.get("sha256"), str)
                                             and re.fullmatch(r"[0-9a-f]{64}", spec["sha256"])):
            raise bad(f"field {name!r} has no SHA-256 (version {manifest['version']} records one for every "
                      f"field, so its values could not be verified)")
    return manifest


class TeacherCache:
    """A validated cache folder; field arrays are memory-mapped on first use in each
    process (so DataLoader workers map the files instead of receiving copies)."""

    def __init__(self, path: Path, manifest: Dict[str, Any]):
        self.path, self.manifest = Path(path), manifest
        self.epochs, self.num_samples = int(manifest["epochs"]), int(manifest["num_samples"])
        self.topk: Optional[int] = manifest["topk"]
        self.num_classes = int(manifest["num_classes"])
        self._arrays: Optional[Dict[str, np.ndarray]] = None

    @classmethod
    def open(cls, path, expect: Optional[Dict[str, Any]] = None, verify: bool = True) -> "TeacherCache":
        """Opens and checks a cache: every field's shape and dtype, and with ``verify`` its
        bytes against the SHA-256 written when the cache was finished (reading every file
        once); with ``expect`` (:func:`cache_identity` of the run) also that it was made
        from the same data set, augmentation and teacher."""
        path = Path(path)
        manifest = _read_manifest(path)
        for name, spec in manifest["fields"].items():
            file = path / spec["file"]
            try:
                if not stat.S_ISREG(file.lstat().st_mode):  # a FIFO would block, a link could lead anywhere
                    raise OSError(f"{file.name} is not a regular file")
                array = _open_npy(file)
            except (OSError, ValueError) as exc:
                raise TeacherCacheError(f"teacher cache {path}: field {name!r} ({file.name}) is missing or "
                                        f"unreadable: {exc}") from None
            if list(array.shape) != spec["shape"] or str(array.dtype) != spec["dtype"]:
                raise TeacherCacheError(f"teacher cache {path}: {file.name} holds {array.dtype} {list(array.shape)}, "
                                        f"the manifest says {spec['dtype']} {spec['shape']}")
            if verify and manifest["version"] >= 2 and _sha256(file) != spec["sha256"]:
                raise TeacherCacheError(f"teacher cache {path}: field {name!r} ({file.name}) changed after the cache "
                                        f"was written (its SHA-256 differs from the manifest's); rebuild it with "
                                        f"`agkd cache-teacher --overwrite`")
        if verify and manifest["version"] < 2:
            warnings.warn(f"teacher cache {path} is of format version {manifest['version']}, which has no "
                          f"checksums: its values cannot be verified. Rebuild it with `agkd cache-teacher "
                          f"--overwrite` to have them checked", stacklevel=2)
        cache = cls(path, manifest)
        if expect is not None:
            cache.check_identity(expect)
        return cache

    def check_identity(self, expect: Dict[str, Any]) -> None:
        made = self.manifest["made_from"]
        what = {"num_samples": "the number of training samples differs",
                "dataset": "the training data (samples, labels or their order) differ",
                "augment": "the augmentation settings differ",
                "teacher": "the teacher differs (architecture or weights)"}
        for key, meaning in what.items():
            if made.get(key) != expect[key]:
                raise TeacherCacheError(
                    f"teacher cache {self.path} does not match this run: {meaning} "
                    f"({_difference(made.get(key), expect[key])}). Rebuild it with `agkd cache-teacher`, never "
                    f"reuse it")

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_arrays"] = None  # re-mapped in the receiving process
        return state

    @property
    def arrays(self) -> Dict[str, np.ndarray]:
        if self._arrays is None:
            self._arrays = {name: _open_npy(self.path / spec["file"])
                            for name, spec in self.manifest["fields"].items()}
        return self._arrays

    def cached_epoch(self, epoch: int) -> int:
        return int(epoch) % self.epochs

    def augment_params(self, index: int, epoch: int) -> np.ndarray:
        return np.asarray(self.arrays["augment"][self.cached_epoch(epoch), index])

    def teacher_row(self, index: int, epoch: int) -> Dict[str, torch.Tensor]:
        e, a = self.cached_epoch(epoch), self.arrays
        if self.topk is None:
            logits = torch.from_numpy(np.array(a["logits"][e, index], dtype=np.float32))
        else:
            logits = torch.full((self.num_classes,), float("-inf"))
            logits[torch.from_numpy(a["topk_indices"][e, index].astype(np.int64))] = torch.from_numpy(
                np.array(a["topk_values"][e, index], dtype=np.float32))
        attention = torch.from_numpy(np.array(a["attention"][e, index], dtype=np.float32))
        return {"logits": logits, "attention": attention}


def _difference(cached: Any, wanted: Any) -> str:
    """What differs, in full: for mappings, each entry that differs; else both values."""
    if isinstance(cached, dict) and isinstance(wanted, dict):
        keys = sorted(set(cached) | set(wanted))
        return "; ".join(f"{k}: cache {json.dumps(cached.get(k))}, this run {json.dumps(wanted.get(k))}"
                         for k in keys if cached.get(k) != wanted.get(k))
    return f"cache: {json.dumps(cached)}, this run: {json.dumps(wanted)}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def collate_cached(batch):
    images, labels, teacher = default_collate(batch)
    return images, labels, CachedTeacherOutput(teacher["logits"], teacher["attention"])


class CachedTeacherDataset(Dataset):
    """Training samples with the teacher's cached outputs: item ``i`` in epoch ``n`` is the
    image rendered with cached draw ``(i, n mod E)``, its label, and the teacher's logits
    and attention for exactly that image. Use with ``collate_fn=dataset.collate_fn``."""

    collate_fn = staticmethod(collate_cached)

    def __init__(self, train_set: AugmentedDataset, cache: TeacherCache):
        if len(train_set) != cache.num_samples:
            raise TeacherCacheError(f"teacher cache {cache.path} has {cache.num_samples} samples, the training "
                                    f"set {len(train_set)}")
        self.train_set, self.cache = train_set, cache
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.train_set.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.train_set)

    def __getitem__(self, index: int):
        params = self.cache.augment_params(index, self.epoch)
        try:
            image, label, _ = self.train_set.sample(index, params=params)
        except DataError as exc:
            raise TeacherCacheError(f"teacher cache {self.cache.path}: augment.npy, epoch "
                                    f"{self.cache.cached_epoch(self.epoch)}: {exc}; the cache is damaged, rebuild it "
                                    f"with `agkd cache-teacher --overwrite`") from None
        return image, label, self.cache.teacher_row(index, self.epoch)


class _Draws(Dataset):
    """``(image, label, draw, index)`` of one epoch, for the writer."""

    def __init__(self, train_set: AugmentedDataset, epoch: int):
        self.train_set, self.epoch = train_set, epoch

    def __len__(self) -> int:
        return len(self.train_set)

    def __getitem__(self, index: int):
        image, label, params = self.train_set.sample(index, epoch=self.epoch)
        return image, label, torch.from_numpy(params), index


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fill(teacher, train_set, work: Path, fields, *, epochs, dtype, topk, batch_size, num_workers, device,
          progress) -> None:
    """Computes this rank's rows of every epoch and writes them into the field files."""
    here = distributed.world()
    index_dtype = fields["topk_indices"][1] if topk is not None else None
    arrays = {name: _open_npy(work / file, "r+") for name, (file, _, _) in fields.items()}

    shard = range(here.rank, len(train_set), here.size)
    for epoch in range(epochs):
        loader = DataLoader(Subset(_Draws(train_set, epoch), shard), batch_size=batch_size,
                            num_workers=num_workers, shuffle=False)
        bar = progress_bar(loader, f"teacher cache epoch {epoch + 1}/{epochs}") if progress else None
        for images, labels, params, index in bar if bar is not None else loader:
            out_t = teacher(images.to(device))
            logits, attention = out_t.logits.float().cpu(), out_t.attention.float().cpu()
            for name, value in (("logits", logits), ("attention", attention)):
                if not torch.isfinite(value).all():
                    raise TeacherCacheError(f"the teacher produced non-finite {name} (epoch {epoch}, samples "
                                            f"{index.tolist()[:8]}…); nothing was cached")
                if dtype == "float16" and value.abs().max() > _FLOAT16_MAX:
                    raise TeacherCacheError(f"teacher {name} reach {value.abs().max():.4g}, beyond float16's "
                                            f"{_FLOAT16_MAX:g}; cache with --dtype float32")
            rows = index.numpy()
            arrays["augment"][epoch, rows] = params.numpy()
            arrays["attention"][epoch, rows] = attention.numpy().astype(dtype)
            if topk is None:
                arrays["logits"][epoch, rows] = logits.numpy().astype(dtype)
            else:
                values, classes = logits.topk(topk, dim=1)
                arrays["topk_values"][epoch, rows] = values.numpy().astype(dtype)
                arrays["topk_indices"][epoch, rows] = classes.numpy().astype(index_dtype)
            if epoch == 0:
                arrays["labels"][rows] = labels.numpy()
        if progress and bar is None:  # not a terminal: one line per epoch
            print(f"teacher cache: epoch {epoch + 1}/{epochs} written", flush=True)
    for array in arrays.values():
        array.flush()
    del arrays
    for file, _, _ in fields.values():
        _fsync(work / file)


def _remove_leftovers(out: Path) -> None:
    """Working folders (``.NAME.partial-PID``, ``.NAME.old-PID``) that processes no longer
    alive left beside ``out``, removed with a note; a live writer's are left alone."""
    if not out.parent.is_dir():
        return
    for path in out.parent.glob(f".{out.name}.*-*"):
        kind, _, pid = path.name[len(out.name) + 2:].rpartition("-")
        if kind in ("partial", "old") and pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            print(f"removed {path}, left by a cache writer that stopped (process {pid})", file=sys.stderr)


@torch.no_grad()
def write_teacher_cache(teacher: nn.Module, train_set: AugmentedDataset, out: Path, *, epochs: int,
                        teacher_config: Dict[str, Any], dtype: str = "float16", topk: Optional[int] = None,
                        batch_size: int = 64, num_workers: int = 0, device: Optional[torch.device] = None,
                        overwrite: bool = False, progress: bool = False) -> Path:
    """Runs ``teacher`` (frozen, eval) over ``epochs`` augmentation draws of ``train_set``
    and writes the cache folder ``out``. Under ``torchrun`` each rank computes and writes
    a disjoint share of the rows (a shared file system is assumed); rank 0 creates the
    files, writes the manifest and moves the folder into place."""
    out = Path(out)
    here = distributed.world()
    device = device or torch.device("cpu")
    if dtype not in STORAGE_DTYPES:
        raise TeacherCacheError(f"cache dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
    if not isinstance(epochs, int) or epochs < 1:
        raise TeacherCacheError(f"cache epochs must be a positive integer, got {epochs!r}")
    if out.exists() and not overwrite:
        raise TeacherCacheError(f"{out} exists; pass --overwrite to replace it")
    if out.exists() and not _holds_a_cache(out):
        raise TeacherCacheError(f"{out} is not a teacher cache (no {CACHE_FORMAT} {MANIFEST}); --overwrite replaces "
                                f"only a teacher cache, never another folder: give another --out")
    if here.is_main:
        _remove_leftovers(out)
    teacher.eval().to(device)
    identity = cache_identity(train_set, teacher_identity(teacher, teacher_config))
    num_samples = len(train_set)

    # One probe batch gives the output shapes.
    probe = teacher(train_set[0][0].unsqueeze(0).to(device))
    num_classes = probe.logits.shape[1]
    attention_shape = list(probe.attention.shape[1:])
    if topk is not None and not 0 < topk < num_classes:
        raise TeacherCacheError(f"cache topk must be in [1, {num_classes - 1}] for {num_classes} classes, got {topk}")
    index_dtype = "int16" if num_classes <= np.iinfo(np.int16).max else "int32"
    fields = {"labels": ("labels.npy", "int64", [num_samples]),
              "augment": ("augment.npy", "int32", [epochs, num_samples, 5]),
              "attention": ("attention.npy", dtype, [epochs, num_samples] + attention_shape)}
    if topk is None:
        fields["logits"] = ("logits.npy", dtype, [epochs, num_samples, num_classes])
    else:
        fields["topk_values"] = ("topk_values.npy", dtype, [epochs, num_samples, topk])
        fields["topk_indices"] = ("topk_indices.npy", index_dtype, [epochs, num_samples, topk])

    # Rank 0 chooses and creates the working folder; every rank learns its name.
    work = Path(distributed.gather_objects(str(out.with_name(f".{out.name}.partial-{os.getpid()}")))[0])
    try:
        if here.is_main:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            for name, (file, field_dtype, shape) in fields.items():
                _allocate_npy(work / file, field_dtype, shape)
        distributed.barrier()
        _fill(teacher, train_set, work, fields, epochs=epochs, dtype=dtype, topk=topk, batch_size=batch_size,
              num_workers=num_workers, device=device, progress=progress and here.is_main)
        distributed.barrier()
        if here.is_main:
            _finish(out, work, fields, identity, teacher_config, epochs=epochs, num_samples=num_samples,
                    num_classes=num_classes, topk=topk, dtype=dtype)
    except OSError as exc:  # a full disk, a read-only folder: nothing is left behind
        if here.is_main:
            shutil.rmtree(work, ignore_errors=True)
        size = sum(int(np.prod(shape)) * np.dtype(d).itemsize for _, d, shape in fields.values())
        raise TeacherCacheError(f"could not write the teacher cache {out} ({size / 2**20:.1f} MiB) "
                                f"({exc.strerror or exc}); nothing was cached") from None
    except BaseException:
        if here.is_main:  # a failed write leaves nothing behind
            shutil.rmtree(work, ignore_errors=True)
        raise
    distributed.barrier()
    return out


def _holds_a_cache(folder: Path) -> bool:
    """Whether ``folder`` has a teacher cache's manifest (valid or not otherwise)."""
    try:
        return json.loads((folder / MANIFEST).read_text()).get("format") == CACHE_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _allocate_npy(path: Path, dtype: str, shape) -> None:
    """An .npy file of ``shape`` whose blocks are all on disk before it is memory-mapped:
    a disk that cannot hold it fails here with ENOSPC, not later with SIGBUS when a
    mapped page is first written."""
    np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(shape)).flush()
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        if hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                # A file system that cannot allocate ahead (some network and overlay ones)
                # keeps the sparse file: a disk that fills up then still ends the run.
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
                    raise
    finally:
        os.close(fd)


def _finish(out: Path, work: Path, fields, identity, teacher_config, *, epochs, num_samples, num_classes, topk,
            dtype) -> None:
    """Rank 0: the manifest written and flushed, then the folder moved into place."""
    manifest = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "epochs": epochs, "num_samples": num_samples, "num_classes": num_classes, "topk": topk,
                "dtype": dtype, "fields": {name: {"file": f, "dtype": d, "shape": s, "sha256": _sha256(work / f)}
                                           for name, (f, d, s) in fields.items()},
                "made_from": identity, "teacher_config": teacher_config}
    (work / MANIFEST).write_text(json.dumps(manifest, indent=1))
    _fsync(work / MANIFEST)
    if out.exists():  # overwrite: the old cache stays usable until the new one is in place
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(work, out)
        shutil.rmtree(old)
    else:
        os.replace(work, out)
