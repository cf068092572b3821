"""Data sets: the embedded digits, ImageFolder trees (train/val folders or a split),
TinyImageNet's layout, CIFAR roots, clear errors for missing or malformed roots, and
unreadable images skipped with a counted warning."""
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from agkd_models.data.datasets import DataError, build_datasets


def write_image(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (12, 10, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _digit_rows(dataset):
    """Each sample's image bytes, to compare splits by content rather than by index."""
    base = dataset.base if hasattr(dataset, "base") else dataset
    return {bytes(img.numpy().tobytes()) + bytes([int(y)]) for img, y in zip(base.images, base.labels)}


def test_digits_split_is_stratified_fixed_and_normalised():
    splits = build_datasets("digits", image_size=24, val_fraction=0.2, seed=0)
    again = build_datasets("digits", image_size=24, val_fraction=0.2, seed=0)
    assert splits.num_classes == 10 and len(splits.train) + len(splits.val) + len(splits.test) == 1797
    assert (len(splits.val), len(splits.test)) == (360, 360) and not splits.test_is_val
    assert torch.equal(splits.val.labels, again.val.labels) and torch.equal(splits.test.labels, again.test.labels)
    for part in (splits.val, splits.test):
        counts = torch.bincount(part.labels, minlength=10).float()
        assert counts.min() / counts.max() > 0.9  # stratified
    image, label = splits.val[0]
    assert image.shape == (3, 24, 24) and image.dtype == torch.float32 and 0 <= label < 10
    torch.manual_seed(0)
    assert splits.train[0][0].shape == (3, 24, 24)


def test_folder_with_train_and_val(tmp_path):
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            for i in range(3):
                write_image(tmp_path / split / c / f"{i}.png", i)
    splits = build_datasets("folder", str(tmp_path), image_size=16)
    assert splits.classes == ["cat", "dog"] and len(splits.train) == 6 and len(splits.val) == 6
    image, label = splits.val[5]
    assert image.shape == (3, 16, 16) and label == 1


def test_folder_split_by_fraction_and_corrupt_images_skipped(tmp_path):
    for c in ("a", "b", "c"):
        for i in range(5):
            write_image(tmp_path / c / f"{i}.jpg", i)
    (tmp_path / "b" / "broken.jpg").write_bytes(b"not an image")
    with pytest.warns(UserWarning, match=r"1 unreadable image\(s\)"):
        splits = build_datasets("folder", str(tmp_path), image_size=16, val_fraction=0.4)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 6, 3)
    for dataset in (splits.train, splits.val, splits.test):
        for i in range(len(dataset)):
            assert dataset[i][0].shape == (3, 16, 16)


@pytest.mark.parametrize("make,words", [
    (lambda root: None, ["does not exist", "ROOT/train/<class>"]),
    (lambda root: root.mkdir(), ["no class sub-folders"]),
    (lambda root: (root / "a").mkdir(parents=True), ["no images"]),
])
def test_folder_errors_name_the_path_and_layout(tmp_path, make, words):
    root = tmp_path / "data"
    make(root)
    with pytest.raises(DataError) as info:
        build_datasets("folder", str(root))
    assert str(root) in str(info.value)
    for word in words:
        assert word in str(info.value)


def test_tinyimagenet_layout(tmp_path):
    (tmp_path / "wnids.txt").write_text("n01\nn02\n")
    for wnid in ("n01", "n02"):
        for i in range(2):
            write_image(tmp_path / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", i)
    for i in range(2):
        write_image(tmp_path / "val" / "images" / f"val_{i}.JPEG", i)
    (tmp_path / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn02\t0\t0\t1\t1\nval_1.JPEG\tn01\t0\t0\t1\t1\n")
    splits = build_datasets("tinyimagenet", str(tmp_path), image_size=16)
    assert splits.classes == ["n01", "n02"] and len(splits.train) + len(splits.val) == 4
    assert [splits.test[i][1] for i in range(2)] == [1, 0]  # the official val split is the test set
    (tmp_path / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99\n")
    with pytest.raises(DataError, match="val_annotations.txt:1"):
        build_datasets("tinyimagenet", str(tmp_path))
    (tmp_path / "wnids.txt").unlink()
    with pytest.raises(DataError, match="wnids.txt is missing"):
        build_datasets("tinyimagenet", str(tmp_path))


def test_cifar_without_data_is_a_clear_error_and_no_download(tmp_path):
    with pytest.raises(DataError, match=r"cifar10: no valid data set .*--download"):
        build_datasets("cifar10", str(tmp_path))
    assert not any(tmp_path.iterdir())  # nothing fetched


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown data set 'imagenet'"):
        build_datasets("imagenet", "/tmp")


def test_augmentation_draws_are_fixed_per_sample_and_epoch():
    from agkd_models.data.datasets import AugmentedDataset, limit
    splits = build_datasets("digits", image_size=24, seed=0, flip=True)
    train = splits.train
    assert isinstance(train, AugmentedDataset)
    a, _, pa = train.sample(3, epoch=1)
    b, _, pb = train.sample(3, epoch=1)
    assert np.array_equal(pa, pb) and torch.equal(a, b)           # same (sample, epoch): same draw
    draws = np.stack([train.sample(i, epoch=e)[2] for i in range(40) for e in range(2)])
    assert len({tuple(d) for d in draws}) > 70                     # and different ones otherwise
    assert 0.3 < draws[:, 4].mean() < 0.7                          # flip about half the time
    h, w = 24, 24
    top, left, ch, cw = draws[:, 0], draws[:, 1], draws[:, 2], draws[:, 3]
    assert (top >= 0).all() and (left >= 0).all() and (top + ch <= h).all() and (left + cw <= w).all()
    area = ch * cw / (h * w)
    assert area.min() >= 0.6 - 0.1 and area.max() <= 1.0            # scale (0.6, 1), rounding aside
    # Replay renders a stored draw exactly; the worker count changes nothing.
    replay, _, _ = train.sample(3, params=pa)
    assert torch.equal(replay, a)
    train.set_epoch(1)
    loaded = [torch.cat([x for x, _ in torch.utils.data.DataLoader(train, batch_size=8, num_workers=n)])
              for n in (0, 2)]
    assert torch.equal(loaded[0], loaded[1]) and torch.equal(loaded[0][3], a)
    # limit() keeps an augmented set, indexed from 0.
    small = limit(train, 10, seed=0)
    assert isinstance(small, AugmentedDataset) and len(small) == 10


def test_replayed_crop_matches_torchvision():
    from torchvision.transforms.v2 import functional as TF
    from agkd_models.data.datasets import IMAGENET_MEAN, IMAGENET_STD, ReplayableAugment
    image = torch.randint(0, 256, (3, 40, 30), dtype=torch.uint8)
    out = ReplayableAugment(16).apply(image, [5, 3, 20, 25, 1])
    want = TF.horizontal_flip(TF.resized_crop(image, 5, 3, 20, 25, [16, 16], antialias=True))
    want = TF.normalize(want.float() / 255, IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(out, want)
    # Impossible aspect ratios fall back to the largest centred crop of an allowed ratio.
    params = ReplayableAugment(16, scale=(1.0, 1.0), ratio=(1.0, 1.0)).draw(np.random.default_rng(0), 40, 10)
    assert params[:4].tolist() == [15, 0, 10, 10]


def test_fingerprint_tracks_samples_labels_and_subsets():
    from agkd_models.data.datasets import fingerprint, limit
    a = build_datasets("digits", image_size=24, seed=0)
    b = build_datasets("digits", image_size=24, seed=0)
    c = build_datasets("digits", image_size=24, seed=0, split_seed=1)
    assert fingerprint(a.train) == fingerprint(b.train) != fingerprint(c.train)
    assert fingerprint(limit(a.train, 10, 0)) != fingerprint(limit(a.train, 10, 1))
    b.train.base.labels[0] = (b.train.base.labels[0] + 1) % 10
    assert fingerprint(a.train) != fingerprint(b.train)


def test_three_way_split_is_disjoint_complete_and_depends_only_on_split_seed():
    a = build_datasets("digits", image_size=16, split_seed=0, seed=0)
    b = build_datasets("digits", image_size=16, split_seed=0, seed=7)  # another training seed
    c = build_datasets("digits", image_size=16, split_seed=1, seed=0)
    assert len(a.train) + len(a.val) + len(a.test) == 1797  # disjointness: test_three_way_split_indices...
    for x, y in ((a.train, b.train), (a.val, b.val), (a.test, b.test)):
        assert _digit_rows(x) == _digit_rows(y)  # train.seed does not move samples between splits
    assert _digit_rows(a.test) != _digit_rows(c.test)


def test_three_way_split_indices_are_disjoint_and_cover_everything():
    from agkd_models.data.datasets import three_way_split
    labels = [i % 4 for i in range(103)]
    train, val, test = three_way_split(labels, 0.2, 0.25, seed=3)
    assert sorted(train + val + test) == list(range(103))
    assert len(set(train) | set(val) | set(test)) == 103
    assert (len(val), len(test)) == (21, 26)
    assert three_way_split(labels, 0.2, 0.25, seed=3) == (train, val, test)
    assert three_way_split(labels, 0.2, 0.25, seed=4) != (train, val, test)
    with pytest.raises(DataError, match="val_fraction \\+ data.test_fraction must be < 1"):
        three_way_split(labels, 0.6, 0.4, seed=0)


def test_folder_with_train_and_val_only_uses_val_as_test(tmp_path):
    for split in ("train", "val"):
        for c in ("a", "b"):
            write_image(tmp_path / split / c / "0.jpg", 1)
    splits = build_datasets("folder", str(tmp_path), image_size=16)
    assert splits.test_is_val and splits.test is splits.val



def truncated_jpeg(path, seed):
    write_image(path.with_suffix(".png"), seed)
    full = path.with_suffix(".full.jpg")
    Image.open(path.with_suffix(".png")).resize((64, 64)).save(full, quality=95)
    path.with_suffix(".png").unlink()
    data = full.read_bytes()
    full.unlink()
    path.write_bytes(data[: len(data) // 2])  # the header is intact: Image.verify() passes it


def test_a_truncated_jpeg_is_skipped_and_counted_not_a_crash_in_training(tmp_path):
    for c in ("a", "b"):
        for i in range(5):
            write_image(tmp_path / c / f"{i}.png", i)
    truncated_jpeg(tmp_path / "a" / "cut.jpg", 9)
    with Image.open(tmp_path / "a" / "cut.jpg") as image:
        image.verify()  # what the check used to do: the truncated file passed it
    with pytest.warns(UserWarning, match=r"1 unreadable image\(s\)"):
        splits = build_datasets("folder", str(tmp_path), image_size=16, val_fraction=0.2, test_fraction=0.2)
    files = [path for part in (splits.train.base, splits.val, splits.test) for path, _ in part.samples]
    assert len(files) == 10 and not any(path.endswith("cut.jpg") for path in files)


def junk(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"junk")


@pytest.mark.parametrize("make,words", [
    (lambda root: [junk(root / c / "x.jpg") for c in ("a", "b")], ["no readable image"]),
    (lambda root: [write_image(root / "only" / f"{i}.png", i) for i in range(6)], ["1 class (only)", "at least 2"]),
    (lambda root: ([write_image(root / c / f"{i}.png", i) for c in ("a", "b") for i in range(4)],
                   junk(root / "c" / "x.png")), ["class folder(s) c under", "no readable image"]),
])
def test_data_that_cannot_train_a_classifier_is_refused(tmp_path, make, words):
    make(tmp_path)
    with pytest.raises(DataError) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the count of unreadable files; the error is what matters
        build_datasets("folder", str(tmp_path), image_size=16)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_digits_are_enlarged_when_read_not_up_front():
    splits = build_datasets("digits", image_size=1024)
    assert splits.train.base.images.shape[-2:] == (8, 8)  # the stored images stay 8x8
    image, _ = splits.val[0]
    assert image.shape == (3, 1024, 1024)
