"""The feature and relation distillers (fitnet, rkd): each loss against a hand computation
on a tiny batch, every setting reaching the loss, a run through ``agkd distill`` (with an
exact resume) and ``agkd compare``, and bad settings refused in one line."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from agkd_models.cli import main
from agkd_models.distillers import METHODS, build_task
from agkd_models.distillers.fitnet import FitNet
from agkd_models.distillers.rkd import RKD, rkd_angle_loss, rkd_distance_loss

from .commands import TINY, assert_one_line_error, assert_resumes_exactly, teacher_file  # noqa: F401 (fixture)
from .test_models import NUM_CLASSES, tiny_student, tiny_teacher

METHODS_HERE = ("fitnet", "rkd")


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 3, 32, 32, generator=g), torch.randint(0, NUM_CLASSES, (6,), generator=g)


def test_fitnet_is_ce_plus_the_mse_of_the_regressed_stage_against_the_teachers_features(batch):
    images, y = batch
    teacher, student = tiny_teacher(), tiny_student()
    fitnet = FitNet(teacher, student, hint_weight=10.0, ce_weight=0.5).eval()
    terms = fitnet(images, y).terms
    with torch.no_grad():
        s, t = student(images), teacher(images)
        regressed = fitnet.regressor(s.features[3])  # the last attention stage of the tiny student
        assert regressed.shape[1] == t.cnn_features.shape[1]
        hint = F.interpolate(regressed, size=t.cnn_features.shape[-2:], mode="bilinear", align_corners=False)
        want = 0.5 * F.cross_entropy(s.logits, y) + 10.0 * ((hint - t.cnn_features) ** 2).mean()
    torch.testing.assert_close(terms["total"].detach(), want, rtol=1e-5, atol=1e-6)
    trained = {id(p) for p in fitnet.trainable_parameters()}
    assert all(id(p) in trained for p in fitnet.regressor.parameters())
    assert fitnet.inference_model() is student  # the regressor is training-only


def test_rkd_distance_loss_by_hand():
    # A 3-4-5 triangle against the unit right triangle: distances (3, 4, 5) / 4 and
    # (1, 1, √2) / ((2 + √2) / 3); each appears twice in the 3x3 matrix, the diagonal is 0.
    student = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    teacher = torch.tensor([[0.0, 0.0, 7.0], [1.0, 0.0, 7.0], [0.0, 1.0, 7.0]])  # another width: no matter
    s = [3 / 4, 4 / 4, 5 / 4]
    m = (2 + math.sqrt(2)) / 3
    t = [1 / m, 1 / m, math.sqrt(2) / m]
    huber = lambda d: 0.5 * d * d if abs(d) < 1 else abs(d) - 0.5  # noqa: E731
    want = 2 * sum(huber(a - b) for a, b in zip(s, t)) / 9
    assert abs(rkd_distance_loss(student, teacher).item() - want) < 1e-6
    # Distances are compared after normalisation: a scaled copy matches exactly.
    assert rkd_distance_loss(student, 2.5 * student).item() < 1e-12


def test_rkd_angle_loss_by_hand():
    # From each vertex of the 3-4-5 triangle the two others are seen at the angle whose
    # cosine is 0 (at the right angle), 3/5 and 4/5; a vector with itself has cosine 1, and
    # the zero vector (a vertex to itself) cosine 0 with everything.
    student = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    cos = {0: 0.0, 1: 3 / 5, 2: 4 / 5}
    want = torch.zeros(3, 3, 3)
    for i in range(3):
        others = [j for j in range(3) if j != i]
        for j in others:
            want[i, j, j] = 1.0
        want[i, others[0], others[1]] = want[i, others[1], others[0]] = cos[i]
    flat = torch.zeros(3, 2)  # every angle cosine 0
    huber = torch.where(want.abs() < 1, 0.5 * want ** 2, want.abs() - 0.5)
    assert abs(rkd_angle_loss(flat, student).item() - huber.mean().item()) < 1e-6
    rotated = student @ torch.tensor([[0.6, -0.8], [0.8, 0.6]]) * 3.0 + 1.0  # rotated, scaled, moved
    assert rkd_angle_loss(student, rotated).item() < 1e-10


def test_rkd_reads_the_penultimate_embeddings(batch):
    images, y = batch
    teacher, student = tiny_teacher(), tiny_student()
    rkd = RKD(teacher, student, distance_weight=2.0, angle_weight=3.0).eval()
    terms = rkd(images, y).terms
    with torch.no_grad():
        feats = student.model.forward_head(student.model.forward_features(images), pre_logits=True)
        cnn = teacher.cnn.forward_head(teacher.cnn.forward_features(images), pre_logits=True)
        vit = teacher.vit.forward_head(teacher.vit.forward_features(images), pre_logits=True)
        t = torch.cat([cnn, vit], 1)
        want = (F.cross_entropy(student(images).logits, y) + 2.0 * rkd_distance_loss(feats, t)
                + 3.0 * rkd_angle_loss(feats, t))
    torch.testing.assert_close(terms["total"].detach(), want, rtol=1e-5, atol=1e-6)
    assert rkd.inference_model() is student


CHANGES = {"fitnet": {"ce_weight": 0.5, "hint_weight": 3.0, "stage": 2},
           "rkd": {"ce_weight": 0.5, "distance_weight": 5.0, "angle_weight": 7.0}}


@pytest.mark.parametrize("method", METHODS_HERE)
def test_every_setting_changes_the_loss(method, batch):
    assert set(CHANGES[method]) == set(METHODS[method].settings.rules())  # a test for every setting

    def loss(**changes):
        torch.manual_seed(0)  # the same regressor initialisation each time
        task = build_task(method, tiny_teacher(), tiny_student(), METHODS[method].settings(**changes)).eval()
        return task(*batch).terms["total"].item()

    base = loss()
    for key, value in CHANGES[method].items():
        assert loss(**{key: value}) != base, key


def _distill(out, teacher, method, *extra):
    return main(["distill", "--config", "digits", *TINY, "--set", "train.epochs=2", "--teacher", str(teacher),
                 "--method", method, "--out", str(out), *extra])


@pytest.mark.parametrize("method", METHODS_HERE)
def test_each_method_trains_through_agkd_distill_and_resumes_exactly(method, teacher_file, tmp_path):
    assert_resumes_exactly(lambda out, *extra: _distill(out, teacher_file, method, *extra),
                           tmp_path / "full", tmp_path / "part")


def test_agkd_compare_runs_them_online(teacher_file, tmp_path):
    out = tmp_path / "compare"
    assert main(["compare", "--config", "digits", *TINY, "--teacher", str(teacher_file), "--methods",
                 ",".join(METHODS_HERE), "--seeds", "1", "--out", str(out)]) == 0
    summary = json.loads((out / "comparison.json").read_text())
    assert list(summary["methods"]) == list(METHODS_HERE)
    assert all(0.0 <= m["test_acc_mean"] <= 1.0 for m in summary["methods"].values())
    assert not METHODS["fitnet"].cacheable and not METHODS["rkd"].cacheable  # they read the teacher's insides


@pytest.mark.parametrize("override,words", [
    ("fitnet.stage=40", ["fitnet.stage", "stage 40"]),
    ("fitnet.hint_weight=-1", ["fitnet.hint_weight", "-1"]),
    ("rkd.angle_weight=-2", ["rkd.angle_weight", "-2"]),
])
def test_bad_settings_are_one_line_errors(override, words, teacher_file, tmp_path, capsys):
    method = override.partition(".")[0]
    assert_one_line_error(capsys, ["distill", "--config", "digits", *TINY, "--set", override, "--teacher",
                                   str(teacher_file), "--method", method, "--out", str(tmp_path / "o")], *words)
