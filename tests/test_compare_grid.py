"""`agkd compare --grid`: parsing against the declared settings, which grid points concern
which method, the choice made on validation alone, and a grid comparison re-entered."""
import json

import pytest

from agkd_models.cli import main
from agkd_models.config import ConfigError, load_config
from agkd_models.experiments.compare import choose_on_validation, grid_points, parse_grid

from .commands import TINY, assert_one_line_error, teacher_file  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def cfg():
    return load_config("digits")


def test_grid_values_are_read_as_their_settings_read_them(cfg):
    grid = parse_grid(["agkd.kd_weight=0.5,0.9", "train.lr=1e-3,2e-3", "student.stages=[2, 3],[1, 3]",
                       "cakd.view_terms=adversarial,all"], cfg)
    assert grid == {"agkd.kd_weight": [0.5, 0.9], "train.lr": [0.001, 0.002], "student.stages": [[2, 3], [1, 3]],
                    "cakd.view_terms": ["adversarial", "all"]}
    assert all(isinstance(v, float) for v in grid["train.lr"])  # YAML's 1e-3 is a string until checked


@pytest.mark.parametrize("item,words", [
    ("agkd.kd_wieght=0.5", "--grid agkd.kd_wieght: not a setting"),
    ("kd_weight=0.5", "--grid kd_weight: not a setting"),
    ("agkd.kd_weight=0.5,1.5", "agkd.kd_weight: got 1.5"),
    ("agkd.window_size=3,4", "agkd.window_size: got 4; expected an odd integer"),
    ("agkd.kd_weight=", "expected section.key=value1,value2"),
    ("agkd.kd_weight=0.5,0.5", "a value is repeated"),
    ("distill.method=logit,agkd", "--methods chooses the methods"),
    ("train.seed=1,2", "--seeds chooses the seeds"),
    ("agkd.attention_loss=mse,ssim", "--methods agkd-<attention_loss> chooses it"),
    ("data.image_size=32,64", "the data and the teacher are the whole comparison's"),
    ("teacher.cnn=vgg11,resnet10t", "the data and the teacher are the whole comparison's"),
    ("train.num_workers=0,2", "may not change a student's result"),
])
def test_grid_refuses_what_is_not_a_recipe_setting(cfg, item, words):
    with pytest.raises(ConfigError) as caught:
        parse_grid([item], cfg)
    assert words in str(caught.value), str(caught.value)


def test_a_key_given_twice_is_refused(cfg):
    with pytest.raises(ConfigError, match="given twice"):
        parse_grid(["train.lr=0.1", "train.lr=0.2"], cfg)


def test_grid_points_of_a_method_are_its_own_keys_and_the_shared_ones(cfg):
    grid = parse_grid(["logit.temperature=2,4", "agkd.kd_weight=0.5,0.9", "train.lr=0.001,0.002"], cfg)
    assert grid_points(grid, "logit") == [
        {"logit.temperature": 2.0, "train.lr": 0.001}, {"logit.temperature": 2.0, "train.lr": 0.002},
        {"logit.temperature": 4.0, "train.lr": 0.001}, {"logit.temperature": 4.0, "train.lr": 0.002}]
    assert grid_points(grid, "none") == [{"train.lr": 0.001}, {"train.lr": 0.002}]
    assert len(grid_points(grid, "agkd")) == 4 and len(grid_points(grid, "cakd")) == 2
    assert grid_points({}, "agkd") == [{}]


def test_the_choice_is_made_on_validation_never_on_test():
    points = [{"val_acc_mean": 0.90, "test_acc_mean": 0.99},   # best on test
              {"val_acc_mean": 0.95, "test_acc_mean": 0.80},   # best on validation
              {"val_acc_mean": 0.95, "test_acc_mean": 0.85}]   # as good on validation, later
    assert choose_on_validation(points) == 1


def test_a_grid_comparison_reports_the_validation_choice_and_is_resumable(teacher_file, tmp_path, capsys):
    out = tmp_path / "grid"
    argv = ["compare", "--teacher", str(teacher_file), "--methods", "none,logit", "--seeds", "1",
            "--grid", "logit.temperature=2,4", "--out", str(out)] + TINY
    capsys.readouterr()
    assert main(argv) == 0
    first = capsys.readouterr().out
    # Before any work: the runs, and the teacher cache the logit students will replay.
    assert "3 student runs" in first and "0 done before, 3 to train" in first
    assert "first the teacher is cached over" in first and "for 1 seed" in first
    result = json.loads((out / "comparison.json").read_text())
    assert result["grid"] == {"logit.temperature": [2.0, 4.0]}
    logit = result["methods"]["logit"]
    tried = logit["grid"]
    assert [p["point"] for p in tried] == [{"logit.temperature": 2.0}, {"logit.temperature": 4.0}]
    # Each point's numbers are its own run's, and the one reported is the best on validation.
    for p in tried:
        folder = out / "logit" / f"logit.temperature={p['point']['logit.temperature']}" / "seed0"
        saved = json.loads((folder / "result.json").read_text())
        assert (saved["val_acc"], saved["test_acc"]) == (p["val_acc_mean"], p["test_acc_mean"])
        assert saved["identity"]["config"]["logit"]["temperature"] == p["point"]["logit.temperature"]
    best = max(tried, key=lambda p: p["val_acc_mean"])
    assert logit["point"] == best["point"] and logit["test_acc_mean"] == best["test_acc_mean"]
    assert "grid" not in result["methods"]["none"]  # no key of the grid concerns it: one run
    assert "chosen on validation" in (out / "comparison.md").read_text()
    # Again over the same folder: every run is picked up, none trained.
    capsys.readouterr()
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert "3 student runs" in said and "3 done before, 0 to train" in said
    assert "cached over" not in said


def test_compare_checks_its_grid_before_any_work(tmp_path, capsys):
    assert_one_line_error(capsys, ["compare", "--out", str(tmp_path / "c"), "--grid", "agkd.kd_weight=2"] + TINY,
                          "agkd.kd_weight: got 2")
    assert not (tmp_path / "c").exists()
