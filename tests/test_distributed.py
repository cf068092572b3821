"""Training at scale on this CPU: torchrun with two gloo processes (validation over the
whole set equal to a single-process evaluation, only rank 0 writes, exact resume, a
sharded teacher cache equal to a single-process one), autocast in bf16 and fp16 with the
gradient scaler, channels_last, and torch.compile with fullgraph on the loss path."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from agkd_models.cli import main
from agkd_models.distillers import build_task
from agkd_models.experiments.experiment import cache_teacher
from agkd_models.experiments.pipeline import build_student, build_teacher
from agkd_models.config import load_config
from agkd_models.data.datasets import build_datasets, limit
from agkd_models.config import TrainConfig
from agkd_models.engine import SupervisedTask, Trainer

# No warm-up: the resume test needs a 1-epoch run to be the first epoch of a 2-epoch run,
# and a warm-up is clipped to the run's length.
TINY = ["data.limit_train=48", "data.limit_val=20", "train.batch_size=16", "train.progress=false",
        "train.device=cpu", "train.scheduler=step", "train.warmup_epochs=0"]


def sets(*items):
    return [a for item in list(TINY) + list(items) for a in ("--set", item)]


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(build_teacher(load_config("digits", TINY), 10).state_dict(), path)
    return path


def torchrun(script_args, tmp_path, *, nproc=2):
    """Runs ``agkd`` under torchrun; ``{rank}`` in an argument becomes the process's rank."""
    script = tmp_path / "launch.py"
    script.write_text(textwrap.dedent("""
        import os, sys
        from agkd_models.cli import main
        rank = os.environ["RANK"]
        sys.exit(main([a.replace("{rank}", rank) for a in sys.argv[1:]]))
    """))
    env = dict(os.environ, OMP_NUM_THREADS="1")  # bitwise-repeatable CPU math across runs
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), *script_args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def records(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ddp_run(teacher_file, tmp_path_factory):
    """Two epochs of AGKD under torchrun, each rank given its own --out: rank 1 must write nothing."""
    root = tmp_path_factory.mktemp("ddp")
    result = torchrun(["distill", "--teacher", str(teacher_file), "--out", str(root / "rank{rank}")]
                      + sets("train.epochs=2"), root)
    return root, result


def test_torchrun_only_rank0_writes(ddp_run):
    root, result = ddp_run
    assert not (root / "rank1").exists()
    for name in ("student.pt", "checkpoint.pt", "metrics.jsonl", "metrics.csv", "report.md", "config.yaml"):
        assert (root / "rank0" / name).is_file(), name
    assert result.stdout.count("student: val acc") == 1  # one summary, from rank 0
    state = torch.load(root / "rank0" / "checkpoint.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # ranks draw differently


def test_torchrun_validation_equals_single_process_evaluation(ddp_run, capsys):
    root, _ = ddp_run
    last = records(root / "rank0")[-1]
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(root / "rank0" / "student.pt"), "--split", "val"] + sets()) == 0
    single = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert single["samples"] == 20  # the whole validation set, odd split over two ranks
    assert single["val_acc"] == last["val_acc"]
    # float32 logits from other batch compositions and thread counts (oneDNN picks its
    # summation order by batch size and threads): equal to float32 rounding of the logits,
    # ~1e-6 relative after the network's depth; 1e-5 allows for that on any CPU.
    assert single["val_loss"] == pytest.approx(last["val_loss"], rel=1e-5)


def test_torchrun_resume_matches_an_uninterrupted_run(ddp_run, teacher_file, tmp_path):
    root, _ = ddp_run
    out = tmp_path / "resumed"
    args = ["distill", "--teacher", str(teacher_file), "--out", str(out)]
    torchrun(args + sets("train.epochs=1"), tmp_path)
    assert len(records(out)) == 1
    torchrun(args + ["--resume"] + sets("train.epochs=2"), tmp_path)
    want, got = records(root / "rank0"), records(out)
    assert len(got) == 2
    for a, b in zip(want, got):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
            assert a[key] == b[key], key
    full = torch.load(root / "rank0" / "student.pt", weights_only=True)
    resumed = torch.load(out / "student.pt", weights_only=True)
    for name in full:
        assert torch.equal(full[name], resumed[name]), name


def test_torchrun_sharded_teacher_cache_equals_single_process(teacher_file, tmp_path):
    torchrun(["cache-teacher", "--teacher", str(teacher_file), "--out", str(tmp_path / "sharded"), "--epochs", "2",
              "--dtype", "float32"] + sets(), tmp_path)
    single = cache_teacher(load_config("digits", TINY), str(teacher_file), tmp_path / "single", epochs=2,
                           dtype="float32")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    for name in ("labels", "augment", "logits", "attention"):
        a, b = np.load(tmp_path / "sharded" / f"{name}.npy"), np.load(single / f"{name}.npy")
        if a.dtype.kind == "f":
            # Other batch compositions and thread counts reorder the teacher's float32
            # convolution sums: the same values to rounding, ~1e-6 relative through the
            # network; atol covers entries near zero, where relative error means nothing.
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())
        else:
            np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------- single-process options


def _agkd(attention_loss="hybrid", method="agkd"):
    cfg = load_config("digits", TINY + [f"agkd.attention_loss={attention_loss}"])
    torch.manual_seed(0)
    return build_task(method, build_teacher(cfg, 10), build_student(cfg, 10), cfg.section(method))


def _data():
    splits = build_datasets("digits", image_size=32, seed=0, flip=False)
    return limit(splits.train, 32, 0), limit(splits.val, 16, 0)


