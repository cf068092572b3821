"""Chains of distillation runs (``agkd chain``): teacher assistants (``--through``) and
born-again generations (``--generations``). The plan of each, a trained student standing
in for a teacher, each step distilled from exactly the previous step's student (the same
weights as that run made by hand), a second pass skipping finished steps and retraining
those a change reaches, and bad chains refused in one line."""
import json

import pytest
import torch

from agkd_models.cli import main
from agkd_models.config import ConfigError, load_config
from agkd_models.data.cache import teacher_fingerprint
from agkd_models.experiments.chain import ChainStep, plan_chain, step_config
from agkd_models.experiments.experiment import Experiment
from agkd_models.experiments.pipeline import build_student, load_student_weights
from agkd_models.models.student import StudentTeacher

from .commands import TINY, assert_one_line_error, teacher_file  # noqa: F401 (fixture)
from .test_models import tiny_student


def test_the_plans_of_an_assistant_chain_and_of_born_again_generations():
    cfg = load_config("digits", ["distill.method=dkd"])
    assert plan_chain(cfg, through=["efficientnet_b3", "efficientnet_b1"]) == [
        ChainStep("assistant1-efficientnet_b3", "efficientnet_b3", "dkd"),
        ChainStep("assistant2-efficientnet_b1", "efficientnet_b1", "dkd"),
        ChainStep("student", "efficientnet_b0", "dkd")]
    assert plan_chain(cfg, generations=2, has_teacher=False) == [
        ChainStep("gen0", "efficientnet_b0", "none"), ChainStep("gen1", "efficientnet_b0", "dkd"),
        ChainStep("gen2", "efficientnet_b0", "dkd")]
    assert [s.name for s in plan_chain(cfg, generations=2)] == ["gen1", "gen2"]  # the teacher is generation 0
    with pytest.raises(ConfigError, match="read only a teacher's outputs"):
        plan_chain(load_config("digits", ["distill.method=fitnet"]), generations=1)
    with pytest.raises(ConfigError, match="without --teacher"):
        plan_chain(cfg, through=["efficientnet_b1"], has_teacher=False)


def test_a_student_as_teacher_gives_its_logits_and_its_last_stage_map():
    student = tiny_student().eval()
    images = torch.randn(2, 3, 32, 32)
    out, want = StudentTeacher(student)(images), student(images)
    assert torch.equal(out.logits, want.logits) and torch.equal(out.attention, want.attention[-1])


def _chain(out, *args):
    return main(["chain", "--config", "digits", *TINY, "--out", str(out), *args])


def test_an_assistant_chain_distils_each_step_from_the_previous_students_weights(teacher_file, tmp_path, capsys):
    out = tmp_path / "takd"
    assert _chain(out, "--teacher", str(teacher_file), "--through", "efficientnet_b1", "--method", "agkd") == 0
    summary = json.loads((out / "chain.json").read_text())
    assert [s["step"] for s in summary["steps"]] == ["assistant1-efficientnet_b1", "student"]
    assert [s["student"] for s in summary["steps"]] == ["efficientnet_b1", "efficientnet_b0"]
    assert "assistant1-efficientnet_b1" in (out / "chain.md").read_text()

    # The student's step by hand: distilled from the assistant's saved weights, the same student.
    cfg = load_config("digits", [a for a in TINY if a != "--set"] + ["distill.method=agkd"])
    experiment = Experiment(cfg, teacher_file)
    step = ChainStep("student", "efficientnet_b0", "agkd")
    assistant_cfg = step_config(cfg, ChainStep("a", "efficientnet_b1", "agkd"))
    assistant = build_student(assistant_cfg, 10)
    load_student_weights(assistant, str(out / "assistant1-efficientnet_b1" / "student.pt"), assistant_cfg, 10)
    experiment.distill(step_config(cfg, step), tmp_path / "by-hand", teacher=StudentTeacher(assistant))
    chained, by_hand = torch.load(out / "student" / "student.pt"), torch.load(tmp_path / "by-hand" / "student.pt")
    assert all(torch.equal(chained[k], by_hand[k]) for k in chained)
    identity = json.loads((out / "student" / "result.json").read_text())["identity"]
    assert identity["teacher"] == teacher_fingerprint(StudentTeacher(assistant),
                                                      {"student": "efficientnet_b1", "stages": list(assistant_cfg.student.stages)})


def test_born_again_generations_skip_what_is_done_and_retrain_what_a_change_reaches(tmp_path, capsys):
    out = tmp_path / "ban"
    assert _chain(out, "--generations", "2", "--method", "logit") == 0
    summary = json.loads((out / "chain.json").read_text())
    assert [(s["step"], s["method"]) for s in summary["steps"]] == [("gen0", "none"), ("gen1", "logit"),
                                                                    ("gen2", "logit")]
    assert summary["steps"][0]["compare"] is None and summary["steps"][1]["compare"]["kl"] >= 0
    capsys.readouterr()
    assert _chain(out, "--generations", "2", "--method", "logit") == 0
    assert capsys.readouterr().out.count("done before") == 3
    # A logit setting leaves generation 0 (trained on the labels) alone, and reaches both others.
    assert _chain(out, "--generations", "2", "--method", "logit", "--set", "logit.temperature=2") == 0
    assert capsys.readouterr().out.count("done before") == 1


@pytest.mark.parametrize("args,words", [
    (["--generations", "1", "--method", "rkd"], ["chain", "rkd", "read only a teacher's outputs"]),
    (["--method", "logit"], ["--generations", "--teacher"]),
    (["--generations", "1", "--through", "no_such_net", "--teacher", "{teacher}"], ["no_such_net"]),
])
def test_bad_chains_are_one_line_errors(args, words, teacher_file, tmp_path, capsys):
    args = [str(teacher_file) if a == "{teacher}" else a for a in args]
    assert_one_line_error(capsys, ["chain", "--config", "digits", *TINY, "--out", str(tmp_path / "c"), *args], *words)
