"""Running the ``agkd`` command in tests: a tiny digits run's settings, the command run in
process with its standard error read back, the one-line error it must give for bad input,
and an untrained teacher file to distil from."""
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
