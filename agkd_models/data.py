"""Data sets for the trainer: the embedded scikit-learn digits (no download), any
ImageFolder tree, CIFAR-10/100 in torchvision's on-disk format and TinyImageNet-200 in its
released layout. Nothing downloads unless ``download=True``; a missing or malformed root
is a ``DataError`` naming the path and the layout that was expected; unreadable images
are skipped with one counted warning.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

__all__ = ["DataError", "DataSplits", "build_datasets", "train_transform", "eval_transform",
           "IMAGENET_MEAN", "IMAGENET_STD", "DATASETS"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
DATASETS = ("digits", "folder", "cifar10", "cifar100", "tinyimagenet")


class DataError(ValueError):
    """A data root that is missing or not laid out as the data set expects."""


@dataclass
class DataSplits:
    train: Dataset
    val: Dataset
    classes: List[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def train_transform(size: int, *, flip: bool = True, scale: Tuple[float, float] = (0.6, 1.0)):
    """Random resized crop (and horizontal flip), ImageNet normalisation."""
    from torchvision.transforms import v2
    steps = [v2.ToImage(), v2.RandomResizedCrop(size, scale=scale, antialias=True)]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


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
            image = image.convert("RGB")
        return (self.transform(image) if self.transform else image), label


class _Tensors(Dataset):
    """(image, label) pairs from in-memory uint8 images (N, 3, H, W)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Optional[Callable]):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index]
        return (self.transform(image) if self.transform else image), int(self.labels[index])


def _readable(samples: List[Tuple[str, int]], root: Path) -> List[Tuple[str, int]]:
    """Drops files PIL cannot decode, with one warning that counts them."""
    from PIL import Image
    kept, bad = [], []
    for path, label in samples:
        try:
            with Image.open(path) as image:
                image.verify()
            kept.append((path, label))
        except Exception:  # any decoder failure means the file is unusable
            bad.append(path)
    if bad:
        warnings.warn(f"{len(bad)} unreadable image(s) under {root} skipped (first: {bad[0]})", stacklevel=3)
    return kept


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
            samples += [(os.path.join(dirpath, f), label) for f in sorted(files)
                        if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not samples:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}; expected {layout}")
    return samples


def _split(n: int, labels: Sequence[int], val_fraction: float, seed: int):
    from sklearn.model_selection import train_test_split
    index = list(range(n))
    return train_test_split(index, test_size=val_fraction, random_state=seed, stratify=list(labels))


def _digits(image_size: int, val_fraction: float, seed: int, train_tf, eval_tf) -> DataSplits:
    from sklearn.datasets import load_digits
    import torch.nn.functional as F
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.tensor(digits.target)
    train_idx, val_idx = _split(len(labels), labels.tolist(), val_fraction, seed)
    return DataSplits(_Tensors(images[train_idx], labels[train_idx], train_tf),
                      _Tensors(images[val_idx], labels[val_idx], eval_tf), [str(c) for c in range(10)])


def _folder(root: Path, val_fraction: float, seed: int, train_tf, eval_tf, verify: bool) -> DataSplits:
    layout = ("ROOT/train/<class>/*.jpg and ROOT/val/<class>/*.jpg, or ROOT/<class>/*.jpg "
              "split by val_fraction")
    if (root / "train").is_dir() and (root / "val").is_dir():
        classes = _class_folders(root / "train", layout)
        val_classes = _class_folders(root / "val", layout)
        if val_classes != classes:
            raise DataError(f"{root}/train and {root}/val have different class folders "
                            f"({len(classes)} vs {len(val_classes)}); expected {layout}")
        train = _scan(root / "train", classes, layout)
        val = _scan(root / "val", classes, layout)
        if verify:
            train, val = _readable(train, root / "train"), _readable(val, root / "val")
        return DataSplits(_Samples(train, train_tf), _Samples(val, eval_tf), classes)
    classes = _class_folders(root, layout)
    samples = _scan(root, classes, layout)
    if verify:
        samples = _readable(samples, root)
    train_idx, val_idx = _split(len(samples), [s[1] for s in samples], val_fraction, seed)
    return DataSplits(_Samples([samples[i] for i in train_idx], train_tf),
                      _Samples([samples[i] for i in val_idx], eval_tf), classes)


def _cifar(name: str, root: Path, download: bool, train_tf, eval_tf) -> DataSplits:
    from torchvision import datasets
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    try:
        train = cls(str(root), train=True, transform=train_tf, download=download)
        val = cls(str(root), train=False, transform=eval_tf, download=download)
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
        raise DataError(f"{name}: no valid data set under {root} (expected torchvision's {root}/{folder}/ "
                        f"python-pickle batches); pass --download to fetch it") from exc
    return DataSplits(train, val, list(train.classes))


def _tinyimagenet(root: Path, train_tf, eval_tf, verify: bool) -> DataSplits:
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
    return DataSplits(_Samples(train, train_tf), _Samples(val, eval_tf), classes)


def build_datasets(name: str, root: Optional[str] = None, *, image_size: int = 224,
                   val_fraction: float = 0.2, seed: int = 0, download: bool = False,
                   flip: bool = True, verify: bool = True) -> DataSplits:
    """Train and validation sets of ``name`` (see :data:`DATASETS`) with the standard
    augmentation for training and resize/center-crop for validation."""
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    train_tf, eval_tf = train_transform(image_size, flip=flip), eval_transform(image_size)
    if name == "digits":
        return _digits(image_size, val_fraction, seed, train_tf, eval_tf)
    if root is None:
        raise DataError(f"data set {name!r} needs a data root")
    root_path = Path(root).expanduser()
    if name == "folder":
        return _folder(root_path, val_fraction, seed, train_tf, eval_tf, verify)
    if name in ("cifar10", "cifar100"):
        return _cifar(name, root_path, download, train_tf, eval_tf)
    return _tinyimagenet(root_path, train_tf, eval_tf, verify)
