"""Data sets for the trainer: the embedded scikit-learn digits (no download), any
ImageFolder tree, CIFAR-10/100 in torchvision's on-disk format and TinyImageNet-200 in its
released layout. Nothing downloads unless ``download=True``; a missing or malformed root
is a ``DataError`` naming the path and the layout that was expected; unreadable images
are skipped with one counted warning.

Training augmentation is *replayable*: the random resized crop and flip of sample ``i``
in epoch ``e`` are drawn from a generator seeded by ``(seed, e, i)``
(:class:`AugmentedDataset`), so a draw does not depend on worker count, rank or batch
order, and can be stored with the teacher's outputs and replayed (:mod:`.cache`).
"""
from __future__ import annotations

import hashlib
import json
import math
import dataclasses
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset, Subset

__all__ = ["DataError", "DataSplits", "build_datasets", "ReplayableAugment", "AugmentedDataset",
           "eval_transform", "fingerprint", "limit", "three_way_split", "IMAGENET_MEAN", "IMAGENET_STD", "DATASETS"]

# The normalisation every data set applies: ImageNet's, as timm declares it (the one
# source, which CAKD's multi-view generator also reads to work in pixel space).
IMAGENET_MEAN, IMAGENET_STD = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
DATASETS = ("digits", "folder", "cifar10", "cifar100", "tinyimagenet")


class DataError(ValueError):
    """A data root that is missing or not laid out as the data set expects."""


