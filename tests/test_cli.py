"""The agkd command and the trainer: end to end on digits with a tiny budget (teacher, then
distill, then evaluate), config overrides and the saved resolved config, exact resume
after SIGKILL mid-epoch, atomic checkpoints, non-finite loss stop, clear data errors,
reports and plots."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from agkd_models.cli import main
from agkd_models.config import ConfigError, load_config
from agkd_models.config import TrainConfig
from agkd_models.engine import NonFiniteLossError, SupervisedTask, Task, TaskOutput, Trainer
from agkd_models.engine.checkpoint import atomic_save

TINY = ["--set", "data.limit_train=64", "--set", "data.limit_val=32", "--set", "data.limit_test=32", "--set", "train.epochs=1",
        "--set", "train.batch_size=32", "--set", "train.progress=false"]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    assert main(["train-teacher", "--out", str(out)] + TINY) == 0
    return out


def test_train_teacher_writes_everything(teacher_run):
    for name in ("teacher.pt", "checkpoint.pt", "metrics.jsonl", "metrics.csv", "report.md", "curves.png",
                 "config.yaml"):
        assert (teacher_run / name).is_file(), name
    config = yaml.safe_load((teacher_run / "config.yaml").read_text())
    assert config["data"]["limit_train"] == 64 and config["train"]["epochs"] == 1  # overrides resolved
    records = [json.loads(line) for line in (teacher_run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and {"train_loss", "val_loss", "train_acc", "val_acc", "train_ce"} <= set(records[0])
    assert "| teacher |" in (teacher_run / "report.md").read_text()
    state = torch.load(teacher_run / "checkpoint.pt", weights_only=True)  # loads without pickle code
    assert state["epoch"] == 0


@pytest.mark.parametrize("method", ["agkd", "logit", "none"])
def test_distill_then_evaluate(teacher_run, tmp_path, method, capsys):
    out = tmp_path / method
    assert main(["distill", "--teacher", str(teacher_run / "teacher.pt"), "--method", method,
                 "--out", str(out)] + TINY) == 0
    report = (out / "report.md").read_text()
    assert "relative error" in report and f"student ({method})" in report
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(out / "student.pt"), "--model", "student", "--split", "val"]
                + TINY) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["samples"] == 32
    assert result["val_acc"] == pytest.approx(records[-1]["val_acc"])


def test_config_errors():
    with pytest.raises(ConfigError, match="unknown key 'train.epoch'"):
        load_config("digits", ["train.epoch=3"])
    with pytest.raises(ConfigError, match="no preset"):
        load_config("imagenet-22k")
    assert load_config("cifar100", ["train.lr=0.1"]).train.lr == 0.1
    assert main(["train-teacher", "--set", "train.epochs"]) == 2


def test_missing_data_root_is_a_clear_cli_error(tmp_path, capsys):
    code = main(["train-teacher", "--config", "caltech101", "--set", f"data.root={tmp_path / 'nope'}",
                 "--out", str(tmp_path / "run")])
    assert code == 2
    assert f"{tmp_path / 'nope'} does not exist" in capsys.readouterr().err


def _cli(out, extra=()):
    return [sys.executable, "-m", "agkd_models.cli", "train-teacher", "--out", str(out),
            "--set", "data.limit_train=96", "--set", "data.limit_val=32", "--set", "train.epochs=3",
            "--set", "train.batch_size=16", "--set", "train.progress=false", *extra]


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # bitwise-repeatable CPU math across processes
    full = tmp_path / "full"
    subprocess.run(_cli(full) + ["--set", "train.num_workers=0"], check=True, env=env, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        time.sleep(0.05)
    time.sleep(0.5)  # into the second epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = metrics.read_text().count("\n")
    assert 1 <= done < 3, "the run should have been killed mid-way"
    subprocess.run(_cli(killed, ["--resume"]), check=True, env=env, capture_output=True)
    want = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    got = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert len(got) == 3
    for a, b in zip(want, got):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert a[key] == b[key], key
    assert torch.equal(torch.load(full / "teacher.pt", weights_only=True)["fuse.weight"],
                       torch.load(killed / "teacher.pt", weights_only=True)["fuse.weight"])


def test_atomic_checkpoint_never_leaves_a_truncated_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    atomic_save({"epoch": 1, "w": torch.ones(3)}, path)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        atomic_save({"epoch": 2, "w": torch.zeros(3)}, path)
    state = torch.load(path, weights_only=True)
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.ones(3))


class _Exploding(Task):
    def __init__(self, bad_epoch):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)
        self.bad_epoch, self.epoch_calls = bad_epoch, 0

    def trainable_parameters(self):
        return self.parameters()

    def inference_model(self):
        return self.linear

    def forward(self, x, y):
        logits = self.linear(x)
        loss = torch.nn.functional.cross_entropy(logits, y)
        self.epoch_calls += 1
        if self.epoch_calls > self.bad_epoch * 2:  # two batches per epoch
            loss = loss * float("nan")
        return TaskOutput({"ce": loss, "total": loss}, logits.detach())


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randint(0, 3, (8,)))
    task = _Exploding(bad_epoch=1)
    trainer = Trainer(task, TrainConfig(epochs=3, batch_size=4, progress=False, device="cpu"), tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss .* epoch 2;.*last good checkpoint"):
        trainer.fit(data, data)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 0 and all(torch.isfinite(v).all() for v in state["task"].values())


@pytest.mark.parametrize("warmup", [0, 2])
def test_resuming_with_more_epochs_follows_the_new_schedule(tmp_path, warmup):
    data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randint(0, 3, (8,)))

    def run(out, epochs, resume=False):
        torch.manual_seed(0)
        task = _Exploding(bad_epoch=100)  # a linear classifier that stays finite here
        config = TrainConfig(epochs=epochs, warmup_epochs=warmup, batch_size=4, lr=0.1, progress=False, device="cpu")
        trainer = Trainer(task, config, out)
        return [r["lr"] for r in trainer.fit(data, data, resume=resume)]

    uninterrupted = run(tmp_path / "full", 5)
    run(tmp_path / "extended", 2)  # a 2-epoch schedule (its warm-up clipped to 1 epoch) ...
    extended = run(tmp_path / "extended", 5, resume=True)  # ... continued as a 5-epoch run
    assert extended[2:] == pytest.approx(uninterrupted[2:], rel=1e-12)
    assert len(set(uninterrupted)) == 5  # the schedule does change the rate every epoch


def test_demo_compares_attention_losses_and_reuses_its_teacher(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--teacher-epochs", "1", "--student-epochs", "1",
            "--attention-losses", "mse,hybrid"] + TINY
    assert main(args) == 0
    report = (out / "report.md").read_text()
    for row in ("| teacher |", "| student, no KD |", "| student, logit KD |",
                "| student, AGKD (mse) |", "| student, AGKD (hybrid) |"):
        assert row in report
    assert (out / "curves.png").stat().st_size > 0 and "Table I" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert not summary["teacher"]["reused"] and summary["test_samples"] == 32
    assert set(summary["students"]) == {"student, no KD", "student, logit KD", "student, AGKD (mse)",
                                        "student, AGKD (hybrid)"}
    assert all(0 <= acc <= 1 for acc in summary["students"].values())
    teacher_mtime = (out / "teacher" / "teacher.pt").stat().st_mtime_ns
    assert main(args) == 0  # again over the same folder: nothing is retrained
    printed = capsys.readouterr().out
    assert "reusing the teacher trained in" in printed and "done before" in printed
    assert (out / "teacher" / "teacher.pt").stat().st_mtime_ns == teacher_mtime
    assert json.loads((out / "summary.json").read_text())["teacher"]["reused"]


def test_trained_teacher_is_reused_only_for_the_same_configuration_and_data(teacher_run):
    from agkd_models.experiments.pipeline import build_data, reusable_teacher
    cfg = load_config(str(teacher_run / "config.yaml"))
    assert reusable_teacher(teacher_run, cfg, build_data(cfg)) == (True, "")
    for override, named in (("train.lr=0.5", "train.lr"), ("teacher.vit_attention=rollout", "teacher.vit_attention"),
                            ("data.split_seed=3", "data.split_seed"), ("train.seed=5", "train.seed")):
        changed = load_config(str(teacher_run / "config.yaml"), [override])
        ok, why = reusable_teacher(teacher_run, changed, build_data(changed))
        assert not ok and named in why, (override, why)
    # Same settings, different samples: the data fingerprint refuses it.
    cfg = load_config(str(teacher_run / "config.yaml"))
    data = build_data(cfg)
    samples = data.train.base
    while isinstance(samples, torch.utils.data.Subset):
        samples = samples.dataset
    samples.labels[0] = (samples.labels[0] + 1) % 10
    ok, why = reusable_teacher(teacher_run, cfg, data)
    assert not ok and "train_set fingerprint" in why


def test_compare_two_methods_two_seeds(teacher_run, tmp_path, capsys):
    out = tmp_path / "compare"
    args = ["compare", "--teacher", str(teacher_run / "teacher.pt"), "--methods", "none,agkd-hybrid",
            "--seeds", "2", "--out", str(out)] + TINY
    assert main(args) == 0
    result = json.loads((out / "comparison.json").read_text())
    assert result["seeds"] == [0, 1] and list(result["methods"]) == ["none", "agkd-hybrid"]
    for name, m in result["methods"].items():
        per_seed = [m["test_acc"]["0"], m["test_acc"]["1"]]
        for seed, acc in zip((0, 1), per_seed):  # each seed's value is that run's own test accuracy
            saved = json.loads((out / name / f"seed{seed}" / "result.json").read_text())
            assert saved["test_acc"] == acc and saved["identity"]["config"]["train"]["seed"] == seed
        assert m["test_acc_mean"] == pytest.approx(sum(per_seed) / 2)
        assert m["test_acc_std"] == pytest.approx(abs(per_seed[0] - per_seed[1]) / 2 ** 0.5)
        assert {"relative_error_mean", "kl_mean", "correlation_mean"} <= set(m)
    assert (out / "cache" / "seed0").is_dir() and (out / "cache" / "seed1").is_dir()  # AGKD replayed a cache
    assert not (out / "teacher").exists()  # the given teacher was used
    table = (out / "comparison.md").read_text()
    assert "| student, no KD |" in table and "| student, AGKD (hybrid) |" in table and "±" in table
    assert (out / "comparison.png").stat().st_size > 0
    capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().out.count(": done before, test acc") == 4


def test_compare_rejects_unknown_methods_in_one_line(tmp_path, capsys):
    assert main(["compare", "--methods", "none,agkd-foo", "--out", str(tmp_path / "c")] + TINY) == 2
    err = capsys.readouterr().err
    assert "agkd-foo" in err and "agkd-hybrid" in err and not (tmp_path / "c").exists()


def test_latency_is_a_median_of_enough_warm_repeats():
    from agkd_models.experiments.report import model_costs

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return self.conv(x)

    model = Counting()
    costs = model_costs(model, 16, torch.device("cpu"), min_seconds=0.0)
    # one FLOP-counting call, five warm-up calls, thirty timed ones
    assert model.calls == 1 + 5 + 30 and costs["latency_repeats"] == 30
    assert costs["threads"] == torch.get_num_threads() and costs["latency_iqr_ms"] >= 0
    assert costs["params"] == 3 * 4 * 9 + 4


def test_curves_put_each_training_objective_on_its_own_panel(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from agkd_models.experiments import report

    history = [{"epoch": e, "train_loss": 3.0 - e, "val_loss": 2.0 - e / 2, "train_acc": 0.3 * e,
                "val_acc": 0.25 * e} for e in range(3)]
    saved = {}
    real_savefig = plt.Figure.savefig

    def keep(fig, *args, **kwargs):
        saved["axes"] = fig.get_axes()
        return real_savefig(fig, *args, **kwargs)

    plt.Figure.savefig = keep
    try:
        report.plot_curves(tmp_path / "curves.png", {"teacher": history, "student, logit KD": history})
    finally:
        plt.Figure.savefig = real_savefig
    labels = [ax.get_ylabel() for ax in saved["axes"]]
    assert labels[:2] == ["validation cross-entropy", "accuracy"]
    titles = [ax.get_title() for ax in saved["axes"][2:]]
    assert titles == ["teacher\ntraining objective", "student, logit KD\ntraining objective"]
    assert all(tick == int(tick) for ax in saved["axes"] for tick in ax.get_xticks())
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_warmup_then_cosine_learning_rates(tmp_path):
    data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randint(0, 3, (8,)))
    model = torch.nn.Linear(4, 3)
    trainer = Trainer(SupervisedTask(model), TrainConfig(epochs=6, batch_size=8, lr=0.1, warmup_epochs=2,
                                                      progress=False, device="cpu"), tmp_path)
    lrs = [r["lr"] for r in trainer.fit(data, data)]
    # 0.1/3, 0.2/3 while warming up, then cosine over the 4 remaining epochs from 0.1
    want = [0.1 / 3, 0.2 / 3] + [0.05 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert lrs == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("terminal", [False, True])
def test_progress_bars_only_on_a_terminal(tmp_path, capsys, monkeypatch, terminal):
    from agkd_models.engine import progress
    monkeypatch.setattr(progress, "_is_terminal", lambda: terminal)
    data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randint(0, 3, (8,)))
    task = _Exploding(bad_epoch=100)
    Trainer(task, TrainConfig(epochs=2, batch_size=4, progress=True, device="cpu"), tmp_path).fit(data, data)
    out, err = capsys.readouterr()
    assert [line.split(":")[0] for line in out.splitlines()] == ["epoch 1", "epoch 2"]  # one line per epoch
    # A redirected log gets no carriage-return updates; a terminal gets its bars.
    assert ("\r" in err and "epoch 1/2" in err) if terminal else err == ""


def test_top_level_help_is_plain_text_with_every_command_and_examples(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["--help"])
    assert stopped.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text and ":class:" not in text  # plain text, no reStructuredText
    for command in ("train-teacher", "distill", "cache-teacher", "evaluate", "compare", "demo"):
        assert re.search(rf"^    {command}  +\w", text, re.MULTILINE), command  # listed with its one-line help
    examples = text.split("examples:\n", 1)[1]
    assert sum(line.strip().startswith("agkd ") for line in examples.splitlines()) >= 5
