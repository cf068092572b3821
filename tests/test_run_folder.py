"""Runs that protect the user's work: an output folder belongs to one run (lock, refusal of
another run's files, --resume / --overwrite), --resume continues the same configuration,
and Ctrl-C / SIGTERM stop with one line and the conventional exit status, leaving no
partial cache behind."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from agkd_models.cli import main
from agkd_models.config import SECTIONS, load_config, resume_conflicts
from agkd_models.engine.run_folder import LOCK_NAME, RunFolder, RunFolderError

from .commands import TINY, assert_one_line_error, run_cli, teacher_file  # noqa: F401 (a fixture)

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished one-epoch teacher run (read-only for the tests: copy before changing)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train-teacher", "--out", str(out)] + TINY) == 0
    return out


def copy_run(src, dst):
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# ------------------------------------------------------------------ the folder is one run's


def test_a_finished_run_is_not_replaced_without_overwrite(finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path / "run")
    before = (out / "teacher.pt").read_bytes()
    assert_one_line_error(capsys, ["train-teacher", "--out", str(out)] + TINY, "holds another run's files",
                          "teacher.pt", "--resume", "--overwrite")
    assert (out / "teacher.pt").read_bytes() == before


def test_overwrite_replaces_the_run(finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path / "run")
    (out / "metrics.jsonl").write_text('{"epoch": 0, "from": "the old run"}\n' * 4)
    notes = out / "notes.txt"
    notes.write_text("the user's own file")
    code, lines = run_cli(capsys, "train-teacher", "--out", str(out), "--overwrite", *TINY)
    assert code == 0, lines
    records = (out / "metrics.jsonl").read_text().splitlines()
    assert len(records) == 1 and "the old run" not in records[0]
    assert notes.read_text() == "the user's own file"  # only the run's own files are replaced


def test_resume_and_overwrite_together_are_refused(tmp_path, capsys):
    assert_one_line_error(capsys, ["train-teacher", "--out", str(tmp_path / "run"), "--resume", "--overwrite"] + TINY,
                          "--resume", "--overwrite")


def test_out_that_is_a_file_or_lies_in_one(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert_one_line_error(capsys, ["train-teacher", "--out", str(f)] + TINY, "is a file")
    assert_one_line_error(capsys, ["distill", "--teacher", str(f), "--out", str(f / "sub" / "run")] + TINY,
                          "lies inside", str(f))


def test_a_locked_folder_is_refused_in_process(tmp_path, capsys):
    out = tmp_path / "run"
    with RunFolder(out, kind="train-teacher"):
        assert_one_line_error(capsys, ["train-teacher", "--out", str(out)] + TINY, "in use by another agkd run",
                              str(os.getpid()))
    assert not (out / "metrics.jsonl").exists()
    with RunFolder(out, kind="train-teacher"):  # released when the block ended
        pass


def test_a_second_process_into_a_running_folder_stops_at_once(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from agkd_models.engine.run_folder import RunFolder\n"
         f"with RunFolder(Path({str(out)!r}), kind='train-teacher'):\n    print('held', flush=True); time.sleep(120)"],
        env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        second = subprocess.run([sys.executable, "-m", "agkd_models.cli", "train-teacher", "--out", str(out)] + TINY,
                                env=ENV, capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1, second.stderr
    assert f"in use by another agkd run (pid {holder.pid})" in lines[0]
    # The kernel dropped the dead holder's lock: the folder is free again.
    with RunFolder(out, kind="train-teacher"):
        assert (out / LOCK_NAME).read_text() == str(os.getpid())


def test_run_folder_unit():
    with pytest.raises(RunFolderError, match="give one"):
        RunFolder(Path("x"), kind="distill", resume=True, overwrite=True)


# ------------------------------------------------------------------ --resume is the same run


def test_resume_with_a_result_changing_setting_is_refused(finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path / "run")
    saved = (out / "config.yaml").read_text()
    changed = ["--set", "train.lr=0.01", "--set", "train.seed=5", "--set", "data.limit_train=64"]
    line = assert_one_line_error(capsys, ["train-teacher", "--out", str(out), "--resume"] + TINY + changed,
                                 "train.lr", "train.seed", "data.limit_train", "would change its result")
    assert "train.epochs" not in line
    assert (out / "config.yaml").read_text() == saved  # the saved configuration is left as it was


def test_resume_with_another_teacher_architecture_is_refused_by_name(finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path / "run")
    assert_one_line_error(capsys, ["train-teacher", "--out", str(out), "--resume", "--set", "teacher.cnn=resnet18"]
                          + TINY, "teacher.cnn", "'resnet10t' -> 'resnet18'")


def test_resume_may_change_what_cannot_change_the_result(finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path / "run")
    code, lines = run_cli(capsys, "train-teacher", "--out", str(out), "--resume", *TINY,
                          "--set", "train.epochs=2", "--set", "train.progress=false", "--set", "train.device=cpu")
    assert code == 0, lines
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # one more epoch
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["epochs"] == 2


def test_resume_conflicts_follow_each_settings_rule():
    saved = load_config("digits", ["train.epochs=6"])
    now = load_config("digits", ["train.epochs=9", "train.num_workers=2", "train.progress=false",
                                 "train.device=cpu", "data.root=/elsewhere"])
    assert resume_conflicts(saved, now) == []
    fewer = load_config("digits", ["train.epochs=2", "agkd.temperature=2"])
    assert resume_conflicts(saved, fewer) == ["agkd.temperature: 4.0 -> 2.0", "train.epochs: 6 -> 2"]


def test_every_setting_declares_what_a_resume_may_change():
    for cls in SECTIONS.values():
        for f in dataclasses.fields(cls):
            assert f.metadata["rule"].resume in ("same", "any", "more"), f.name


# ------------------------------------------------------------------------------- signals


def _default_sigint() -> None:
    # A shell without job control starts background commands with SIGINT ignored, and the
    # child would inherit that (Python then installs no KeyboardInterrupt handler): the
    # command under test gets SIGINT as a terminal would deliver it, whatever ran the tests.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(argv, out):
    return subprocess.Popen([sys.executable, "-m", "agkd_models.cli"] + argv, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)


def _wait_for(condition, proc, seconds=300):
    deadline = time.time() + seconds
    while not condition():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("signum,status,name", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")])
def test_a_stopped_training_says_what_was_kept_in_one_line(tmp_path, signum, status, name):
    out = tmp_path / "run"
    proc = _start(["train-teacher", "--out", str(out)] + TINY + ["--set", "train.epochs=200"], out)
    metrics = out / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 1, proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert proc.returncode == status, err
    assert len(lines) == 1 and lines[0].startswith(f"agkd train-teacher: stopped by {name}; "), err
    assert "--resume" in lines[0] and "finished epoch(s) are saved" in lines[0]


@pytest.mark.parametrize("signum,status,name", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")])
def test_a_stopped_cache_writer_leaves_no_partial_folder(tmp_path, teacher_file, signum, status, name):
    out = tmp_path / "cache"
    proc = _start(["cache-teacher", "--teacher", str(teacher_file), "--out", str(out), "--epochs", "500",
                   "--set", "data.limit_train=64", "--set", "train.progress=false"], out)
    _wait_for(lambda: any(tmp_path.glob(".cache.partial-*")), proc)
    time.sleep(0.5)  # into the teacher's passes
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert proc.returncode == status, err
    assert lines == [f"agkd cache-teacher: stopped by {name}; the unfinished cache was removed; run the command "
                     f"again to write it"], err
    assert list(tmp_path.iterdir()) == []


def test_partial_cache_folders_of_dead_processes_are_cleaned_up(tmp_path, teacher_file, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".cache.partial-{dead.pid}"
    stale.mkdir()
    (stale / "logits.npy").write_bytes(b"half")
    live = tmp_path / ".cache.partial-1"  # a live process's (init): left alone
    live.mkdir()
    code = main(["cache-teacher", "--teacher", str(teacher_file), "--out", str(tmp_path / "cache"), "--epochs", "1",
                 "--set", "data.limit_train=16", "--set", "train.progress=false"])
    assert code == 0
    assert not stale.exists() and live.exists()
    assert f"removed {stale}" in capsys.readouterr().err
    assert json.loads((tmp_path / "cache" / "manifest.json").read_text())["epochs"] == 1
