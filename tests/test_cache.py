"""Teacher cache with augmentation replay: cached distillation equals online distillation
(exactly in float32, within float16 rounding in float16), the stored rows are the teacher's
outputs on the replayed images, top-k replay, DataLoader workers, and every kind of stale
or mismatched cache is rejected with a message naming what differs."""
import json

import numpy as np
import pytest
import torch

from agkd_models.data import cache as cache_module
from agkd_models.data.cache import (CachedTeacherDataset, TeacherCache, TeacherCacheError, cache_identity,
                                    teacher_identity)
from agkd_models.cli import main
from agkd_models.experiments.experiment import cache_teacher, distill
from agkd_models.experiments.pipeline import CACHEABLE, build_data, build_teacher
from agkd_models.config import load_config

TINY = ["data.limit_train=48", "data.limit_val=16", "train.epochs=2", "train.batch_size=16",
        "train.progress=false", "train.device=cpu"]


def config(*extra):
    return load_config("digits", TINY + list(extra))


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """An untrained tiny teacher (weights are all the cache cares about)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(build_teacher(config(), 10).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def caches(teacher_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("caches")
    return {dtype: cache_teacher(config(), str(teacher_file), root / dtype, epochs=2, dtype=dtype)
            for dtype in ("float32", "float16")}


def _teacher(teacher_file):
    teacher = build_teacher(config(), 10)
    teacher.load_state_dict(torch.load(teacher_file, weights_only=True))
    return teacher.eval()


def test_rows_are_the_teacher_on_the_replayed_image(teacher_file, caches):
    train_set = build_data(config()).train
    cache = TeacherCache.open(caches["float32"])
    teacher = _teacher(teacher_file)
    for epoch in range(2):
        for index in (0, 7, 47):
            image, label, params = train_set.sample(index, epoch=epoch)
            np.testing.assert_array_equal(cache.augment_params(index, epoch), params)
            with torch.no_grad():
                out = teacher(image.unsqueeze(0))
            row = cache.teacher_row(index, epoch)
            # The cache ran the teacher on whole batches, this on one image: oneDNN picks
            # its convolution algorithm and summation order by batch size, so the float32
            # values agree to rounding through the network (~1e-6 relative), not bitwise.
            for key, value in (("logits", out.logits[0]), ("attention", out.attention[0])):
                torch.testing.assert_close(row[key], value, rtol=1e-4, atol=1e-5 * value.abs().max().item())
    labels = np.load(caches["float32"] / "labels.npy")
    assert labels.tolist() == [train_set[i][1] for i in range(len(train_set))]
    # The draws differ between epochs (the point of caching several).
    aug = np.load(caches["float32"] / "augment.npy")
    assert (aug[0] != aug[1]).any(axis=1).mean() > 0.9


def test_float16_rows_are_float32_rows_rounded(caches):
    a32, a16 = TeacherCache.open(caches["float32"]).arrays, TeacherCache.open(caches["float16"]).arrays
    assert a16["logits"].dtype == np.float16 and a16["attention"].dtype == np.float16
    np.testing.assert_array_equal(a16["logits"], a32["logits"].astype(np.float16))
    np.testing.assert_array_equal(a16["attention"], a32["attention"].astype(np.float16))
    np.testing.assert_array_equal(a16["augment"], a32["augment"])


def _history(run):
    return [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in run["history"]]


@pytest.mark.parametrize("method", CACHEABLE)
def test_cached_distillation_equals_online(teacher_file, caches, tmp_path, method):
    online = distill(config(f"distill.method={method}"), str(teacher_file), tmp_path / "online")
    cached = distill(config(f"distill.method={method}"), str(teacher_file), tmp_path / "cached",
                     teacher_cache=str(caches["float32"]))
    assert _history(cached) == _history(online)  # float32 storage: exactly the same losses
    for (name, a), (_, b) in zip(online["model"].state_dict().items(), cached["model"].state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("method", ["agkd", "logit"])
def test_float16_cache_gives_the_online_losses_within_rounding(teacher_file, caches, method):
    # Same student, same batch: the online teacher vs the float16 rows of the replayed images.
    from agkd_models.distillers import build_task
    from agkd_models.experiments.pipeline import build_student
    train_set = build_data(config()).train
    data = CachedTeacherDataset(train_set, TeacherCache.open(caches["float16"]))
    data.set_epoch(1)
    images, targets, cached = data.collate_fn([data[i] for i in range(16)])
    torch.manual_seed(0)
    task = build_task(method, _teacher(teacher_file), build_student(config(), 10), config().section(method)).train()
    torch.manual_seed(1)
    online = task(images, targets).terms
    torch.manual_seed(1)
    replayed = task(images, targets, teacher_out=cached).terms
    for key, value in online.items():
        # float16 keeps 11 significant bits: a relative error of at most 2**-11 per value.
        assert float(replayed[key].detach()) == pytest.approx(float(value.detach()), rel=2e-3, abs=1e-4), key


def test_more_epochs_than_cached_replay_cyclically(teacher_file, caches):
    train_set = build_data(config()).train
    data = CachedTeacherDataset(train_set, TeacherCache.open(caches["float32"]))
    data.set_epoch(1)
    image1, _, row1 = data[5]
    data.set_epoch(3)
    image3, _, row3 = data[5]
    assert torch.equal(image1, image3) and torch.equal(row1["logits"], row3["logits"])


def test_workers_read_the_same_rows(caches):
    train_set = build_data(config()).train
    data = CachedTeacherDataset(train_set, TeacherCache.open(caches["float16"]))
    data.set_epoch(1)
    batches = [list(torch.utils.data.DataLoader(data, batch_size=16, num_workers=workers,
                                                collate_fn=data.collate_fn)) for workers in (0, 2)]
    for (i0, y0, t0), (i2, y2, t2) in zip(*batches):
        assert torch.equal(i0, i2) and torch.equal(y0, y2)
        assert torch.equal(t0.logits, t2.logits) and torch.equal(t0.attention, t2.attention)
        assert t0.logits.dtype == torch.float32


def test_topk_keeps_the_largest_logits_and_minus_inf_elsewhere(teacher_file, caches, tmp_path):
    path = cache_teacher(config(), str(teacher_file), tmp_path / "top3", epochs=1, dtype="float32", topk=3)
    full, top = TeacherCache.open(caches["float32"]), TeacherCache.open(path)
    assert np.load(path / "topk_indices.npy").dtype == np.int16
    for index in (0, 11):
        logits, want = top.teacher_row(index, 0)["logits"], full.teacher_row(index, 0)["logits"]
        finite = torch.isfinite(logits)
        assert int(finite.sum()) == 3
        assert set(finite.nonzero().flatten().tolist()) == set(want.topk(3).indices.tolist())
        assert torch.equal(logits[finite], want[finite])
    run = distill(config("train.epochs=1", "distill.method=agkd"), str(teacher_file), tmp_path / "run",
                  teacher_cache=str(path))
    assert np.isfinite(run["history"][-1]["train_loss"])


# ---------------------------------------------------------------- stale or mismatched


def _expect(teacher_file, *extra):
    train_set = build_data(config(*extra)).train
    return cache_identity(train_set, teacher_identity(_teacher(teacher_file), config(*extra).teacher.to_dict()))


def test_matching_identity_opens(teacher_file, caches):
    TeacherCache.open(caches["float16"], expect=_expect(teacher_file))


@pytest.mark.parametrize("extra,words", [
    (["data.limit_train=40"], "number of training samples differs"),
    (["data.val_fraction=0.3"], "training data"),
    (["data.split_seed=1"], "training data"),  # another split, another subset
    (["train.seed=1"], "augmentation settings differ"),  # same samples, other draws
    (["data.flip=true"], "augmentation settings differ"),
    (["teacher.combine=concat"], "teacher differs"),
])
def test_other_data_augmentation_or_teacher_is_rejected(teacher_file, caches, extra, words):
    with pytest.raises(TeacherCacheError, match=words):
        TeacherCache.open(caches["float16"], expect=_expect(teacher_file, *extra))


def test_other_teacher_weights_are_rejected(teacher_file, caches, tmp_path):
    state = torch.load(teacher_file, weights_only=True)
    state["fuse.bias"] = state["fuse.bias"] + 1e-6
    other = tmp_path / "other.pt"
    torch.save(state, other)
    with pytest.raises(TeacherCacheError, match="teacher differs"):
        TeacherCache.open(caches["float16"], expect=_expect(other))


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_broken_caches_are_rejected(caches, tmp_path):
    with pytest.raises(TeacherCacheError, match="no manifest.json"):
        TeacherCache.open(tmp_path / "nothing")
    old = _copy(caches["float16"], tmp_path / "old")
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["version"] = 0
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TeacherCacheError, match="format version 0; this agkd reads versions 1, 2"):
        TeacherCache.open(old)
    short = _copy(caches["float16"], tmp_path / "short")
    data = (short / "logits.npy").read_bytes()
    (short / "logits.npy").write_bytes(data[: len(data) // 2])
    with pytest.raises(TeacherCacheError, match="logits"):
        TeacherCache.open(short)
    wrong = _copy(caches["float16"], tmp_path / "wrong")
    np.save(wrong / "attention.npy", np.zeros((2, 48, 1, 2, 2), np.float16))
    with pytest.raises(TeacherCacheError, match=r"attention.npy holds float16 \[2, 48, 1, 2, 2\]"):
        TeacherCache.open(wrong)


def test_changed_values_are_detected_by_their_checksum(caches, tmp_path):
    zeroed = _copy(caches["float32"], tmp_path / "zeroed")
    logits = np.load(zeroed / "logits.npy")
    np.save(zeroed / "logits.npy", np.zeros_like(logits))  # same shape and dtype, manifest untouched
    with pytest.raises(TeacherCacheError, match=r"field 'logits' \(logits.npy\) changed after the cache was written"):
        TeacherCache.open(zeroed)
    TeacherCache.open(zeroed, verify=False)  # the shapes alone still pass: the checksum is what caught it


def test_a_version_1_cache_loads_unverified_with_a_warning(caches, tmp_path):
    old = _copy(caches["float32"], tmp_path / "v1")
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["version"] = 1
    for spec in manifest["fields"].values():
        del spec["sha256"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="no checksums: its values cannot be verified. Rebuild it"):
        cache = TeacherCache.open(old)
    np.testing.assert_array_equal(cache.arrays["logits"], TeacherCache.open(caches["float32"]).arrays["logits"])


def test_an_out_of_range_augmentation_record_is_one_line(teacher_file, caches, tmp_path, capsys):
    bad = _copy(caches["float32"], tmp_path / "bad")
    augment = np.load(bad / "augment.npy")
    augment[0, 5] = [30, 30, 20, 20, 0]  # a 20x20 box at (30, 30) of a 32x32 image
    np.save(bad / "augment.npy", augment)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["fields"]["augment"]["sha256"] = cache_module._sha256(bad / "augment.npy")  # consistent, but wrong
    (bad / "manifest.json").write_text(json.dumps(manifest))
    args = ["distill", "--teacher", str(teacher_file), "--teacher-cache", str(bad), "--out", str(tmp_path / "run")]
    capsys.readouterr()
    assert main(args + [a for t in TINY for a in ("--set", t)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "augment.npy, epoch 0" in lines[0] and "(30, 30, 20, 20, 0) does not fit sample 5, a 32x32 image" in lines[0]


def test_a_mismatch_names_the_differing_field_in_full(teacher_file, caches):
    with pytest.raises(TeacherCacheError) as info:
        TeacherCache.open(caches["float16"], expect=_expect(teacher_file, "train.seed=7"))
    assert "seed: cache 0, this run 7" in str(info.value)


def test_writer_is_atomic_and_refuses_to_overwrite(teacher_file, caches, tmp_path, monkeypatch):
    with pytest.raises(TeacherCacheError, match="exists; pass --overwrite"):
        cache_teacher(config(), str(teacher_file), caches["float16"], epochs=1)
    # A teacher whose logits float16 cannot hold: the writer stops, nothing appears, and
    # an existing cache being overwritten stays intact.
    state = torch.load(teacher_file, weights_only=True)
    state["fuse.bias"] = state["fuse.bias"] + 1e5
    loud = tmp_path / "loud.pt"
    torch.save(state, loud)
    with pytest.raises(TeacherCacheError, match="beyond float16"):
        cache_teacher(config(), str(loud), tmp_path / "new", epochs=1)
    assert not (tmp_path / "new").exists()
    target = _copy(caches["float16"], tmp_path / "target")
    before = (target / "logits.npy").read_bytes()
    with pytest.raises(TeacherCacheError, match="beyond float16"):
        cache_teacher(config(), str(loud), target, epochs=1, overwrite=True)
    assert (target / "logits.npy").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no partial folders left


def test_cli_cache_errors_are_clear(teacher_file, caches, tmp_path, capsys):
    args = ["--teacher", str(teacher_file), "--out", str(tmp_path / "x")] + [a for t in TINY for a in ("--set", t)]
    assert main(["distill", "--method", "cakd", "--teacher-cache", str(caches["float16"])] + args) == 2
    assert "needs the online teacher" in capsys.readouterr().err
    assert main(["distill", "--teacher-cache", str(caches["float16"]), "--set", "train.seed=3"] + args) == 2
    assert "does not match this run" in capsys.readouterr().err
    args[3] = str(tmp_path / "cache")
    with pytest.raises(SystemExit) as refused:  # argparse: an integer >= 1
        main(["cache-teacher", "--epochs", "0"] + args)
    assert refused.value.code == 2 and "expected an integer >= 1, got 0" in capsys.readouterr().err
    assert main(["cache-teacher", "--epochs", "1", "--topk", "10"] + args) == 2
    assert "topk must be in [1, 9]" in capsys.readouterr().err


def test_cache_identity_needs_replayable_augmentation(teacher_file):
    val_set = build_data(config()).val
    with pytest.raises(TeacherCacheError, match="AugmentedDataset"):
        cache_identity(val_set, teacher_identity(_teacher(teacher_file), config().teacher.to_dict()))
    assert cache_module.CACHE_VERSION == 2


def test_teacher_fingerprint_covers_batch_norm_counters():
    from agkd_models.data.cache import teacher_fingerprint
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))  # num_batches_tracked is 0-d
    before = teacher_fingerprint(net, {})
    net[1].num_batches_tracked += 1
    assert teacher_fingerprint(net, {}) != before
