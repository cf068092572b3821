"""The logit-family distillers (dkd, dist, lskd, ttm, wttm, ctkd, ofa) and AGKD with any of
their losses as its logit term: each loss against a plain computation of its authors'
formula on a tiny batch, every setting reaching the loss, the schedules (DKD's warm-up,
CTKD's curriculum), a run through ``agkd distill`` and ``agkd compare``, resume, and bad
settings refused in one line."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from agkd_models.cli import main
from agkd_models.config import ConfigError, load_config
from agkd_models.distillers import METHODS, build_task
from agkd_models.distillers.ctkd import CTKD, CTKDSettings, reversal_strength
from agkd_models.distillers.dist import DISTSettings, DISTTerm
from agkd_models.distillers.dkd import DKDSettings, DKDTerm
from agkd_models.distillers.lskd import LSKDSettings, LSKDTerm
from agkd_models.distillers.ofa import OFA
from agkd_models.distillers.ttm import TTMSettings, TTMTerm
from agkd_models.distillers.wttm import WTTMSettings, WTTMTerm, power_sum
from agkd_models.experiments.compare import _result_relevant

from .commands import TINY, assert_one_line_error, assert_resumes_exactly, teacher_file  # noqa: F401 (fixture)
from .test_logit_family import (ctkd_authors, dist_authors, lskd_authors, mdistiller_dkd, ofa_authors,
                                ttm_authors)
from .test_models import NUM_CLASSES, tiny_student, tiny_teacher

NEW_METHODS = ("dkd", "dist", "lskd", "ttm", "wttm", "ctkd", "ofa")


def _logits(n=8, k=NUM_CLASSES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(n, k, generator=g), 3 * torch.randn(n, k, generator=g),
            torch.randint(0, k, (n,), generator=g))


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)


# ---------------------------------------------------- each loss against its authors' formula

def test_dkd_is_ce_plus_the_warmed_up_mdistiller_loss():
    s, t, y = _logits()
    settings = DKDSettings(ce_weight=0.7, nckd_weight=2.0, warmup_epochs=4)
    term = DKDTerm(settings)
    for epoch in (0, 2, 3, 9):  # the trainer's epochs; mdistiller counts from 1
        term.start_epoch(epoch, batches=1)
        want = 0.7 * F.cross_entropy(s, y) + min((epoch + 1) / 4, 1.0) * mdistiller_dkd(s, t, y, 1.0, 2.0, 4.0)
        _close(term(s, t, y)["total"], want)


def test_dist_is_ce_plus_the_authors_relations():
    s, t, y = _logits()
    term = DISTTerm(DISTSettings(ce_weight=0.5, inter_weight=2.0, intra_weight=3.0, temperature=4.0))
    _close(term(s, t, y)["total"], 0.5 * F.cross_entropy(s, y) + dist_authors(s, t, 2.0, 3.0, 4.0))


def test_lskd_is_the_authors_ce_and_kd_weights_on_standardized_logits():
    s, t, y = _logits()
    term = LSKDTerm(LSKDSettings())  # 0.1·CE + 9·τ²·KL at τ = 2
    _close(term(s, t, y)["total"], 0.1 * F.cross_entropy(s, y) + 9.0 * lskd_authors(s, t, 2.0))


def test_ttm_is_ce_plus_the_kl_to_the_power_transformed_teacher():
    s, t, y = _logits()
    term = TTMTerm(TTMSettings())  # γ = 0.1, weight 45
    _close(term(s, t, y)["total"], F.cross_entropy(s, y) + 45.0 * ttm_authors(s, t, 0.1))


def test_wttm_weighs_each_sample_by_the_teachers_power_sum():
    s, t, y = _logits()
    gamma = 0.2
    # The authors' WTTM: p_t^γ, its row sum as the weight, the KL to the renormalised power.
    p_t = F.softmax(t, dim=1).pow(gamma)
    norm = p_t.sum(1)
    kl = F.kl_div(F.log_softmax(s, dim=1), p_t / norm.unsqueeze(1), reduction="none").sum(1)
    want = F.cross_entropy(s, y) + 4.0 * (norm * kl).mean()
    _close(WTTMTerm(WTTMSettings())(s, t, y)["total"], want)
    _close(power_sum(t, gamma), norm)
    assert torch.isfinite(power_sum(torch.tensor([[0.0, -1e4, 50.0]]), gamma)).all()  # no underflow to 0**γ


def test_ctkd_is_kd_at_the_learned_temperature_with_its_gradient_reversed():
    s, t, y = _logits()
    settings = CTKDSettings(initial_logit=0.3)
    ctkd = CTKD(tiny_teacher(), tiny_student(), settings)
    term = ctkd.term
    term.start_epoch(4, batches=1)
    strength = reversal_strength(4, settings)
    out = term(s, t, y)
    tau = 1.0 + 20.0 * torch.sigmoid(torch.tensor(0.3))
    _close(out["temperature"], tau)
    _close(out["total"], 0.1 * F.cross_entropy(s, y) + 0.9 * ctkd_authors(s, t, tau))
    out["total"].backward()
    # The plain composition's dL/dθ, reversed and scaled by the curriculum's strength.
    theta = torch.tensor(0.3, requires_grad=True)
    plain = 0.1 * F.cross_entropy(s, y) + 0.9 * ctkd_authors(s, t, 1.0 + 20.0 * torch.sigmoid(theta))
    (d_theta,) = torch.autograd.grad(plain, theta)
    _close(ctkd.temperature_logit.grad, -strength * d_theta)
    assert any(p is ctkd.temperature_logit for p in ctkd.trainable_parameters())


def test_ctkd_curriculum_rises_along_a_half_cosine_as_the_authors_decay():
    settings = CTKDSettings(curriculum_epochs=10, max_reversal=1.0)
    # The authors' CosineDecay(max 0, min -1, 10 loops) at their 1-based epoch, negated.
    authors = [-((math.cos(min(e, 10) * math.pi / 10) + 1) * 0.5 * (0 - (-1)) + (-1)) for e in range(1, 14)]
    ours = [reversal_strength(e, settings) for e in range(13)]
    for a, b in zip(authors, ours):
        assert abs(a - b) < 1e-12
    assert ours[0] > 0 and ours[9] == pytest.approx(1.0) and ours[12] == pytest.approx(1.0)


def test_ofa_is_ce_plus_the_authors_loss_on_the_logits_and_on_each_branch():
    torch.manual_seed(0)
    teacher, student = tiny_teacher(), tiny_student()
    ofa = OFA(teacher, student, eps=1.5, branch_weight=0.5).eval()
    images = torch.randn(4, 3, 32, 32)
    y = torch.tensor([1, 0, 3, 9])
    terms = ofa(images, y).terms
    with torch.no_grad():
        s, t = student(images), teacher(images)
        mask = F.one_hot(y, NUM_CLASSES)
        branches = sum(ofa_authors(ofa.branches[str(stage)](s.features[stage]), t.logits, mask, 1.5)
                       for stage in (2, 3))
        want = F.cross_entropy(s.logits, y) + ofa_authors(s.logits, t.logits, mask, 1.5) + 0.5 * branches
    _close(terms["total"].detach(), want)
    assert list(ofa.branches) == ["2", "3"]  # the student's attention stages by default
    trained = {id(p) for p in ofa.trainable_parameters()}
    assert all(id(p) in trained for p in ofa.branches.parameters())
    assert ofa.inference_model() is student  # the branches are training-only


def test_mixed_targets_take_their_dominant_class_for_the_target_split():
    s, t, y = _logits()
    soft = 0.3 * torch.softmax(torch.randn(8, NUM_CLASSES), 1) + 0.7 * F.one_hot(y, NUM_CLASSES)
    term = DKDTerm(DKDSettings(ce_weight=0.0))
    _close(term(s, t, soft)["total"], term(s, t, y)["total"])


# ------------------------------------------------------------- every setting reaches the loss

# A value unlike each setting's default, per method.
CHANGES = {
    "dkd": {"ce_weight": 0.5, "tckd_weight": 2.0, "nckd_weight": 1.0, "temperature": 2.0, "warmup_epochs": 1},
    "dist": {"ce_weight": 0.5, "inter_weight": 2.0, "intra_weight": 0.5, "temperature": 4.0},
    "lskd": {"ce_weight": 0.5, "kd_weight": 3.0, "temperature": 3.0},
    "ttm": {"ce_weight": 0.5, "kd_weight": 10.0, "gamma": 0.3},
    "wttm": {"ce_weight": 0.5, "kd_weight": 1.0, "gamma": 0.5},
    "ctkd": {"ce_weight": 0.5, "kd_weight": 0.5, "temperature_min": 2.0, "temperature_span": 5.0,
             "initial_logit": -1.0, "curriculum_epochs": 2, "max_reversal": 0.5},
    "ofa": {"ce_weight": 0.5, "kd_weight": 2.0, "branch_weight": 0.3, "eps": 1.5, "temperature": 2.0,
            "stages": [1, 3]},
}


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, NUM_CLASSES, (8,), generator=g)


def _loss(method, batch, **changes):
    settings = METHODS[method].settings(**changes)
    task = build_task(method, tiny_teacher(), tiny_student(), settings).eval()
    task.start_epoch(1, batches=1)  # past DKD's first warm-up epoch
    return task(*batch).terms["total"].item()


@pytest.mark.parametrize("method", NEW_METHODS)
def test_every_setting_changes_the_loss(method, batch):
    assert set(CHANGES[method]) == set(METHODS[method].settings.rules())  # a test for every setting
    base = _loss(method, batch)
    for key, value in CHANGES[method].items():
        if (method, key) in {("ctkd", "curriculum_epochs"), ("ctkd", "max_reversal")}:
            continue  # they act on the temperature's gradient: below
        assert _loss(method, batch, **{key: value}) != base, key


def test_ctkd_curriculum_settings_change_the_temperatures_gradient():
    s, t, y = _logits()

    def grad(**changes):
        ctkd = CTKD(tiny_teacher(), tiny_student(), CTKDSettings(**changes))
        ctkd.start_epoch(0, batches=1)
        ctkd.term(s, t, y)["total"].backward()
        return ctkd.temperature_logit.grad.item()

    base = grad()
    assert grad(curriculum_epochs=2) != base and grad(max_reversal=0.5) != base


def test_agkd_takes_another_methods_loss_as_its_logit_term_with_that_methods_section(batch):
    cfg = load_config("digits", ["agkd.logit_loss=dkd", "dkd.warmup_epochs=1"])

    def agkd_loss(cfg):
        sections = {name: cfg.section(name) for name, m in METHODS.items() if m.settings}
        task = build_task("agkd", tiny_teacher(), tiny_student(), cfg.agkd, sections=sections).eval()
        out = task(*batch).terms
        return out["logits_kd"].item(), out["total"].item()

    with_dkd = agkd_loss(cfg)
    cfg.dkd.nckd_weight = 2.0
    assert agkd_loss(cfg)[0] != with_dkd[0]  # the dkd section reached AGKD's logit term
    cfg.agkd.logit_loss = "kd"
    plain = agkd_loss(cfg)
    cfg.dkd.nckd_weight = 3.0
    assert agkd_loss(cfg) == plain  # with its own Hinton term, the dkd section plays no part
    # In a comparison, a run's identity holds the sections its loss reads and no others.
    cfg.agkd.logit_loss = "dist"
    assert "dist" in _result_relevant(cfg, "agkd") and "dkd" not in _result_relevant(cfg, "agkd")
    assert "dist" not in _result_relevant(cfg, "logit")


# -------------------------------------------------------------- through the command line

def _distill(out, teacher, method, *extra):
    return main(["distill", "--config", "digits", *TINY, "--set", "train.epochs=2", "--teacher", str(teacher),
                 "--method", method, "--out", str(out), *extra])


@pytest.mark.parametrize("method", NEW_METHODS)
def test_each_method_trains_through_agkd_distill_and_resumes_exactly(method, teacher_file, tmp_path):
    history = assert_resumes_exactly(lambda out, *extra: _distill(out, teacher_file, method, *extra),
                                     tmp_path / "full", tmp_path / "part")
    if method == "ctkd":
        assert all(1.0 <= r["train_temperature"] <= 21.0 for r in history)


def test_agkd_compare_runs_every_new_method(teacher_file, tmp_path, capsys):
    out = tmp_path / "compare"
    code = main(["compare", "--config", "digits", *TINY, "--teacher", str(teacher_file), "--methods",
                 ",".join(NEW_METHODS), "--seeds", "1", "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "comparison.json").read_text())
    assert list(summary["methods"]) == list(NEW_METHODS)
    assert all(0.0 <= m["test_acc_mean"] <= 1.0 for m in summary["methods"].values())
    assert (out / "cache").is_dir()  # every one of them replays the teacher cache


@pytest.mark.parametrize("override,words", [
    ("dkd.nckd_weight=-1", ["dkd.nckd_weight", "-1"]),
    ("dkd.warmup_epochs=0", ["dkd.warmup_epochs"]),
    ("ttm.gamma=0", ["ttm.gamma"]),
    ("ctkd.curriculum_epochs=0", ["ctkd.curriculum_epochs"]),
    ("ofa.stages=[2, 40]", ["ofa.stages", "stage 40"]),
    ("ofa.eps=100", ["ofa.eps"]),
    ("agkd.logit_loss=ofa", ["agkd.logit_loss", "dkd"]),
])
def test_bad_settings_are_one_line_errors(override, words, teacher_file, tmp_path, capsys):
    method = override.partition(".")[0]
    assert_one_line_error(capsys, ["distill", "--config", "digits", *TINY, "--set", override, "--teacher",
                                   str(teacher_file), "--method", method, "--out", str(tmp_path / "o")], *words)


def test_lskd_with_both_weights_zero_is_refused(teacher_file, tmp_path, capsys):
    with pytest.raises(ConfigError, match="lskd.ce_weight and lskd.kd_weight are both 0"):
        LSKDTerm(LSKDSettings(ce_weight=0.0, kd_weight=0.0))
    assert_one_line_error(capsys, ["distill", "--config", "digits", *TINY, "--set", "lskd.ce_weight=0", "--set",
                                   "lskd.kd_weight=0", "--teacher", str(teacher_file), "--method", "lskd", "--out",
                                   str(tmp_path / "o")], "both 0")
    assert not (tmp_path / "o").exists()  # refused before any work
