"""An experiment builds the data and the teacher once for every run made from it, verifies
each teacher cache once, and seeds each run as a run that built its own teacher was seeded,
so that sharing changes no result."""
import pytest
import torch

from agkd_models.config import load_config
from agkd_models.data import cache as cache_module
from agkd_models.data.cache import TeacherCacheError
from agkd_models.experiments import experiment as experiment_module
from agkd_models.experiments.compare import run_comparison
from agkd_models.experiments.experiment import Experiment
from agkd_models.experiments.pipeline import build_student, build_teacher

from .commands import teacher_file  # noqa: F401 (fixture)

TINY = ["data.limit_train=32", "data.limit_val=16", "data.limit_test=16", "train.batch_size=16",
        "train.progress=false", "train.epochs=1"]


def tiny(*extra):
    return load_config("digits", TINY + list(extra))


class _Counted:
    """``function`` with a count of its calls."""

    def __init__(self, function):
        self.function, self.calls = function, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.function(*args, **kwargs)


@pytest.fixture
def counted(monkeypatch):
    """The experiment module's builders and the cache's checksum, each counted."""
    counts = {}
    for module, name in ((experiment_module, "build_data"), (experiment_module, "build_teacher"),
                         (experiment_module, "evaluate_model"), (cache_module, "_sha256")):
        counts[name] = _Counted(getattr(module, name))
        monkeypatch.setattr(module, name, counts[name])
    return counts


def test_a_run_is_seeded_as_a_run_that_built_its_own_teacher(teacher_file):
    cfg = tiny()
    experiment = Experiment(cfg, teacher_file)
    for seed in (1, 0, 1, 7):  # out of order and repeated: each seed's state is its own
        torch.manual_seed(seed)
        build_teacher(cfg, 10)  # what every run did before the student: the teacher's initialisation
        expected = build_student(cfg, 10).state_dict()
        experiment.seed_run(seed)
        got = build_student(cfg, 10).state_dict()
        assert all(torch.equal(got[k], v) for k, v in expected.items()), seed


def test_data_and_teacher_are_built_once_and_each_seed_initialises_the_teacher_once(teacher_file, counted):
    experiment = Experiment(tiny(), teacher_file)
    for seed in (0, 1, 0, 1, 0):
        experiment.seed_run(seed)
        experiment.data(seed)
        assert experiment.teacher is experiment.teacher
    assert counted["build_data"].calls == 1
    assert counted["build_teacher"].calls == 2  # one initialisation per seed; the first one is loaded
    reference = build_teacher(tiny(), 10)
    reference.load_state_dict(torch.load(teacher_file))
    assert all(torch.equal(a, b) for a, b in zip(experiment.teacher.state_dict().values(),
                                                 reference.state_dict().values()))


def test_each_seeds_data_is_the_shared_splits_with_that_seeds_augmentation(teacher_file):
    from agkd_models.data.datasets import fingerprint
    from agkd_models.experiments.pipeline import build_data

    experiment = Experiment(tiny(), teacher_file)
    for seed in (3, 0):
        alone = build_data(tiny(f"train.seed={seed}"))
        shared = experiment.data(seed)
        assert shared.train.seed == seed and fingerprint(shared.train) == fingerprint(alone.train)
        image, label = shared.train[5]
        expected_image, expected_label = alone.train[5]
        assert label == expected_label and torch.equal(image, expected_image)
        assert fingerprint(shared.test) == fingerprint(alone.test)


def test_a_cache_is_verified_once_and_checked_against_every_runs_data(teacher_file, tmp_path, counted):
    experiment = Experiment(tiny(), teacher_file)
    experiment.write_cache(tmp_path / "cache", epochs=1, seed=0, dtype="float32")
    counted["_sha256"].calls = 0  # the writer's checksums
    for _ in range(3):
        assert experiment.open_cache(tmp_path / "cache", seed=0).epochs == 1
    fields = len(experiment.open_cache(tmp_path / "cache", seed=0).manifest["fields"])
    assert counted["_sha256"].calls == fields
    with pytest.raises(TeacherCacheError, match="augmentation settings differ"):
        experiment.open_cache(tmp_path / "cache", seed=1)  # another seed's augmentation draws
    assert experiment.find_cache(tmp_path / "cache", seed=1) is None
    assert experiment.find_cache(tmp_path / "nothing", seed=0) is None


def test_a_runs_data_and_teacher_settings_must_be_the_experiments(teacher_file, tmp_path):
    experiment = Experiment(tiny(), teacher_file)
    with pytest.raises(ValueError, match="a run's data settings must be the experiment's"):
        experiment.distill(tiny("data.limit_train=24"), tmp_path / "run")
    with pytest.raises(ValueError, match="no teacher_path"):
        Experiment(tiny()).teacher


def test_a_comparison_builds_data_and_teacher_once_and_verifies_each_cache_once(teacher_file, tmp_path,
                                                                                   counted):
    experiment = Experiment(tiny(), teacher_file)
    summary = run_comparison(experiment, tmp_path / "compare", methods=["none", "logit", "agkd-hybrid"],
                             seeds=[0, 1], student_epochs=1, log=lambda line: None)
    assert len(summary["runs"]) == 3 and all(len(by_seed) == 2 for by_seed in summary["runs"].values())
    for name, method in summary["methods"].items():  # each method's cost per epoch, from its runs' histories
        seconds = [r["epoch_seconds"] for run in summary["runs"][name].values() for r in run["history"]]
        assert method["epoch_seconds_mean"] == pytest.approx(sum(seconds) / len(seconds))
    assert "| s / epoch |" in (tmp_path / "compare" / "comparison.md").read_text()
    assert counted["build_data"].calls == 1
    assert counted["build_teacher"].calls <= 1 + 2  # the loaded teacher, and one initialisation per seed
    # The teacher on the test set once; each of the 6 students once.
    assert counted["evaluate_model"].calls == 1 + 6
    # Two caches (one per seed) written, then each verified once although four runs replay them.
    fields = len(experiment.open_cache(tmp_path / "compare" / "cache" / "seed0", seed=0).manifest["fields"])
    assert counted["_sha256"].calls == 2 * fields * 2  # written (the checksum of each field), then verified

    # The same comparison again: every run is found done, so no cache is opened at all.
    counted["_sha256"].calls = 0
    again = run_comparison(Experiment(tiny(), teacher_file), tmp_path / "compare",
                           methods=["none", "logit", "agkd-hybrid"], seeds=[0, 1], student_epochs=1,
                           log=lambda line: None)
    assert again["methods"] == summary["methods"] and counted["_sha256"].calls == 0