@dataclass
class DataSplits:
    """Training, validation (choose recipes here) and test (report here) sets.
    ``test_is_val`` marks a folder data set that ships only train/ and val/: its one held-out
    set serves as both, and reports say so."""
    train: Dataset
    val: Dataset
    test: Dataset
    classes: List[str]
    test_is_val: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class ReplayableAugment:
    """Random resized crop (and horizontal flip), then ImageNet normalisation, with the
    random draw separated from its application: :meth:`draw` turns a NumPy generator and
    the image size into five integers ``(top, left, height, width, flip)`` (torchvision's
    ``RandomResizedCrop`` sampling: ten tries of an area fraction in ``scale`` and a
    log-uniform aspect ratio, then the largest centred crop of allowed ratio), and
    :meth:`apply` renders them. Stored draws replay exactly."""

    def __init__(self, size: int, *, scale: Tuple[float, float] = (0.6, 1.0),
                 ratio: Tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True):
        self.size, self.scale, self.ratio, self.flip = int(size), tuple(scale), tuple(ratio), bool(flip)

    def config(self) -> Dict[str, Any]:
        return {"size": self.size, "scale": list(self.scale), "ratio": list(self.ratio), "flip": self.flip}

    def draw(self, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        crop = None
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                crop = (int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w)
                break
        if crop is None:  # fallback: centre crop at the nearest allowed aspect ratio
            aspect = width / height
            if aspect < self.ratio[0]:
                w, h = width, int(round(width / self.ratio[0]))
            elif aspect > self.ratio[1]:
                w, h = int(round(height * self.ratio[1])), height
            else:
                w, h = width, height
            crop = ((height - h) // 2, (width - w) // 2, h, w)
        flip = int(self.flip and rng.random() < 0.5)
        return np.array([*crop, flip], dtype=np.int32)

    def apply(self, image, params: Sequence[int]) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF
        top, left, h, w, flip = (int(v) for v in params)
        image = TF.to_image(image)
        image = TF.resized_crop(image, top, left, h, w, [self.size, self.size], antialias=True)
        if flip:
            image = TF.horizontal_flip(image)
        image = TF.to_dtype(image, torch.float32, scale=True)
        return TF.normalize(image, IMAGENET_MEAN, IMAGENET_STD).as_subclass(torch.Tensor)


def _image_size(image) -> Tuple[int, int]:
    from torchvision.transforms.v2 import functional as TF
    height, width = TF.get_size(TF.to_image(image) if not isinstance(image, torch.Tensor) else image)
    return int(height), int(width)


class AugmentedDataset(Dataset):
    """``(augmented image, label)`` pairs of a raw data set (items ``(image, label)`` with
    PIL or uint8 tensor images). The draw of sample ``i`` in epoch :attr:`epoch` comes from
    ``numpy.random.default_rng((seed, epoch, i))``; :meth:`sample` also returns the draw,
    or renders a given one (replay)."""

    def __init__(self, base: Dataset, augment: ReplayableAugment, seed: int = 0):
        self.base, self.augment, self.seed = base, augment, int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def draw(self, index: int, epoch: int, height: int, width: int) -> np.ndarray:
        return self.augment.draw(np.random.default_rng((self.seed, int(epoch), int(index))), height, width)

    def sample(self, index: int, epoch: Optional[int] = None, params: Optional[Sequence[int]] = None):
        """``(image, label, params)``: the draw of ``(index, epoch)``, or ``params`` replayed."""
        image, label = self.base[index]
        height, width = _image_size(image)
        if params is None:
            params = self.draw(index, self.epoch if epoch is None else epoch, height, width)
        else:
            top, left, h, w, flip = (int(v) for v in params)
            if not (0 <= top and 0 <= left and h >= 1 and w >= 1 and top + h <= height and left + w <= width
                    and flip in (0, 1)):
                raise DataError(f"augmentation record (top, left, height, width, flip) = "
                                f"{(top, left, h, w, flip)} does not fit sample {index}, a {height}x{width} image")
        return self.augment.apply(image, params), label, np.asarray(params, dtype=np.int32)

    def __getitem__(self, index: int):
        image, label, _ = self.sample(index)
        return image, label

    def subset(self, indices: Sequence[int]) -> "AugmentedDataset":
        return AugmentedDataset(Subset(self.base, list(indices)), self.augment, self.seed)

    def with_seed(self, seed: int) -> "AugmentedDataset":
        """The same samples with the augmentation drawn from another training seed."""
        return AugmentedDataset(self.base, self.augment, seed)


def limit(dataset: Dataset, count: Optional[int], seed: int) -> Dataset:
    """A fixed random subset of ``count`` samples (all when None); an augmented data set
    stays one, indexed ``0 .. count-1``."""
    if count is None or count >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count].tolist()
    return dataset.subset(order) if isinstance(dataset, AugmentedDataset) else Subset(dataset, order)


def fingerprint(dataset: Dataset) -> str:
    """A SHA-256 of what identifies a data set's samples and their order: image bytes and
    labels of in-memory sets, file paths, sizes and labels of file-backed ones, subset
    indices. Augmentation is not included (see :meth:`ReplayableAugment.config`)."""
    digest = hashlib.sha256()

    def feed(ds) -> None:
        if isinstance(ds, AugmentedDataset):
            feed(ds.base)
        elif isinstance(ds, Subset):
            feed(ds.dataset)
            digest.update(b"subset")
            digest.update(np.asarray(ds.indices, dtype=np.int64).tobytes())
        elif isinstance(ds, _ScaledDigits):  # the enlarged images' bytes, a chunk at a time
            for start in range(0, len(ds), 64):
                digest.update(ds.rendered(start, start + 64).numpy().tobytes())
            digest.update(ds.labels.to(torch.int64).numpy().tobytes())
        elif isinstance(ds, _Samples):
            listing = [(path, label, os.path.getsize(path)) for path, label in ds.samples]
            digest.update(json.dumps(listing).encode())
        elif hasattr(ds, "data") and hasattr(ds, "targets"):  # torchvision CIFAR and the like
            digest.update(np.ascontiguousarray(ds.data).tobytes())
            digest.update(np.asarray(ds.targets, dtype=np.int64).tobytes())
        else:
            raise DataError(f"cannot fingerprint a {type(ds).__name__}; wrap its samples in a "
                            f"supported data set (in-memory tensors, image files, .data/.targets)")
        digest.update(str(len(ds)).encode())

    feed(dataset)
    return digest.hexdigest()


def eval_transform(size: int):
    """Resize to size/0.875, center crop, ImageNet normalisation."""
    from torchvision.transforms import v2
    return v2.Compose([v2.ToImage(), v2.Resize(int(round(size / 0.875)), antialias=True), v2.CenterCrop(size),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class _Samples(Dataset):
    """(image, label) pairs from a list of image files, loaded with PIL as RGB."""

    def __init__(self, samples: Sequence[Tuple[str, int]], transform: Optional[Callable]):
        self.samples, self.transform = list(samples), transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from PIL import Image
        path, label = self.samples[index]
        with Image.open(path) as image:
            image = to_rgb(image)
        return (self.transform(image) if self.transform else image), label


def to_rgb(image):
    """A PIL image as 8-bit RGB. 16-bit and 32-bit grey images (``I;16``, ``I``: medical
    scans, microscopy) are scaled from their type's full range to 8 bits; PIL's own
    ``convert("RGB")`` clips them at 255, which turns nearly every pixel white."""
    from PIL import Image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image)
        top = 65535 if image.mode.startswith("I;16") or values.max(initial=0) <= 65535 else 2**32 - 1
        scaled = (values.astype(np.float64) * (255.0 / top)).round().clip(0, 255).astype(np.uint8)
        image = Image.fromarray(scaled, mode="L")
    elif image.mode == "F":  # 32-bit float: taken as [0, 1]
        scaled = (np.asarray(image, dtype=np.float64).clip(0, 1) * 255).round().astype(np.uint8)
        image = Image.fromarray(scaled, mode="L")
    return image.convert("RGB")


class _ScaledDigits(Dataset):
    """(image, label) pairs of small grey images (N, 1, h, w) in [0, 1], each enlarged to
    ``size`` (bilinear, rounded to uint8 RGB) when it is read: memory stays that of the small
    images whatever the size, and :meth:`rendered` gives the same bytes in chunks."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, size: int, transform: Optional[Callable]):
        self.images, self.labels, self.size, self.transform = images, labels, int(size), transform

    def __len__(self) -> int:
        return len(self.labels)

    def rendered(self, start: int, stop: int) -> torch.Tensor:
        import torch.nn.functional as F
        images = F.interpolate(self.images[start:stop], size=(self.size, self.size), mode="bilinear",
                               align_corners=False)
        return (images.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()

    def __getitem__(self, index: int):
        image = self.rendered(index, index + 1)[0]
        return (self.transform(image) if self.transform else image), int(self.labels[index])


def _regular_file(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _decodes(path: str) -> bool:
    from PIL import Image
    try:
        with Image.open(path) as image:
            image.load()  # the whole image: a truncated file fails here, not in verify()
        return True
    except Exception:  # any decoder failure means the file is unusable
        return False


def _readable(samples: List[Tuple[str, int]], root: Path) -> List[Tuple[str, int]]:
    """Drops files PIL cannot decode to the end, with one warning that counts them (the
    files are decoded in a thread pool: PIL's decoders release the GIL)."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        ok = list(pool.map(_decodes, [path for path, _ in samples], chunksize=64))
    kept = [sample for sample, good in zip(samples, ok) if good]
    bad = [path for (path, _), good in zip(samples, ok) if not good]
    if bad:
        warnings.warn(f"{len(bad)} unreadable image(s) under {root} skipped (first: {bad[0]})", stacklevel=3)
    return kept


def _check_classes(samples: List[Tuple[str, int]], classes: List[str], root: Path, layout: str) -> None:
    """A DataError when nothing readable is left, or some class has no readable image, or
    there are fewer than two classes: training would fail, or silently learn a class that
    never appears."""
    if not samples:
        raise DataError(f"no readable image under {root}; expected {layout}")
    if len(classes) < 2:
        raise DataError(f"{root} has {len(classes)} class ({', '.join(classes)}); classification needs at least 2")
    present = {label for _, label in samples}
    empty = [name for label, name in enumerate(classes) if label not in present]
    if empty:
        raise DataError(f"class folder(s) {', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''} under {root} "
                        f"hold no readable image; remove them or add images")


def _class_folders(root: Path, layout: str) -> List[str]:
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist or is not a directory; expected {layout}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class sub-folders; expected {layout}")
    return classes


def _scan(root: Path, classes: List[str], layout: str) -> List[Tuple[str, int]]:
    samples = []
    for label, name in enumerate(classes):
        for dirpath, _dirs, files in sorted(os.walk(root / name)):
            # Regular files only: a FIFO or device named like an image would block the read.
            samples += [(os.path.join(dirpath, f), label) for f in sorted(files)
                        if f.lower().endswith(IMAGE_EXTENSIONS) and _regular_file(os.path.join(dirpath, f))]
    if not samples:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}; expected {layout}")
    return samples


def three_way_split(labels: Sequence[int], val_fraction: float, test_fraction: float,
                    seed: int) -> Tuple[List[int], List[int], List[int]]:
    """Stratified train / validation / test indices; the same for the same labels, fractions
    and ``seed`` (``data.split_seed``, separate from the training seed)."""
    from sklearn.model_selection import train_test_split
    if val_fraction + test_fraction >= 1:
        raise DataError(f"data.val_fraction + data.test_fraction must be < 1, got {val_fraction} + {test_fraction}")
    def holdout(index, fraction):
        try:
            return train_test_split(index, test_size=fraction, random_state=seed, stratify=[labels[i] for i in index])
        except ValueError:  # a class too small to stratify (tiny or test-sized data sets)
            return train_test_split(index, test_size=fraction, random_state=seed)

    index = list(range(len(labels)))
    rest, test = (index, []) if test_fraction == 0 else holdout(index, test_fraction)
    train, val = holdout(rest, val_fraction / (1 - test_fraction))
    return sorted(train), sorted(val), sorted(test)


def _digits(image_size: int, split: "SplitSpec", train_tf, eval_tf) -> DataSplits:
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    labels = torch.tensor(digits.target)
    train_idx, val_idx, test_idx = three_way_split(labels.tolist(), *split)
    part = lambda idx, tf: _ScaledDigits(images[idx], labels[idx], image_size, tf)  # noqa: E731
    return DataSplits(part(train_idx, train_tf), part(val_idx, eval_tf), part(test_idx, eval_tf),
                      [str(c) for c in range(10)])


def _folder(root: Path, split: "SplitSpec", train_tf, eval_tf, verify: bool) -> DataSplits:
    layout = ("ROOT/train/<class>/*.jpg and ROOT/val/<class>/*.jpg (and optionally ROOT/test/<class>/*.jpg), "
              "or ROOT/<class>/*.jpg split three ways by val_fraction and test_fraction")
    if (root / "train").is_dir() and (root / "val").is_dir():
        classes = _class_folders(root / "train", layout)
        parts = {}
        for name in ("train", "val", "test"):
            if name == "test" and not (root / "test").is_dir():
                continue
            if _class_folders(root / name, layout) != classes:
                raise DataError(f"{root}/train and {root}/{name} have different class folders; expected {layout}")
            parts[name] = _scan(root / name, classes, layout)
            if verify:
                parts[name] = _readable(parts[name], root / name)
            if name == "train":
                _check_classes(parts[name], classes, root / name, layout)
            elif not parts[name]:
                raise DataError(f"no readable image under {root / name}; expected {layout}")
        val = _Samples(parts["val"], eval_tf)
        test = _Samples(parts["test"], eval_tf) if "test" in parts else val
        return DataSplits(_Samples(parts["train"], train_tf), val, test, classes, test_is_val="test" not in parts)
    classes = _class_folders(root, layout)
    samples = _scan(root, classes, layout)
    if verify:
        samples = _readable(samples, root)
    _check_classes(samples, classes, root, layout)
    train_idx, val_idx, test_idx = three_way_split([s[1] for s in samples], *split)
    pick = lambda idx, tf: _Samples([samples[i] for i in idx], tf)  # noqa: E731
    return DataSplits(pick(train_idx, train_tf), pick(val_idx, eval_tf), pick(test_idx, eval_tf), classes)


def _cifar(name: str, root: Path, split: "SplitSpec", download: bool, train_tf, eval_tf) -> DataSplits:
    from torchvision import datasets
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    try:
        train = cls(str(root), train=True, transform=train_tf, download=download)
        train_eval = cls(str(root), train=True, transform=eval_tf, download=False)
        test = cls(str(root), train=False, transform=eval_tf, download=download)
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
        raise DataError(f"{name}: no valid data set under {root} (expected torchvision's {root}/{folder}/ "
                        f"python-pickle batches); pass --download to fetch it") from exc
    # The official test split is the test set; validation is held out of the training split.
    train_idx, val_idx, _ = three_way_split(list(train.targets), split.val_fraction, 0.0, split.seed)
    return DataSplits(Subset(train, train_idx), Subset(train_eval, val_idx), test, list(train.classes))


def _tinyimagenet(root: Path, split: "SplitSpec", train_tf, eval_tf, verify: bool) -> DataSplits:
    layout = ("ROOT/wnids.txt, ROOT/train/<wnid>/images/*.JPEG, ROOT/val/images/*.JPEG and "
              "ROOT/val/val_annotations.txt (the released tiny-imagenet-200 layout)")
    wnids_file, annotations = root / "wnids.txt", root / "val" / "val_annotations.txt"
    for needed in (wnids_file, root / "train", annotations, root / "val" / "images"):
        if not needed.exists():
            raise DataError(f"tinyimagenet: {needed} is missing; expected {layout}")
    classes = [line.strip() for line in wnids_file.read_text().splitlines() if line.strip()]
    index = {wnid: i for i, wnid in enumerate(classes)}
    train = []
    for wnid in classes:
        folder = root / "train" / wnid / "images"
        if not folder.is_dir():
            raise DataError(f"tinyimagenet: {folder} is missing; expected {layout}")
        train += [(str(folder / f), index[wnid]) for f in sorted(os.listdir(folder))
                  if f.lower().endswith(IMAGE_EXTENSIONS)]
    val = []
    for number, line in enumerate(annotations.read_text().splitlines(), 1):
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index:
            raise DataError(f"tinyimagenet: {annotations}:{number} is not '<file>\\t<wnid>...' with a wnid "
                            f"from wnids.txt: {line!r}")
        val.append((str(root / "val" / "images" / fields[0]), index[fields[1]]))
    if verify:
        train, val = _readable(train, root / "train"), _readable(val, root / "val")
    _check_classes(train, classes, root / "train", layout)
    if not val:
        raise DataError(f"tinyimagenet: no readable image under {root / 'val'}; expected {layout}")
    # The official validation split is the test set; validation is held out of training.
    train_idx, val_idx, _ = three_way_split([label for _, label in train], split.val_fraction, 0.0, split.seed)
    return DataSplits(_Samples([train[i] for i in train_idx], train_tf), _Samples([train[i] for i in val_idx], eval_tf),
                      _Samples(val, eval_tf), classes)


class SplitSpec(NamedTuple):
    val_fraction: float
    test_fraction: float
    seed: int


def build_datasets(name: str, root: Optional[str] = None, *, image_size: int = 224,
                   val_fraction: float = 0.2, test_fraction: float = 0.2, split_seed: int = 0, seed: int = 0,
                   download: bool = False, flip: bool = True, verify: bool = True) -> DataSplits:
    """Train, validation and test sets of ``name`` (see :data:`DATASETS`).

    Single-split sets (digits, a flat class folder) are split three ways, stratified, by
    ``val_fraction`` and ``test_fraction`` with ``split_seed``; sets with an official held-out
    split (CIFAR's test, Tiny ImageNet's val) use it as the test set and hold the validation
    set out of training. The split never depends on ``seed``, the training seed, which draws
    the training set's augmentation (replayable random resized crop and, with ``flip``,
    horizontal flip). Validation and test are resized and centre-cropped."""
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    split = SplitSpec(val_fraction, test_fraction, split_seed)
    splits = _raw_splits(name, root, image_size, split, download, verify)
    augment = ReplayableAugment(image_size, flip=flip)
    return dataclasses.replace(splits, train=AugmentedDataset(splits.train, augment, seed))


def _raw_splits(name, root, image_size, split, download, verify) -> DataSplits:
    """Training split without a transform (the caller augments it), validation and test
    splits with the evaluation transform."""
    train_tf, eval_tf = None, eval_transform(image_size)
    if name == "digits":
        return _digits(image_size, split, train_tf, eval_tf)
    if root is None:
        raise DataError(f"data set {name!r} needs a data root")
    root_path = Path(root).expanduser()
    if name == "folder":
        return _folder(root_path, split, train_tf, eval_tf, verify)
    if name in ("cifar10", "cifar100"):
        return _cifar(name, root_path, split, download, train_tf, eval_tf)
    return _tinyimagenet(root_path, split, train_tf, eval_tf, verify)
