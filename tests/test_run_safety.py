"""What a careless or hostile user can do to a run and its files, and what agkd does
instead of losing data or printing a traceback: folders that are not agkd's, inputs that
``--overwrite`` would delete, a teacher cache whose manifest lies, batches of one sample,
writes that fail, resumes that would change the run, odd image files, and settings this
machine cannot honour. Each promise about the command is checked on the command: its exit
status, its one line, and which files exist afterwards."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from agkd_models.cli import main
from agkd_models.data.cache import TeacherCache, TeacherCacheError
from agkd_models.data.datasets import to_rgb
from agkd_models.engine import checkpoint as ckpt
from agkd_models.engine.run_folder import remove_stale_temporaries
from agkd_models.engine.trainer import _batchnorm_eval_if_single

from .commands import TINY, agkd_folder, assert_one_line_error, run_cli, teacher_file  # noqa: F401 (a fixture)

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))


def snapshot(folder: Path):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished one-epoch teacher run and a 1-epoch cache of it (copy before changing)."""
    root = tmp_path_factory.mktemp("trained")
    assert main(["train-teacher", "--out", str(root / "teacher")] + TINY) == 0
    assert main(["cache-teacher", "--teacher", str(root / "teacher" / "teacher.pt"), "--epochs", "1",
                 "--out", str(root / "cache")] + TINY) == 0
    return root


def copy_tree(src: Path, dst: Path) -> Path:
    for p in src.rglob("*"):
        target = dst / p.relative_to(src)
        if p.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(p.read_bytes())
    return dst


# ------------------------------------------------------------ the user's own folders


@pytest.mark.parametrize("command", [["train-teacher"], ["compare", "--seeds", "1", "--methods", "none"],
                                     ["demo", "--teacher-epochs", "1", "--student-epochs", "1"]])
def test_a_folder_of_the_users_own_files_is_never_written_into(tmp_path, capsys, command):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "config.yaml").write_text("my: own\n")
    (out / "report.md").write_text("# chapter 3\n")
    before = snapshot(out)
    for extra in ([], ["--overwrite"] if command[0] == "train-teacher" else []):
        assert_one_line_error(capsys, command + ["--out", str(out)] + extra + TINY, "agkd did not write",
                              "config.yaml", "report.md")
    assert snapshot(out) == before


def test_an_empty_folder_is_taken(tmp_path, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    code, lines = run_cli(capsys, "train-teacher", "--out", str(out), *TINY)
    assert code == 0, lines
    assert (out / "teacher.pt").is_file() and (out / ".agkd-run").read_text().strip() == "train-teacher"


def test_compare_into_a_teacher_run_is_refused_and_its_config_kept(trained, tmp_path, capsys):
    teacher = copy_tree(trained / "teacher", tmp_path / "teacher")
    before = snapshot(teacher)
    assert_one_line_error(capsys, ["compare", "--out", str(teacher), "--methods", "none", "--seeds", "1",
                                   "--teacher", str(teacher / "teacher.pt")] + TINY,
                          "holds a train-teacher run", "this is compare")
    assert snapshot(teacher) == before


def test_distill_overwrite_into_the_teachers_folder_keeps_the_teacher(trained, tmp_path, capsys):
    teacher = copy_tree(trained / "teacher", tmp_path / "teacher")
    before = snapshot(teacher)
    assert_one_line_error(capsys, ["distill", "--teacher", str(teacher / "teacher.pt"), "--out", str(teacher),
                                   "--overwrite", "--method", "logit"] + TINY,
                          "would delete", "teacher.pt", "--teacher")
    assert snapshot(teacher) == before


def test_cache_overwrite_replaces_only_a_cache(trained, tmp_path, capsys):
    teacher = copy_tree(trained / "teacher", tmp_path / "teacher")
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "draft.tex").write_text("\\chapter{}")
    for out, words in ((thesis, ["is not a teacher cache", "never another folder"]),
                       (teacher, ["holds the teacher"])):
        before = snapshot(out)
        assert_one_line_error(capsys, ["cache-teacher", "--teacher", str(teacher / "teacher.pt"), "--epochs", "1",
                                       "--out", str(out), "--overwrite"] + TINY, *words)
        assert snapshot(out) == before
    cache = copy_tree(trained / "cache", tmp_path / "cache")  # a cache is replaced
    code, lines = run_cli(capsys, "cache-teacher", "--teacher", str(teacher / "teacher.pt"), "--epochs", "2",
                          "--out", str(cache), "--overwrite", *TINY)
    assert code == 0, lines
    assert TeacherCache.open(cache).epochs == 2