@pytest.mark.parametrize("amp,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_autocast_training_on_cpu(tmp_path, amp, dtype):
    task = _agkd()
    trainer = Trainer(task, TrainConfig(epochs=1, batch_size=16, amp=amp, device="cpu", progress=False,
                                        lr=1e-3), tmp_path)
    logit_dtypes = set()
    task.student.register_forward_hook(lambda module, args, out: logit_dtypes.add(out.logits.dtype))
    history = trainer.fit(*_data())
    assert dtype in logit_dtypes  # the student ran under autocast
    assert trainer.scaler.is_enabled() == (amp == "fp16")
    assert all(np.isfinite(history[0][k]) for k in ("train_loss", "train_attention", "val_loss"))
    if amp == "fp16":
        assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["scaler"]["scale"] > 0


@pytest.mark.cuda
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_training_on_cuda(tmp_path, amp):
    task = _agkd()
    trainer = Trainer(task, TrainConfig(epochs=1, batch_size=16, amp=amp, device="cuda", progress=False,
                                        channels_last=True), tmp_path)
    history = trainer.fit(*_data())
    assert np.isfinite(history[0]["train_loss"]) and trainer.scaler.is_enabled() == (amp == "fp16")


def test_bad_amp_mode_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="train.amp: got 'fp8'; expected one of off, bf16, fp16"):
        Trainer(_agkd("mse", "logit"), TrainConfig(amp="fp8", device="cpu"), tmp_path)
    assert TrainConfig(amp=False).amp == "off"  # YAML's bare `off`


def test_channels_last_gives_the_same_training(tmp_path):
    # channels_last changes only the order in which oneDNN sums a convolution's products:
    # float32 rounding through the network. Plain SGD carries that forward linearly; on a
    # 2-core CI machine the epoch's train loss moved by 5.5e-6 relative and the validation
    # loss by 1.4e-8, so rel=1e-4 leaves a margin of 18x. Adam would not: its first update
    # is lr·g/|g| per element, so a gradient component at rounding level whose sign flips
    # moves its weight by 2·lr, a difference no float tolerance bounds (the same run with
    # Adam: 2.2e-4 relative here, 1.5e-4 on another machine).
    runs = []
    for channels_last in (False, True):
        task = _agkd("mse")
        trainer = Trainer(task, TrainConfig(epochs=1, batch_size=16, channels_last=channels_last, device="cpu",
                                            progress=False, lr=1e-3, optimizer="sgd"), tmp_path / str(channels_last))
        runs.append(trainer.fit(*_data())[0])
        if channels_last:
            assert task.student.model.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    for key in ("train_loss", "val_loss"):
        assert runs[1][key] == pytest.approx(runs[0][key], rel=1e-4), key


@pytest.mark.parametrize("method,attention_loss", [("agkd", "hybrid"), ("agkd", "mse"), ("logit", "mse")])
def test_compiled_loss_path_is_one_graph_and_matches_eager(method, attention_loss):
    eager, compiled = _agkd(attention_loss, method), _agkd(attention_loss, method)
    compiled.enable_compile(model=False)  # the loss path with fullgraph=True: any graph break raises
    torch.manual_seed(3)
    images, targets = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    results = []
    for task in (eager, compiled):
        task.train()
        terms = task(images, targets).terms
        terms["total"].backward()
        results.append((terms, [p.grad.clone() for p in task.student.parameters() if p.grad is not None]))
    (want, want_grads), (got, got_grads) = results
    # Inductor fuses and reorders the loss path's float32 reductions (softmax, means): equal
    # to rounding, ~1e-6 relative. A gradient entry's error is relative to its tensor's
    # scale, not to the entry itself, hence atol from the largest entry.
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)
    assert len(got_grads) == len(want_grads) > 0
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


def test_trainer_compile_option(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 10))
    trainer = Trainer(SupervisedTask(model), TrainConfig(epochs=1, batch_size=16, compile=True, device="cpu",
                                                      progress=False), tmp_path)
    assert model._compiled_call_impl is not None  # nn.Module.compile: state_dict keys unchanged
    history = trainer.fit(*_data())
    assert np.isfinite(history[0]["train_loss"])
    assert set(torch.load(tmp_path / "checkpoint.pt", weights_only=True)["task"]) == {
        f"model.{k}" for k in model.state_dict()}


def test_torchrun_cakd_with_its_self_stepped_discriminator(teacher_file, tmp_path):
    # The discriminator steps inside the loss (outside DDP) and averages its own gradients;
    # with whole-tensor replacement the PCA projector leaves parameters unused on some steps.
    out = tmp_path / "cakd"
    torchrun(["distill", "--method", "cakd", "--teacher", str(teacher_file), "--out", str(out)]
             + sets("train.epochs=1", "train.batch_size=8", "cakd.ce_only_epochs=0", "cakd.ramp_epochs=0",
                    "cakd.replace_elementwise=false"), tmp_path)
    record = records(out)[0]
    assert record["train_mad"] > 0 and np.isfinite(record["train_loss"])


def test_torchrun_dml_trains_and_validates_every_peer(teacher_file, tmp_path):
    out = tmp_path / "dml"
    torchrun(["distill", "--method", "dml", "--teacher", str(teacher_file), "--out", str(out)]
             + sets("train.epochs=1", "dml.peers=3"), tmp_path)
    record = records(out)[0]
    assert all(0.0 <= record[f"val_acc_peer{i}"] <= 1.0 for i in (1, 2)) and np.isfinite(record["train_loss"])
    peers = [torch.load(out / f"peer{i}.pt") for i in (1, 2)]
    assert not all(torch.equal(peers[0][k], peers[1][k]) for k in peers[0]), "two peers, not one twice"
