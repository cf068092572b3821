"""Running the ``agkd`` command in tests: a tiny digits run's settings, the command run in
process with its standard error read back, the one-line error it must give for bad input,
and an untrained teacher file to distil from."""
import json
import math
import shutil

import pytest
import torch

from agkd_models.cli import main
from agkd_models.config import load_config
from agkd_models.experiments.pipeline import build_teacher

# A one-epoch digits run on a few samples: seconds on a CPU.
TINY = ["--set", "data.limit_train=32", "--set", "data.limit_val=16", "--set", "train.batch_size=16",
        "--set", "train.progress=false", "--set", "train.epochs=1"]


def run_cli(capsys, *argv):
    """(exit status, the lines on standard error) of ``agkd argv``, in process."""
    capsys.readouterr()
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


def assert_one_line_error(capsys, argv, *words):
    """``agkd argv`` exits 2 with one line on standard error, ``agkd <command>: error: ...``,
    holding every one of ``words``; returns that line."""
    code, lines = run_cli(capsys, *argv)
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith(f"agkd {argv[0]}: error: "), lines
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def agkd_folder(path, kind="train-teacher"):
    """``path`` made as agkd makes a run folder (marked with its kind), for tests that then
    put a run's files in it by hand."""
    from agkd_models.engine.run_folder import mark_run_folder
    path.mkdir(parents=True, exist_ok=True)
    mark_run_folder(path, kind)
    return path


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """The digits preset's teacher, untrained, saved as a teacher file."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(build_teacher(load_config("digits"), 10).state_dict(), path)
    return path


def assert_resumes_exactly(distill, full, part):
    """``distill(out, *extra)`` for two epochs into ``full`` gives a finite history; the
    same run cut back to its first epoch (its previous checkpoint, one metrics line) and
    resumed in ``part`` gives the same second epoch and the same student, bit for bit.
    Returns the full run's history."""
    assert distill(full) == 0
    history = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 2 and all(math.isfinite(r["train_loss"]) for r in history)
    shutil.copytree(full, part)
    shutil.copy(part / "checkpoint.prev.pt", part / "checkpoint.pt")
    (part / "metrics.jsonl").write_text((full / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    assert distill(part, "--resume") == 0
    resumed = [json.loads(line) for line in (part / "metrics.jsonl").read_text().splitlines()]
    drop = lambda r: {k: v for k, v in r.items() if k != "epoch_seconds"}  # noqa: E731
    assert [drop(r) for r in resumed] == [drop(r) for r in history]
    a, b = torch.load(full / "student.pt"), torch.load(part / "student.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    return history