def image_folder(root: Path, per_class=10):
    for label in ("cat", "dog"):
        for i in range(per_class):
            (root / label).mkdir(parents=True, exist_ok=True)
            pixels = np.random.default_rng(i + 100 * (label == "dog")).integers(0, 255, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    return root


def test_out_inside_the_data_set_or_the_root_is_refused(tmp_path, capsys):
    data = image_folder(tmp_path / "data")
    folder = ["--set", "data.name=folder", "--set", f"data.root={data}"]
    for out, words in ((data / "cat" / "run", ["inside the data set's folder", "training images"]),
                       (tmp_path, ["holds the data set's folder"])):
        assert_one_line_error(capsys, ["train-teacher", "--out", str(out)] + TINY + folder, *words)
    assert sorted(p.name for p in (data / "cat").iterdir()) == sorted(f"{i}.png" for i in range(10))
    assert_one_line_error(capsys, ["train-teacher", "--out", "/"] + TINY, "root of the file system")
    assert_one_line_error(capsys, ["train-teacher", "--out", str(Path.home())] + TINY, "home folder")


def test_an_uncreatable_out_is_one_line(capsys):
    assert_one_line_error(capsys, ["train-teacher", "--out", "/proc/agkd-cannot-be-here/run"] + TINY,
                          "cannot create the folder")


def test_a_path_too_long_for_the_file_system_is_one_line(tmp_path, capsys):
    long = tmp_path / ("x" * 5000)
    for argv in (["train-teacher", "--out", str(long)], ["distill", "--teacher", str(long), "--out",
                                                          str(tmp_path / "s")]):
        line = assert_one_line_error(capsys, argv + TINY)
        assert "name too long" in line.lower(), line


# ------------------------------------------------------------- interrupted writes


def test_killed_writes_leave_no_temporaries_behind(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    folder = agkd_folder(tmp_path / "run")
    stale = [folder / f".checkpoint.pt.new-{dead}", folder / f"..checkpoint.pt.new-{dead}.tmp-{dead}",
             folder / f".teacher.pt.tmp-{dead}"]
    live = folder / f".checkpoint.pt.tmp-{os.getppid()}"  # a live process's write is left alone
    for p in stale + [live]:
        p.write_bytes(b"partial")
    (folder / "notes.tmp-1").write_text("not ours")
    remove_stale_temporaries(folder)
    assert not any(p.exists() for p in stale) and live.exists() and (folder / "notes.tmp-1").exists()


def test_a_failed_checkpoint_write_is_one_line_and_the_epoch_is_not_logged(tmp_path, capsys, monkeypatch):
    def full_disk(obj, f, *args, **kwargs):
        f.write(b"PK\3\4 partial")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    out = tmp_path / "run"
    assert_one_line_error(capsys, ["train-teacher", "--out", str(out)] + TINY,
                          "could not write the checkpoint of epoch 1", "--resume")
    assert not (out / "metrics.jsonl").exists() and not (out / "teacher.pt").exists()
    assert [p.name for p in out.iterdir() if ".tmp-" in p.name or ".new-" in p.name] == []


def test_a_failed_teacher_write_keeps_the_old_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "teacher.pt"
    ckpt.atomic_save({"w": torch.ones(3)}, path)
    before = path.read_bytes()

    def enospc(obj, f, *args, **kwargs):
        f.write(b"PK")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", enospc)
    with pytest.raises(ckpt.CheckpointError, match="could not write the teacher .*No space left on device"):
        ckpt.save_file({"w": torch.zeros(3)}, path, "the teacher")
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["teacher.pt"]


def test_a_cache_that_does_not_fit_on_the_disk_fails_before_any_mapped_write(trained, tmp_path, capsys,
                                                                             monkeypatch):
    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    out = tmp_path / "cache"
    assert_one_line_error(capsys, ["cache-teacher", "--teacher", str(trained / "teacher" / "teacher.pt"),
                                   "--epochs", "1", "--out", str(out)] + TINY,
                          "could not write the teacher cache", "No space left on device", "nothing was cached")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------ the teacher cache's manifest


def _outside(cache, m):
    (cache.parent / "elsewhere.npy").write_bytes((cache / "logits.npy").read_bytes())
    m["fields"]["logits"]["file"] = "../elsewhere.npy"


@pytest.mark.parametrize("edit, words", [
    (_outside, ["'logits'", "../elsewhere.npy", "inside the cache folder"]),
    (lambda c, m: m["fields"]["logits"].update(file=str(c / "logits.npy")), ["'logits'", "names the file"]),
    (lambda c, m: [f.pop("sha256") for f in m["fields"].values()], ["no SHA-256"]),
    (lambda c, m: m.update(epochs=3), ["epochs=3"]),
    (lambda c, m: m.update(topk=2), ["topk=2"]),
    (lambda c, m: m.pop("num_classes"), ["'num_classes'"]),
    (lambda c, m: m.update(epochs="1"), ["'epochs'", "not an integer"]),
    (lambda c, m: m["fields"].pop("attention"), ["lists the fields"]),
    (lambda c, m: (c / "manifest.json").write_text("[1, 2]"), ["JSON list"]),
    (lambda c, m: (c / "manifest.json").write_bytes(b"\xff\xfe{}"), ["not UTF-8"]),
])
def test_a_manifest_that_lies_is_refused_by_name(trained, tmp_path, edit, words):
    cache = copy_tree(trained / "cache", tmp_path / "cache")
    manifest = json.loads((cache / "manifest.json").read_text())
    before = (cache / "manifest.json").read_bytes()
    edit(cache, manifest)
    if (cache / "manifest.json").read_bytes() == before:  # the edit changed the parsed manifest only
        (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TeacherCacheError) as caught:
        TeacherCache.open(cache)
    for word in words:
        assert word in str(caught.value), (word, str(caught.value))


def test_a_field_file_that_is_a_fifo_is_refused_not_waited_on(trained, tmp_path):
    cache = copy_tree(trained / "cache", tmp_path / "cache")
    (cache / "attention.npy").unlink()
    os.mkfifo(cache / "attention.npy")
    code = f"from agkd_models.data.cache import TeacherCache\nTeacherCache.open({str(cache)!r})"
    done = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "not a regular file" in done.stderr, done.stderr[-500:]


# ------------------------------------------------------------------- batches of one


@pytest.mark.parametrize("settings", [["--set", "data.limit_train=17"],
                                      ["--set", "train.batch_size=1", "--set", "data.limit_train=2"],
                                      ["--set", "data.limit_train=1"]])
def test_a_batch_of_one_sample_trains(trained, tmp_path, capsys, settings):
    code, lines = run_cli(capsys, "train-teacher", "--out", str(tmp_path / "t"), *TINY, *settings)
    assert code == 0, lines
    code, lines = run_cli(capsys, "distill", "--teacher", str(trained / "teacher" / "teacher.pt"), "--method",
                          "agkd", "--out", str(tmp_path / "s"), *TINY, *settings)
    assert code == 0, lines


def test_a_batch_of_one_leaves_the_running_statistics_and_modes_alone():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                              torch.nn.Linear(4, 2), torch.nn.BatchNorm1d(2))
    net.train()
    net[4].eval()  # a layer the task keeps in eval mode stays so
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with _batchnorm_eval_if_single(net, 1):
        assert not net[1].training
        net(torch.randn(1, 3, 1, 1)).sum().backward()
    assert net[1].training and not net[4].training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    with _batchnorm_eval_if_single(net, 2):
        net(torch.randn(2, 3, 1, 1))
    assert not torch.equal(before["1.running_mean"], net[1].running_mean)  # larger batches update them


# ---------------------------------------------------------- resume checks that held


def test_resume_checks_the_checkpoint_even_without_config_yaml(trained, tmp_path, capsys):
    out = copy_tree(trained / "teacher", tmp_path / "run")
    (out / "config.yaml").unlink()
    for change, words in ((["--set", "train.lr=0.5"], ["train.lr"]),
                          (["--set", "train.optimizer=sgd"], ["train.optimizer"])):
        assert_one_line_error(capsys, ["train-teacher", "--out", str(out), "--resume"] + TINY + change, *words)
        assert not (out / "config.yaml").exists()  # a refused run records nothing
    code, lines = run_cli(capsys, "train-teacher", "--out", str(out), "--resume", *TINY, "--set", "train.epochs=2")
    assert code == 0, lines
    assert "epochs: 2" in (out / "config.yaml").read_text()


def test_resume_on_other_data_is_refused(tmp_path, capsys):
    first, second = image_folder(tmp_path / "a"), image_folder(tmp_path / "b", per_class=11)
    folder = ["--set", "data.name=folder", "--set", "data.image_size=32"]
    out = tmp_path / "run"
    assert main(["train-teacher", "--out", str(out)] + TINY + folder + ["--set", f"data.root={first}"]) == 0
    assert_one_line_error(capsys, ["train-teacher", "--out", str(out), "--resume", "--set", "train.epochs=2"] + TINY
                          + folder + ["--set", f"data.root={second}"], "samples differ", "data.root")


def test_a_truncated_result_or_history_does_not_stop_a_comparison(trained, tmp_path, capsys):
    out = tmp_path / "compare"
    argv = ["compare", "--out", str(out), "--methods", "none", "--seeds", "1"] + TINY
    assert main(argv) == 0
    result = next(out.rglob("result.json"))
    result.write_text(result.read_text()[:40])
    metrics = out / "teacher" / "metrics.jsonl"
    metrics.write_text(metrics.read_text()[:25])
    code, lines = run_cli(capsys, *argv)
    assert code == 0, lines
    assert json.loads(result.read_text())["test_acc"] >= 0
    assert (out / "comparison.md").is_file()


@pytest.mark.parametrize("flag", ["--student-epochs", "--teacher-epochs", "--seeds"])
def test_zero_epochs_or_seeds_are_refused_not_taken_as_the_default(tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as caught:
        main(["compare", "--out", str(tmp_path / "c"), flag, "0"] + TINY)
    assert caught.value.code == 2 and "expected an integer >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------ odd image files


def test_sixteen_bit_images_are_scaled_not_clipped():
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    rgb = np.asarray(to_rgb(Image.fromarray(values)))
    assert rgb.shape == (1, 4, 3) and rgb[0, :, 0].tolist() == [0, 1, 128, 255]
    assert np.asarray(to_rgb(Image.fromarray(np.full((2, 2), 100, np.uint8)))).max() == 100  # 8-bit unchanged


def test_a_fifo_named_like_an_image_is_skipped(tmp_path):
    data = image_folder(tmp_path / "data")
    os.mkfifo(data / "cat" / "trap.png")
    code = ("from agkd_models.data.datasets import build_datasets\n"
            f"s = build_datasets('folder', {str(data)!r}, image_size=32, val_fraction=0.2, test_fraction=0.2, "
            "split_seed=0, seed=0)\nprint(len(s.train) + len(s.val) + len(s.test))")
    done = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "20", done.stderr[-500:]


# ------------------------------------------------------------- one line, exit status 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a CUDA device")
@pytest.mark.parametrize("command", ["train-teacher", "evaluate"])
@pytest.mark.parametrize("device", ["cuda", "cuda:1", "mps"])
def test_a_device_this_machine_lacks_is_one_line(tmp_path, capsys, command, device, teacher_file):
    argv = [command] + (["--out", str(tmp_path / "t")] if command == "train-teacher"
                        else ["--checkpoint", str(teacher_file), "--model", "teacher"])
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    assert_one_line_error(capsys, argv + TINY + ["--set", f"train.device={device}"], "train.device", device)


@pytest.mark.parametrize("settings, words", [
    (["--set", "teacher.cnn_kwargs={no_such_argument: 1}"], ["teacher.cnn", "teacher.cnn_kwargs", "no_such_argument"]),
    (["--set", "teacher.vit_kwargs={num_heads: 5}"], ["teacher.vit", "teacher.vit_kwargs", "num_heads"]),
    (["--set", "train.seed=1099511627776"], ["train.seed", "4294967295"]),
    (["--set", "data.split_seed=4294967296"], ["data.split_seed", "4294967295"]),
])
def test_settings_timm_torch_or_scikit_learn_refuse_are_one_line(tmp_path, capsys, settings, words):
    assert_one_line_error(capsys, ["train-teacher", "--out", str(tmp_path / "t")] + TINY + settings, *words)
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("key", ["teacher.cnn_weights", "student.weights"])
def test_a_weights_file_timm_refuses_is_one_line(tmp_path, capsys, key, teacher_file):
    bad = tmp_path / "weights.pt"
    torch.save({"conv.weight": torch.zeros(3)}, bad)
    argv = (["train-teacher", "--out", str(tmp_path / "t")] if key.startswith("teacher")
            else ["distill", "--teacher", str(teacher_file), "--out", str(tmp_path / "s")])
    assert_one_line_error(capsys, argv + TINY + ["--set", f"{key}={bad}"], key, "timm could not load it")


def test_a_bogus_backend_variable_is_one_line_from_the_command(tmp_path):
    done = subprocess.run([sys.executable, "-m", "agkd_models.cli", "train-teacher", "--out", str(tmp_path / "t")]
                          + TINY, env={**ENV, "AGKD_OPS_BACKEND": "bogus"}, capture_output=True, text=True,
                          timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-800:]
    assert lines[0].startswith("agkd train-teacher: error: AGKD_OPS_BACKEND='bogus'")
    assert not (tmp_path / "t").exists()


def test_a_weights_file_of_the_same_model_loads(tmp_path):
    import timm

    from agkd_models.models.teacher import create_timm_model

    torch.manual_seed(0)
    source = timm.create_model("resnet10t", num_classes=7)
    path = tmp_path / "resnet10t.pt"
    torch.save(source.state_dict(), path)
    for classes in (7, 3):  # the same head, and one of another size (timm drops the file's)
        model = create_timm_model("resnet10t", classes, weights=str(path), weights_setting="teacher.cnn_weights")
        assert torch.equal(model.conv1[0].weight, source.conv1[0].weight)
        assert model.fc.out_features == classes


def test_a_folder_agkd_cannot_write_in_is_one_line(tmp_path, capsys, monkeypatch):
    import agkd_models.engine.run_folder as run_folder

    real_open = os.open

    def read_only(path, flags, *args):
        if str(path).endswith(".agkd.lock"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(run_folder.os, "open", read_only)
    assert_one_line_error(capsys, ["train-teacher", "--out", str(tmp_path / "ro")] + TINY,
                          "cannot write in the folder", "Read-only file system")


def test_a_folder_from_before_marks_is_known_by_its_files(trained, tmp_path, capsys):
    teacher = copy_tree(trained / "teacher", tmp_path / "teacher")
    (teacher / ".agkd-run").unlink()  # as an older agkd left it: a lock file, no mark
    before = snapshot(teacher)
    assert_one_line_error(capsys, ["compare", "--out", str(teacher), "--methods", "none", "--seeds", "1",
                                   "--teacher", str(teacher / "teacher.pt")] + TINY, "holds a train-teacher run")
    assert snapshot(teacher) == before
