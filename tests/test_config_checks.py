"""Settings that concern several sections are checked together before any work starts: the
image size against each model, the student stages against the student, and a --set of a
mapping setting merges into the preset's mapping."""
import pytest

from agkd_models.config import ConfigError, load_config
from agkd_models.experiments.pipeline import check_model_settings

from .commands import TINY, assert_one_line_error


def test_an_image_size_the_vit_was_not_built_for(tmp_path, capsys):
    assert_one_line_error(capsys, ["train-teacher", "--out", str(tmp_path / "run"), "--set", "data.image_size=33"]
                          + TINY, "built for 32 px", "data.image_size is 33", "teacher.vit_kwargs.img_size=33")
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_a_mapping_set_merges_into_the_presets():
    cfg = load_config("digits", ["teacher.vit_kwargs={patch_size: 8}"])
    assert cfg.teacher.vit_kwargs == {"img_size": 32, "patch_size": 8}
    cfg = load_config("digits", ["teacher.vit_kwargs.patch_size=2", "teacher.cnn_kwargs.drop_rate=0.1"])
    assert cfg.teacher.vit_kwargs == {"img_size": 32, "patch_size": 2}
    assert cfg.teacher.cnn_kwargs == {"drop_rate": 0.1}
    check_model_settings(cfg)
    with pytest.raises(ConfigError, match="'epochs' is not a mapping setting"):
        load_config("digits", ["train.epochs.x=1"])


def test_an_image_size_that_is_not_a_multiple_of_the_patch(tmp_path, capsys):
    assert_one_line_error(capsys, ["train-teacher", "--out", str(tmp_path / "run"), "--set",
                                   "teacher.vit_kwargs={patch_size: 5}"] + TINY,
                          "data.image_size=32 is not a multiple of the ViT's patch size 5", "never be seen")


def test_a_consistent_non_default_geometry_passes():
    check_model_settings(load_config("digits", ["data.image_size=30", "teacher.vit_kwargs={img_size: 30, "
                                                "patch_size: 5}"]))


def test_an_image_too_small_for_the_cnn(tmp_path, capsys):
    assert_one_line_error(capsys, ["train-teacher", "--out", str(tmp_path / "run"), "--set", "data.image_size=8",
                                   "--set", "teacher.vit_kwargs={img_size: 8}", "--set", "teacher.cnn=vgg11"] + TINY,
                          "data.image_size=8 does not suit teacher.cnn='vgg11'")


@pytest.mark.parametrize("command", ["train-teacher", "distill", "cache-teacher", "evaluate", "compare", "demo"])
def test_student_stages_are_checked_for_every_command(tmp_path, capsys, command):
    extra = {"train-teacher": ["--out", str(tmp_path / "run")],
             "distill": ["--teacher", __file__, "--out", str(tmp_path / "run")],
             "cache-teacher": ["--teacher", __file__, "--out", str(tmp_path / "cache"), "--epochs", "1"],
             "evaluate": ["--checkpoint", __file__],
             "compare": ["--out", str(tmp_path / "run")],
             "demo": ["--out", str(tmp_path / "run")]}[command]
    assert_one_line_error(capsys, [command] + extra + ["--set", "student.stages=[2, 9]"] + TINY,
                          "student.stages: stage 9 does not exist in 'efficientnet_b0', which has 7 stages (0 to 6)")


def test_the_projected_stage_is_checked(tmp_path, capsys):
    assert_one_line_error(capsys, ["train-teacher", "--out", str(tmp_path / "run"), "--set",
                                   "cakd.projected_stage=7"] + TINY,
                          "cakd.projected_stage: stage 7 does not exist")


@pytest.mark.parametrize("free_gib,refused", [(8, True), (1024, False)])
def test_a_batch_that_cannot_fit_is_refused_up_front(monkeypatch, free_gib, refused):
    from agkd_models.experiments import pipeline
    monkeypatch.setattr(pipeline, "_available_memory", lambda device: free_gib * 2**30)
    cfg = load_config("digits", ["data.image_size=4096", "teacher.vit_kwargs.img_size=4096",
                                 "teacher.vit_kwargs.patch_size=64"])  # one float32 batch of 64: 12 GiB
    if refused:
        with pytest.raises(ConfigError, match=r"one input batch alone takes 12.0 GiB, more than half of the 8.0 GiB"):
            check_model_settings(cfg)
    else:
        check_model_settings(cfg)
