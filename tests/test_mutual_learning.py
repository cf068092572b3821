"""Deep mutual learning (dml): its terms against a hand computation, each peer trained by
its own terms alone, every setting reaching the loss, no teacher run, a run through
``agkd distill`` (every peer validated, kept and resumed exactly) and ``agkd compare``, and
bad settings refused in one line."""
import json

import pytest
import torch
import torch.nn.functional as F

from agkd_models.cli import main
from agkd_models.distillers import METHODS, build_task
from agkd_models.distillers.dml import DMLSettings, MutualLearning, mutual_learning_terms

from .commands import TINY, assert_one_line_error, assert_resumes_exactly, teacher_file  # noqa: F401 (fixture)
from .test_models import NUM_CLASSES, tiny_student, tiny_teacher


def kl(p_logits, q_logits, tau):
    """τ²·KL(softmax(p/τ) ‖ softmax(q/τ)), mean over the batch, written out."""
    p = torch.softmax(p_logits / tau, 1)
    return tau ** 2 * (p * (torch.log(p) - torch.log_softmax(q_logits / tau, 1))).sum(1).mean()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 3, 32, 32, generator=g), torch.randint(0, NUM_CLASSES, (6,), generator=g)


@pytest.mark.parametrize("peers,tau,weight", [(2, 1.0, 1.0), (3, 2.5, 0.4)])
def test_each_peer_is_ce_plus_the_mean_kl_to_the_others(peers, tau, weight):
    g = torch.Generator().manual_seed(1)
    logits = [torch.randn(5, 4, generator=g) * 3 for _ in range(peers)]
    y = torch.randint(0, 4, (5,), generator=g)
    terms = mutual_learning_terms(logits, y, DMLSettings(peers=peers, temperature=tau, kl_weight=weight))
    want_total = 0
    for i in range(peers):
        prefix = "" if i == 0 else f"peer{i}_"
        ce = F.cross_entropy(logits[i], y)
        mean_kl = sum(kl(logits[j], logits[i], tau) for j in range(peers) if j != i) / (peers - 1)
        torch.testing.assert_close(terms[prefix + "ce"], ce)
        torch.testing.assert_close(terms[prefix + "kl"], weight * mean_kl)
        want_total = want_total + ce + weight * mean_kl
    torch.testing.assert_close(terms["total"], want_total)
    assert set(terms) == {"total"} | {("" if i == 0 else f"peer{i}_") + t for i in range(peers) for t in ("ce", "kl")}


def test_each_peer_learns_from_its_own_terms_alone():
    """The others' predictions are targets: the gradient of the total reaching a peer is
    that of its own CE and KL, not of the KL terms it is the target of."""
    g = torch.Generator().manual_seed(2)
    a, b = (torch.randn(4, 5, generator=g, requires_grad=True) for _ in range(2))
    y = torch.randint(0, 5, (4,), generator=g)
    total = mutual_learning_terms([a, b], y, DMLSettings())["total"]
    grad_a, = torch.autograd.grad(total, a)
    want, = torch.autograd.grad(F.cross_entropy(a, y) + kl(b.detach(), a, 1.0), a)
    torch.testing.assert_close(grad_a, want)


def test_the_peers_are_fresh_models_and_the_teacher_never_runs(batch):
    teacher, student = tiny_teacher(), tiny_student()
    teacher.forward = lambda *_: pytest.fail("DML ran the teacher")
    dml = MutualLearning(teacher, student, peers=3).eval()
    terms = dml(*batch).terms
    assert set(dml.kept_models()) == {"peer1", "peer2"} and dml.inference_model() is student
    trained = {id(p) for p in dml.trainable_parameters()}
    for peer in dml.kept_models().values():
        assert peer.default_cfg["architecture"] == student.name and all(id(p) in trained for p in peer.parameters())
        assert not torch.equal(next(peer.parameters()), next(student.parameters())), "its own initialisation"
    assert torch.isfinite(terms["total"])


CHANGES = {"peers": 3, "kl_weight": 0.25, "temperature": 4.0, "peer_name": "resnet10t"}  # a peer of another family


def test_every_setting_changes_the_loss(batch):
    assert set(CHANGES) == set(METHODS["dml"].settings.rules())  # a test for every setting

    def loss(**changes):
        torch.manual_seed(0)  # the same peers (and dropout draws) each time
        # In train mode: untrained models in eval mode predict near-uniform, every KL ~0.
        task = build_task("dml", tiny_teacher(), tiny_student(), DMLSettings(**changes)).train()
        return task(*batch).terms["total"].item()

    base = loss()
    for key, value in CHANGES.items():
        assert loss(**{key: value}) != base, key


def _distill(out, teacher, *extra):
    return main(["distill", "--config", "digits", *TINY, "--set", "train.epochs=2", "--teacher", str(teacher),
                 "--method", "dml", "--out", str(out), *extra])


def test_dml_trains_through_agkd_distill_keeps_every_peer_and_resumes_exactly(teacher_file, tmp_path):
    history = assert_resumes_exactly(lambda out, *extra: _distill(out, teacher_file, *extra),
                                     tmp_path / "full", tmp_path / "part")
    assert all(0.0 <= r["val_acc_peer1"] <= 1.0 and r["val_loss_peer1"] > 0 for r in history)
    full, part = torch.load(tmp_path / "full" / "peer1.pt"), torch.load(tmp_path / "part" / "peer1.pt")
    assert all(torch.equal(full[k], part[k]) for k in full), "the resumed peer is the same peer"
    assert "peer1: val acc" in (tmp_path / "full" / "report.md").read_text()


def test_agkd_compare_runs_dml_and_reports_every_peer(teacher_file, tmp_path):
    out = tmp_path / "compare"
    assert main(["compare", "--config", "digits", *TINY, "--teacher", str(teacher_file), "--methods", "dml",
                 "--seeds", "1", "--out", str(out)]) == 0
    summary = json.loads((out / "comparison.json").read_text())
    assert 0.0 <= summary["methods"]["dml"]["test_acc_mean"] <= 1.0
    result = json.loads(next(out.rglob("result.json")).read_text())
    assert set(result["kept_test_acc"]) == {"peer1"}
    assert not METHODS["dml"].cacheable  # nothing of the teacher's to replay


def test_a_teacher_cache_is_refused_for_dml_which_reads_no_teacher(teacher_file, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(["cache-teacher", "--config", "digits", *TINY, "--teacher", str(teacher_file), "--epochs", "1",
                 "--out", str(cache)]) == 0
    assert_one_line_error(capsys, ["distill", "--config", "digits", *TINY, "--teacher", str(teacher_file), "--method",
                                   "dml", "--teacher-cache", str(cache), "--out", str(tmp_path / "o")],
                          "'dml' reads no teacher output")


@pytest.mark.parametrize("override,words", [
    ("dml.peers=1", ["dml.peers", "1"]),
    ("dml.temperature=0", ["dml.temperature", "0"]),
    ("dml.peer_name=no_such_net", ["dml.peer_name", "no_such_net", "timm"]),
])
def test_bad_settings_are_one_line_errors(override, words, teacher_file, tmp_path, capsys):
    assert_one_line_error(capsys, ["distill", "--config", "digits", *TINY, "--set", override, "--teacher",
                                   str(teacher_file), "--method", "dml", "--out", str(tmp_path / "o")], *words)
