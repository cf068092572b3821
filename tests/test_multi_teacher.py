"""Multi-teacher distillation: several ``--teacher`` files combined into one teacher. The
combination against a hand computation, each teacher of its own architecture (read from
its recipe), weights equal or by validation accuracy, a run through ``agkd distill`` and
``agkd compare``, a teacher cache of the combined teacher that replays exactly what the
teachers give online and names every teacher, and what several teachers cannot serve
refused in one line before any work."""
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from agkd_models.cli import main
from agkd_models.config import load_config
from agkd_models.data.cache import TeacherCache
from agkd_models.experiments.experiment import Experiment
from agkd_models.experiments.pipeline import build_teacher, evaluate_model, teacher_config_of
from agkd_models.models.multi_teacher import MultiTeacher

from .commands import TINY, assert_one_line_error

SETTINGS = [a for a in TINY if a != "--set"]


class Fixed(nn.Module):
    """A stand-in teacher with fixed outputs."""

    def __init__(self, logits, attention):
        super().__init__()
        self.logits, self.attention = logits, attention

    def forward(self, images):
        return SimpleNamespace(logits=self.logits, attention=self.attention)


def test_the_combined_teacher_by_hand():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    a1, a2 = torch.rand(3, 1, 4, 4, generator=g), torch.rand(3, 1, 2, 2, generator=g)
    teachers = [Fixed(z1, a1), Fixed(z2, a2)]
    out = MultiTeacher(teachers, [0.25, 0.75])(None)
    torch.testing.assert_close(out.logits.softmax(1), 0.25 * z1.softmax(1) + 0.75 * z2.softmax(1))
    resized = F.interpolate(a2, size=(4, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out.attention, 0.25 * a1 + 0.75 * resized)
    torch.testing.assert_close(MultiTeacher(teachers, [0.25, 0.75], "logits")(None).logits, 0.25 * z1 + 0.75 * z2)
    alone = MultiTeacher(teachers, [1.0, 0.0])(None)  # a weight of 0 drops its teacher
    torch.testing.assert_close(alone.logits.softmax(1), z1.softmax(1))
    with pytest.raises(ValueError, match="sum to 1"):
        MultiTeacher(teachers, [0.5, 0.6])
    with pytest.raises(ValueError, match="disagree in classes"):
        MultiTeacher([Fixed(z1, a1), Fixed(torch.randn(3, 6), a2)], [0.5, 0.5])(None)


@pytest.fixture(scope="module")
def two_teachers(tmp_path_factory):
    """The digits preset's teacher and one with another CNN branch, whose recipe says so."""
    root = tmp_path_factory.mktemp("teachers")
    (root / "a").mkdir(), (root / "b").mkdir()
    torch.manual_seed(0)
    torch.save(build_teacher(load_config("digits"), 10).state_dict(), root / "a" / "teacher.pt")
    torch.manual_seed(1)
    torch.save(build_teacher(load_config("digits", ["teacher.cnn=resnet18"]), 10).state_dict(), root / "b" / "teacher.pt")
    (root / "b" / "teacher_recipe.json").write_text(json.dumps({"teacher": {"cnn": "resnet18"}}))
    return root / "a" / "teacher.pt", root / "b" / "teacher.pt"


def test_each_teacher_has_its_recipes_architecture_and_the_weights_follow_the_setting(two_teachers):
    a, b = two_teachers
    cfg = load_config("digits", SETTINGS)
    assert teacher_config_of(a, cfg).teacher.cnn == "resnet10t" and teacher_config_of(b, cfg).teacher.cnn == "resnet18"
    combined = Experiment(cfg, [a, b]).teacher
    assert isinstance(combined, MultiTeacher) and combined.weights == [0.5, 0.5]
    assert [t.cnn.default_cfg["architecture"] for t in combined.teachers] == ["resnet10t", "resnet18"]

    by_val = load_config("digits", SETTINGS + ["distill.teacher_weights=val_acc"])
    experiment = Experiment(by_val, [a, b])
    accuracies = []
    for teacher in experiment.teacher.teachers:
        logits, targets = evaluate_model(teacher, experiment.data().val, by_val, torch.device("cpu"))
        accuracies.append((logits.argmax(1) == targets).float().mean().item())
    want = [x / sum(accuracies) for x in accuracies] if sum(accuracies) else [0.5, 0.5]
    assert experiment.teacher.weights == pytest.approx(want)


def test_a_teacher_cache_of_several_teachers_replays_them_exactly_and_names_each(two_teachers, tmp_path):
    a, b = two_teachers
    teachers = ["--teacher", str(a), "--teacher", str(b)]
    cache = tmp_path / "cache"
    assert main(["cache-teacher", "--config", "digits", *TINY, *teachers, "--epochs", "1", "--dtype", "float32",
                 "--out", str(cache)]) == 0
    recorded = TeacherCache.open(cache).manifest["teacher_config"]
    assert [t["architecture"]["cnn"] for t in recorded["teachers"]] == ["resnet10t", "resnet18"]
    assert recorded["weights"] == [0.5, 0.5] and recorded["average"] == "probabilities"
    runs = {}
    for name, extra in (("online", []), ("cached", ["--teacher-cache", str(cache)])):
        assert main(["distill", "--config", "digits", *TINY, *teachers, "--method", "agkd", "--out",
                     str(tmp_path / name), *extra]) == 0
        runs[name] = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])
    drop = lambda r: {k: v for k, v in r.items() if k != "epoch_seconds"}  # noqa: E731
    assert drop(runs["cached"]) == drop(runs["online"])
    # One teacher's cache does not serve the pair.
    assert main(["cache-teacher", "--config", "digits", *TINY, "--teacher", str(a), "--epochs", "1",
                 "--dtype", "float32", "--out", str(tmp_path / "one")]) == 0
    assert main(["distill", "--config", "digits", *TINY, *teachers, "--method", "agkd", "--out",
                 str(tmp_path / "mismatch"), "--teacher-cache", str(tmp_path / "one")]) == 2


