"""Bad input to the agkd command: configuration values, files on the command line and
damaged checkpoints each give exit status 2 and one line on standard error that names the
key or file, never a traceback; the settings declarations themselves are consistent."""
import dataclasses
import errno
import os
import subprocess
import sys

import pytest
import torch
import yaml

from agkd_models.engine import checkpoint as ckpt
from agkd_models.cli import main
from agkd_models.distillers import build_task
from agkd_models.experiments.pipeline import build_student, build_teacher
from agkd_models.config import SECTIONS, ConfigError, PRESETS, default_config, load_config, validate_config

from .commands import TINY, agkd_folder, assert_one_line_error, run_cli, teacher_file  # noqa: F401 (a fixture)

# ------------------------------------------------------------- the table, row by row


def test_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: [1, 2\n  lr: 0.1\n")
    assert_one_line_error(capsys, ["train-teacher", "--config", str(bad)], str(bad), "not valid YAML", "line")


@pytest.mark.parametrize("override,words", [
    ("train.lr=abc", ["train.lr", "'abc'", "a number > 0"]),
    ("train.batch_size=0", ["train.batch_size", "got 0", "an integer >= 1"]),
    ("train.epochs=-1", ["train.epochs", "got -1", "an integer >= 1"]),
])
def test_bad_values_name_the_key_the_value_and_what_is_allowed(capsys, override, words):
    assert_one_line_error(capsys, ["train-teacher", "--set", override], *words)


def test_teacher_of_random_bytes(tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(4096))
    assert_one_line_error(capsys, ["distill", "--teacher", str(junk), "--out", str(tmp_path / "s")] + TINY,
                          str(junk), "not a PyTorch file")


def test_missing_teacher(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "teacher.pt"
    assert_one_line_error(capsys, ["distill", "--teacher", str(missing), "--out", str(tmp_path / "s")] + TINY,
                          str(missing), "no such file")


def test_resume_from_a_truncated_checkpoint_uses_the_previous_one(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train-teacher", "--out", str(out)] + TINY
    assert main(args + ["--set", "train.epochs=2"]) == 0
    newest, previous = out / "checkpoint.pt", out / "checkpoint.prev.pt"
    assert torch.load(previous, weights_only=True)["epoch"] == 0  # the epoch before the newest
    with open(newest, "r+b") as f:
        f.truncate(newest.stat().st_size // 2)
    code, lines = run_cli(capsys, *args, "--set", "train.epochs=3", "--resume")
    assert code == 0
    assert any("checkpoint.pt" in line and "resuming from the previous checkpoint" in line for line in lines)
    history = torch.load(newest, weights_only=True)["history"]
    assert [r["epoch"] for r in history] == [0, 1, 2]  # epoch 2 (index 1) retrained, nothing else lost


def test_resume_with_both_checkpoints_damaged_says_so(tmp_path, capsys):
    out = agkd_folder(tmp_path / "run")
    (out / "checkpoint.pt").write_bytes(b"\0" * 100)
    (out / "checkpoint.prev.pt").write_bytes(b"PK\3\4 truncated")
    assert_one_line_error(capsys, ["train-teacher", "--out", str(out), "--resume"] + TINY,
                          "cannot resume", "checkpoint.pt", "checkpoint.prev.pt")


def test_evaluate_student_given_a_teacher(teacher_file, capsys):
    line = assert_one_line_error(capsys, ["evaluate", "--checkpoint", str(teacher_file), "--model", "student"] + TINY,
                                 str(teacher_file), "hybrid teacher weights", "expected student weights")
    assert "missing" in line and len(line) < 400  # a summary, not a screen of state-dict keys


# ------------------------------------------------------------------- the other subcommands


def test_teacher_for_another_number_of_classes(tmp_path, capsys):
    five = tmp_path / "five.pt"
    torch.save(build_teacher(load_config("digits"), 5).state_dict(), five)
    assert_one_line_error(capsys, ["distill", "--teacher", str(five), "--out", str(tmp_path / "s")] + TINY,
                          str(five), "5 classes", "for 10 classes")


def test_cache_teacher_bad_inputs(tmp_path, teacher_file, capsys):
    assert_one_line_error(capsys, ["cache-teacher", "--teacher", str(tmp_path / "none.pt"), "--out",
                                   str(tmp_path / "c"), "--epochs", "1"] + TINY, "none.pt", "no such file")
    assert_one_line_error(capsys, ["cache-teacher", "--teacher", str(teacher_file), "--out", str(tmp_path / "c"),
                                   "--epochs", "1", "--set", "data.image_size=4"] + TINY,
                          "data.image_size", "got 4")


def test_distill_with_a_missing_teacher_cache(tmp_path, teacher_file, capsys):
    assert_one_line_error(capsys, ["distill", "--teacher", str(teacher_file), "--teacher-cache",
                                   str(tmp_path / "no-cache"), "--out", str(tmp_path / "s")] + TINY,
                          "no-cache", "no such folder")


def test_evaluate_bad_inputs(tmp_path, capsys):
    assert_one_line_error(capsys, ["evaluate", "--checkpoint", str(tmp_path / "gone.pt")] + TINY,
                          "gone.pt", "no such file")
    notes = tmp_path / "notes.pt"
    torch.save({"note": "hello"}, notes)
    assert_one_line_error(capsys, ["evaluate", "--checkpoint", str(notes)] + TINY, str(notes), "not model weights")


@pytest.mark.parametrize("override,key", [("train.optimizer=adamw", "train.optimizer"),
                                          ("agkd.window_size=4", "agkd.window_size"),
                                          ("student.name=efficientnet_b99", "student.name"),
                                          ("cakd.replace_prob=1.5", "cakd.replace_prob"),
                                          ("teacher.cnn_weights=/no/such/file.pth", "teacher.cnn_weights")])
def test_demo_checks_its_configuration_before_any_work(tmp_path, capsys, override, key):
    assert_one_line_error(capsys, ["demo", "--out", str(tmp_path / "demo"), "--set", override] + TINY, key)
    assert not (tmp_path / "demo").exists()  # nothing was trained or written


def test_the_real_command_prints_no_traceback_and_debug_shows_it():
    cmd = [sys.executable, "-m", "agkd_models.cli", "train-teacher", "--set", "train.lr=abc"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == "agkd train-teacher: error: train.lr: got 'abc'; expected a number > 0"
    debug = subprocess.run(cmd + ["--debug"], capture_output=True, text=True, timeout=300)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr


# ------------------------------------------------------------------------ checkpoint files


def test_a_full_disk_while_checkpointing_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    args = ["train-teacher", "--out", str(out)] + TINY
    assert main(args) == 0
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        if isinstance(obj, dict) and "optimizer" in obj:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    assert_one_line_error(capsys, args + ["--set", "train.epochs=2", "--resume"],
                          "No space left on device", "checkpoint.pt", "--resume")
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 0
    # No half-written files (the run folder's lock file stays, by design).
    assert not [p.name for p in out.iterdir() if p.name.startswith(".") and p.name not in (".agkd.lock", ".agkd-run")]


def test_rotation_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    for epoch in range(3):
        ckpt.save_rotating({"epoch": epoch}, path)
    assert torch.load(path, weights_only=True)["epoch"] == 2
    assert torch.load(ckpt.previous_path(path), weights_only=True)["epoch"] == 1


# ---------------------------------------------------------------------------- declarations


def test_every_default_passes_its_own_check_and_every_preset_loads():
    assert validate_config({}) == default_config()
    for preset in PRESETS:
        config = load_config(preset).to_dict()
        assert set(config) == set(SECTIONS)
        for section, cls in SECTIONS.items():
            assert set(config[section]) == {f.name for f in dataclasses.fields(cls)}, (preset, section)


def test_every_setting_says_what_it_is():
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.metadata["rule"].help, f"{section}.{f.name}"


def test_unknown_and_misspelt_keys():
    with pytest.raises(ConfigError, match=r"unknown key 'train.epoch' \(did you mean 'train.epochs'\?\)"):
        validate_config({"train": {"epoch": 3}})
    with pytest.raises(ConfigError, match="unknown section 'trian'"):
        validate_config({"trian": {}})
    with pytest.raises(ConfigError, match=r"agkd.padding: got 'reflekt' \(did you mean 'reflect'\?\)"):
        load_config("digits", ["agkd.padding=reflekt"])
    with pytest.raises(ConfigError, match=r"unknown key 'distill.temprature'.*distill has: method"):
        load_config("digits", ["distill.temprature=2"])
    with pytest.raises(ConfigError, match=r"agkd.beta is now called agkd.attention_weight"):
        load_config("digits", ["agkd.beta=2"])


def test_settings_are_checked_on_every_assignment():
    config = load_config("digits")
    with pytest.raises(ConfigError, match=r"train\.lr: got -1"):
        config.train.lr = -1
    with pytest.raises(ConfigError, match=r"agkd\.window_size: got 4; expected an odd integer"):
        config.agkd.window_size = 4
    with pytest.raises(ConfigError, match=r"unknown key 'agkd\.windw_size' \(did you mean 'agkd\.window_size'\?\)"):
        config.agkd.windw_size = 5
    assert config.train.lr == 0.002 and config.agkd.window_size == 3  # left as they were


def test_values_are_normalised():
    config = load_config("digits", ["train.lr=1e-3", "train.amp=off", "train.epochs=2.0", "train.grad_clip=null"])
    assert config.train.lr == 0.001 and config.train.amp == "off"
    assert config.train.epochs == 2 and isinstance(config.train.epochs, int)
    assert config.train.grad_clip is None
    for bad in ("train.epochs=2.5", "train.progress=maybe", "data.limit_train=0", "logit.temperature=0",
                "agkd.kd_weight=1.2", "train.momentum=1", "train.device=gpu", "student.stages=[a]"):
        with pytest.raises(ConfigError, match=bad.split("=")[0].replace(".", r"\.")):
            load_config("digits", [bad])


def test_saved_config_has_every_setting(tmp_path):
    config = load_config("digits")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    assert load_config(str(path)) == config


@pytest.mark.parametrize("method,overrides,attributes", [
    ("agkd", ["agkd.ssim_weight=0.3", "agkd.cosine_weight=0.7", "agkd.attention_loss=ssim",
              "agkd.window_size=5", "agkd.padding=reflect", "agkd.temperature=2.5", "agkd.kd_weight=0.4",
              "agkd.logit_weight=0.6", "agkd.attention_weight=2.0"],
     {"ssim_weight": 0.3, "cosine_weight": 0.7, "attention_loss": "ssim", "window_size": 5, "padding": "reflect",
      "temperature": 2.5, "kd_weight": 0.4, "logit_weight": 0.6, "attention_weight": 2.0}),
    ("logit", ["logit.temperature=3.0", "logit.kd_weight=0.25"], {"temperature": 3.0, "kd_weight": 0.25}),
    ("agkd", ["agkd.attention_loss=perceptual", "agkd.perceptual_layers=2"], {"attention_loss": "perceptual"}),
    ("cakd", ["cakd.adversarial_weight=0.2", "cakd.ce_weight=0.5", "cakd.discriminator_every=3"],
     {"adversarial_weight": 0.2, "ce_weight": 0.5, "discriminator_every": 3}),
])
def test_distiller_settings_reach_the_distiller(method, overrides, attributes):
    cfg = load_config("digits", overrides + ["cakd.replace_prob=0.25", "cakd.dropout=0.3",
                                             "cakd.view_prob=0.8", "cakd.discriminator_lr=0.002"])
    task = build_task(method, build_teacher(cfg, 10), build_student(cfg, 10), cfg.section(method))
    for name, value in attributes.items():
        assert getattr(task.settings, name) == value, name
    if "agkd.perceptual_layers=2" in overrides:  # the teacher CNN's first two modules
        first_two = list(task.teacher.cnn.children())[:2]
        assert len(task.perceptual) == 2 and all(a is b for a, b in zip(task.perceptual, first_two))
    if method == "cakd":
        assert task.pca.replace_prob == 0.25 and task.gl.dropout.p == 0.3 and task.generator.p == 0.8
        assert task.discriminator_optimizer.param_groups[0]["lr"] == 0.002


def test_the_old_flat_distill_keys_still_load_where_they_live_now(tmp_path):
    old = {"distill": {"method": "agkd", "alpha": 0.6, "beta": 2.0, "hybrid_alpha": 0.3, "hybrid_beta": 0.7,
                       "kd_alpha": 0.4, "temperature": 2.5, "window_size": 5, "lam": 0.2, "view_terms": "all"}}
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(old))
    with pytest.warns(FutureWarning) as caught:
        config = load_config(str(path))
    assert (config.agkd.logit_weight, config.agkd.attention_weight, config.agkd.ssim_weight,
            config.agkd.cosine_weight, config.agkd.window_size) == (0.6, 2.0, 0.3, 0.7, 5)
    # The logit term's settings were shared by logit KD and AGKD: both get them.
    assert (config.logit.kd_weight, config.logit.temperature) == (0.4, 2.5)
    assert (config.agkd.kd_weight, config.agkd.temperature) == (0.4, 2.5)
    assert (config.cakd.adversarial_weight, config.cakd.view_terms) == (0.2, "all")
    said = " ".join(str(w.message) for w in caught)
    assert "distill.alpha is deprecated" in said and "agkd.logit_weight" in said
    with pytest.warns(FutureWarning, match=r"distill\.kd_alpha .* logit\.kd_weight and agkd\.kd_weight"):
        overridden = load_config("digits", ["distill.kd_alpha=0.7"])  # an override beats the preset's value
    assert load_config("digits").agkd.kd_weight != 0.7
    assert overridden.agkd.kd_weight == overridden.logit.kd_weight == 0.7


def test_student_stages_reach_the_student():
    cfg = load_config("digits", ["student.stages=[1,3]"])
    assert tuple(build_student(cfg, 10).stages) == (1, 3)
