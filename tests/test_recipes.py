"""Training-recipe settings reach the losses: train.label_smoothing in every cross-entropy
term, mixup / cutmix (timm's Mixup) turning the batch's targets into probabilities that
kd_loss takes and the online teacher seeing the mixed images, and the teacher cache
refusing mixed batches."""
import pytest
import torch
import torch.nn.functional as F

import agkd_ops
from agkd_models import AGKD, CAKD, LogitKD
from agkd_models.config import ConfigError, TrainConfig, load_config
from agkd_models.distillers import build_task
from agkd_models.engine import SupervisedTask, Task, TaskOutput, Trainer
from agkd_models.experiments.experiment import distill

from .test_models import NUM_CLASSES, tiny_student, tiny_teacher


class _Recorder(Task):
    """A linear classifier that records the images and targets each step hands it."""

    def __init__(self):
        super().__init__()
        self.classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
        self.seen = []

    def trainable_parameters(self):
        return self.parameters()

    def inference_model(self):
        return self.classifier

    def forward(self, images, targets, teacher_out=None):
        self.seen.append((images.detach().clone(), targets.detach().clone()))
        logits = self.classifier(images)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
        return TaskOutput({"ce": loss, "total": loss}, logits.detach())


def _data(n=8):
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(torch.randn(n, 3, 2, 2, generator=g), torch.arange(n) % 3)


def _trainer(task, out, **kw):
    return Trainer(task, _config(**kw.pop("config", {})), out, **kw)


def _config(**kw):
    return TrainConfig(**{"epochs": 1, "batch_size": 4, "progress": False, "device": "cpu", **kw})


def test_a_task_gets_its_label_smoothing_when_built_and_the_trainer_checks_it(tmp_path):
    model = torch.nn.Linear(12, 3)
    Trainer(SupervisedTask(model, label_smoothing=0.2), _config(label_smoothing=0.2), tmp_path)
    with pytest.raises(ValueError, match="built with label_smoothing=0.0, but train.label_smoothing is 0.2"):
        Trainer(SupervisedTask(model), _config(label_smoothing=0.2), tmp_path)


def test_the_pipeline_builds_every_task_with_train_label_smoothing():
    cfg = load_config("digits", ["train.label_smoothing=0.15"])
    for method in ("none", "logit", "agkd", "cakd"):
        task = build_task(method, tiny_teacher(), tiny_student(), cfg.section(method) if method != "none" else None,
                          label_smoothing=cfg.train.label_smoothing)
        assert task.label_smoothing == 0.15, method


def test_supervised_cross_entropy_is_smoothed():
    model = torch.nn.Linear(5, 4)
    task = SupervisedTask(model, label_smoothing=0.3)
    x, y = torch.randn(6, 5), torch.arange(6) % 4
    out = task(x, y)
    torch.testing.assert_close(out.terms["ce"], F.cross_entropy(model(x), y, label_smoothing=0.3))


@pytest.mark.parametrize("build", [lambda t, s: LogitKD(t, s, label_smoothing=0.1),
                                   lambda t, s: AGKD(t, s, attention_loss="mse", label_smoothing=0.1)])
def test_distillers_pass_label_smoothing_and_probability_targets_to_kd_loss(build, monkeypatch):
    calls = []
    real = agkd_ops.kd_loss
    monkeypatch.setattr(agkd_ops, "kd_loss", lambda *a, **kw: calls.append((a, kw)) or real(*a, **kw))
    task = build(tiny_teacher(), tiny_student())
    images = torch.randn(4, 3, 32, 32)
    soft = torch.softmax(torch.randn(4, NUM_CLASSES), 1)
    out = task(images, soft)
    assert torch.isfinite(out.terms["total"])
    (args, kw), = calls
    assert kw["label_smoothing"] == 0.1 and args[2] is soft


def test_cakd_cross_entropy_is_smoothed(monkeypatch):
    seen = []
    real = F.cross_entropy
    monkeypatch.setattr(F, "cross_entropy", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    task = CAKD(tiny_teacher(), tiny_student(), label_smoothing=0.25)
    task(torch.randn(4, 3, 32, 32), torch.arange(4))
    assert seen and all(kw.get("label_smoothing") == 0.25 for kw in seen)


@pytest.mark.parametrize("setting", [dict(mixup=1.0), dict(cutmix=1.0), dict(mixup=0.4, cutmix=1.0)])
def test_mixup_gives_the_task_mixed_images_and_probability_targets(tmp_path, setting):
    task = _Recorder()
    _trainer(task, tmp_path, config=setting, num_classes=3).fit(_data(), _data())
    images, targets = task.seen[0]
    assert targets.shape == (4, 3) and targets.dtype == torch.float32
    torch.testing.assert_close(targets.sum(1), torch.ones(4))
    assert (targets > 0).sum(1).max() == 2  # two classes mixed per row (the pairs differ here)
    originals = _data()[0:4][0]
    assert not torch.equal(images, originals)


def test_mixing_is_off_by_default_and_needs_the_class_count(tmp_path):
    task = _Recorder()
    _trainer(task, tmp_path).fit(_data(), _data())
    assert task.seen[0][1].dtype == torch.int64
    with pytest.raises(ValueError, match="number of classes"):
        Trainer(_Recorder(), _config(mixup=0.2), tmp_path)


def test_an_odd_batch_keeps_its_class_targets(tmp_path):
    # timm pairs each image with the batch's reverse, which needs an even batch.
    task = _Recorder()
    _trainer(task, tmp_path, config=dict(mixup=1.0, batch_size=5), num_classes=3).fit(_data(5), _data(5))
    assert task.seen[0][1].shape == (5,) and task.seen[0][1].dtype == torch.int64


def test_the_teacher_cache_refuses_mixed_batches(tmp_path):
    cfg = load_config("digits", ["train.mixup=0.2", "distill.method=logit"])
    with pytest.raises(ConfigError, match="teacher-cache cannot serve train.mixup"):
        distill(cfg, str(tmp_path / "teacher.pt"), tmp_path / "out", teacher_cache=str(tmp_path / "cache"))