def test_agkd_compare_with_several_teachers(two_teachers, tmp_path):
    a, b = two_teachers
    out = tmp_path / "compare"
    assert main(["compare", "--config", "digits", *TINY, "--teacher", str(a), "--teacher", str(b), "--methods",
                 "none,dkd", "--seeds", "1", "--out", str(out)]) == 0
    summary = json.loads((out / "comparison.json").read_text())
    assert summary["teacher"]["paths"] == [str(a), str(b)] and set(summary["methods"]) == {"none", "dkd"}


@pytest.mark.parametrize("argv,words", [
    (["distill", "--method", "fitnet"], ["fitnet", "several --teacher files", "read only"]),
    (["compare", "--methods", "logit,rkd", "--seeds", "1"], ["rkd", "several --teacher files"]),
])
def test_what_several_teachers_cannot_serve_is_a_one_line_error(argv, words, two_teachers, tmp_path, capsys):
    a, b = two_teachers
    line = assert_one_line_error(capsys, [argv[0], "--config", "digits", *TINY, "--teacher", str(a), "--teacher",
                                          str(b), *argv[1:], "--out", str(tmp_path / "o")], *words)
    assert not (tmp_path / "o" / "logit").exists(), line  # refused before any work


def test_a_damaged_recipe_is_a_one_line_error(two_teachers, tmp_path, capsys):
    a, _ = two_teachers
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "teacher.pt").write_bytes(a.read_bytes())
    (bad / "teacher_recipe.json").write_text("{not json")
    assert_one_line_error(capsys, ["distill", "--config", "digits", *TINY, "--teacher", str(a), "--teacher",
                                   str(bad / "teacher.pt"), "--out", str(tmp_path / "o")], "teacher_recipe.json")
