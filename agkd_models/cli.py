"""The ``agkd`` command: ``train-teacher``, ``distill``, ``evaluate`` and ``demo``.

    agkd train-teacher --config digits --out runs/teacher
    agkd distill --config digits --teacher runs/teacher/teacher.pt --method agkd --out runs/agkd
    agkd evaluate --config digits --checkpoint runs/agkd/student.pt --model student
    agkd demo                                  # digits: teacher, then three students, a table

``--config`` takes a preset name (``agkd_models/configs``) or a YAML file; ``--set
section.key=value`` overrides any entry; the resolved configuration is saved as
``config.yaml`` in the output folder.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from .config import PRESETS, ConfigError, load_config, save_config
from .data import DataError, build_datasets
from .distill import AGKD, ATTENTION_LOSSES, LogitKD
from .cakd import CAKD
from .report import comparison_metrics, model_costs, plot_curves, write_report
from .student import Student
from .teacher import HybridTeacher
from .trainer import (NonFiniteLossError, TeacherTask, Trainer, TrainConfig, evaluate_logits, limit,
                      resolve_device)

METHODS = ("agkd", "logit", "cakd", "none")


def build_data(cfg: Dict[str, Any]):
    d, seed = cfg["data"], cfg["train"]["seed"]
    splits = build_datasets(d["name"], d.get("root"), image_size=d["image_size"],
                            val_fraction=d.get("val_fraction", 0.2), seed=seed,
                            download=d.get("download", False), flip=d.get("flip", True))
    return (limit(splits.train, d.get("limit_train"), seed), limit(splits.val, d.get("limit_val"), seed),
            splits.num_classes)


def build_teacher(cfg: Dict[str, Any], num_classes: int) -> HybridTeacher:
    t = cfg["teacher"]
    return HybridTeacher(num_classes, cnn=t["cnn"], vit=t["vit"], cnn_weights=t.get("cnn_weights"),
                         vit_weights=t.get("vit_weights"), pretrained=t.get("pretrained", False),
                         vit_kwargs=t.get("vit_kwargs") or {}, cnn_kwargs=t.get("cnn_kwargs") or {},
                         vit_attention=t.get("vit_attention", "cls"),
                         combine=t.get("combine", "add"))


def build_student(cfg: Dict[str, Any], num_classes: int) -> Student:
    s = cfg["student"]
    return Student(num_classes, name=s["name"], stages=s["stages"], weights=s.get("weights"),
                   pretrained=s.get("pretrained", False))


def build_task(method: str, cfg: Dict[str, Any], teacher: HybridTeacher, student: Student):
    d = cfg["distill"]
    if method == "none":
        return TeacherTask(student)
    if method == "logit":
        return LogitKD(teacher, student, temperature=d["temperature"], alpha=d["kd_alpha"])
    if method == "cakd":
        return CAKD(teacher, student)
    return AGKD(teacher, student, attention_loss=d["attention_loss"], alpha=d["alpha"], beta=d["beta"],
                temperature=d["temperature"], kd_alpha=d["kd_alpha"], window_size=d["window_size"],
                padding=d["padding"])


def load_weights(module: torch.nn.Module, path: str) -> None:
    state = torch.load(path, map_location="cpu", weights_only=True)
    module.load_state_dict(state)


def _seeded(cfg):
    torch.manual_seed(cfg["train"]["seed"])


def train_teacher(cfg: Dict[str, Any], out: Path, resume: bool = False) -> Dict[str, Any]:
    train_set, val_set, num_classes = build_data(cfg)
    _seeded(cfg)
    teacher = build_teacher(cfg, num_classes)
    trainer = Trainer(TeacherTask(teacher), TrainConfig.from_dict(cfg["train"]), out, evaluate_model=teacher)
    history = trainer.fit(train_set, val_set, resume=resume)
    torch.save(teacher.state_dict(), out / "teacher.pt")
    return {"history": history, "model": teacher}


def distill(cfg: Dict[str, Any], teacher_path: str, method: str, out: Path, resume: bool = False) -> Dict[str, Any]:
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    train_set, val_set, num_classes = build_data(cfg)
    _seeded(cfg)
    teacher = build_teacher(cfg, num_classes)
    load_weights(teacher, teacher_path)
    student = build_student(cfg, num_classes)
    task = build_task(method, cfg, teacher, student)
    trainer = Trainer(task, TrainConfig.from_dict(cfg["train"]), out, evaluate_model=student)
    history = trainer.fit(train_set, val_set, resume=resume)
    torch.save(student.state_dict(), out / "student.pt")  # the student alone, for inference
    return {"history": history, "model": student, "teacher": teacher, "val_set": val_set}


def _write_run_report(out: Path, title: str, runs: Dict[str, Dict]) -> None:
    write_report(out / "report.md", title, runs)
    plot_curves(out / "curves.png", {name: run["history"] for name, run in runs.items()})


def _evaluate(model, val_set, cfg, device):
    model.to(device).eval()
    loader = torch.utils.data.DataLoader(val_set, batch_size=cfg["train"]["batch_size"])
    return evaluate_logits(model, loader, device)


def cmd_train_teacher(args, cfg):
    out = Path(args.out)
    save_config(cfg, out / "config.yaml")
    run = train_teacher(cfg, out, args.resume)
    device = resolve_device(cfg["train"]["device"])
    costs = model_costs(run["model"].to(device), cfg["data"]["image_size"], device)
    _write_run_report(out, "Teacher training", {"teacher": {"history": run["history"], "costs": costs}})
    print(f"teacher: val acc {run['history'][-1]['val_acc']:.4f}; wrote {out}/teacher.pt, report.md")


def _student_run(cfg, run, device) -> Dict[str, Any]:
    s_logits, targets = _evaluate(run["model"], run["val_set"], cfg, device)
    t_logits, _ = _evaluate(run["teacher"], run["val_set"], cfg, device)
    size = cfg["data"]["image_size"]
    compare = comparison_metrics(s_logits, t_logits, targets, sum(p.numel() for p in run["teacher"].parameters()),
                                 sum(p.numel() for p in run["model"].parameters()))
    return {"history": run["history"], "compare": compare, "costs": model_costs(run["model"], size, device)}


def cmd_distill(args, cfg):
    out = Path(args.out)
    cfg["distill"]["method"] = args.method or cfg["distill"].get("method", "agkd")
    save_config(cfg, out / "config.yaml")
    run = distill(cfg, args.teacher, cfg["distill"]["method"], out, args.resume)
    device = resolve_device(cfg["train"]["device"])
    _write_run_report(out, f"Distillation ({cfg['distill']['method']})",
                      {f"student ({cfg['distill']['method']})": _student_run(cfg, run, device)})
    print(f"student: val acc {run['history'][-1]['val_acc']:.4f}; wrote {out}/student.pt, report.md")


def cmd_evaluate(args, cfg):
    _, val_set, num_classes = build_data(cfg)
    model = build_teacher(cfg, num_classes) if args.model == "teacher" else build_student(cfg, num_classes)
    load_weights(model, args.checkpoint)
    device = resolve_device(cfg["train"]["device"])
    logits, targets = _evaluate(model, val_set, cfg, device)
    result = {"model": args.model, "val_loss": torch.nn.functional.cross_entropy(logits, targets).item(),
              "val_acc": (logits.argmax(1) == targets).float().mean().item(), "samples": len(targets)}
    print(json.dumps(result))
    return result


def cmd_demo(args, cfg):
    out = Path(args.out)
    start = time.time()
    cfg["train"]["epochs"] = args.teacher_epochs
    save_config(cfg, out / "config.yaml")
    print(f"[demo] training the hybrid teacher ({cfg['teacher']['cnn']} + {cfg['teacher']['vit']}) on digits")
    teacher_run = train_teacher(cfg, out / "teacher")
    device = resolve_device(cfg["train"]["device"])
    size = cfg["data"]["image_size"]
    runs = {"teacher": {"history": teacher_run["history"], "costs": model_costs(teacher_run["model"], size, device)}}
    # Students: no KD, logit KD, then AGKD with each requested attention loss (several of
    # them give the paper's Table II rows).
    variants = [("none", None, "student, no KD"), ("logit", None, "student, logit KD")]
    losses = [loss.strip() for loss in args.attention_losses.split(",") if loss.strip()]
    unknown = sorted(set(losses) - set(ATTENTION_LOSSES))
    if unknown:
        raise ConfigError(f"--attention-losses: unknown {', '.join(unknown)}; choose from {', '.join(ATTENTION_LOSSES)}")
    variants += [("agkd", loss, f"student, AGKD ({loss} attention)") for loss in losses]
    for method, attention_loss, label in variants:
        student_cfg = json.loads(json.dumps(cfg))
        student_cfg["train"]["epochs"] = args.student_epochs
        if attention_loss:
            student_cfg["distill"]["attention_loss"] = attention_loss
        print(f"[demo] {label}")
        folder = method if attention_loss is None else f"agkd-{attention_loss}"
        run = distill(student_cfg, str(out / "teacher" / "teacher.pt"), method, out / folder)
        runs[label] = _student_run(student_cfg, run, device)
    notes = [f"Digits ({cfg['data']['image_size']} px), teacher {args.teacher_epochs} epochs, students "
             f"{args.student_epochs} epochs each, seed {cfg['train']['seed']}, total {time.time() - start:.0f} s "
             f"on {device}. One seed on a small data set: differences of a point or two are noise."]
    write_report(out / "report.md", "agkd demo: teacher and three students on digits", runs, notes)
    plot_curves(out / "curves.png", {name: run["history"] for name, run in runs.items()})
    print((out / "report.md").read_text())


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="agkd", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, default_config):
        p.add_argument("--config", default=default_config,
                       help=f"preset ({', '.join(PRESETS)}) or YAML file (default: {default_config})")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config entry, e.g. --set train.epochs=3 (repeatable)")
        p.add_argument("--download", action="store_true",
                       help="allow fetching the data set (CIFAR); never done otherwise")

    p = sub.add_parser("train-teacher", help="train the hybrid teacher")
    common(p, "digits")
    p.add_argument("--out", default="runs/teacher")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p = sub.add_parser("distill", help="train a student from a trained teacher")
    common(p, "digits")
    p.add_argument("--teacher", required=True, help="teacher.pt written by train-teacher")
    p.add_argument("--method", choices=METHODS, default=None, help="default: the config's distill.method")
    p.add_argument("--out", default="runs/student")
    p.add_argument("--resume", action="store_true")
    p = sub.add_parser("evaluate", help="validation loss and accuracy of a saved model")
    common(p, "digits")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--model", choices=("teacher", "student"), default="student")
    p = sub.add_parser("demo", help="digits: a teacher, then students without KD, with logit KD and with AGKD")
    common(p, "digits")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--teacher-epochs", type=int, default=4)
    p.add_argument("--student-epochs", type=int, default=4)
    p.add_argument("--attention-losses", default="hybrid",
                   help="comma-separated AGKD attention losses to compare (mse,cosine,ssim,hybrid,perceptual)")

    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        if args.download:
            cfg["data"]["download"] = True
        {"train-teacher": cmd_train_teacher, "distill": cmd_distill, "evaluate": cmd_evaluate,
         "demo": cmd_demo}[args.command](args, cfg)
    except (ConfigError, DataError, NonFiniteLossError) as exc:
        print(f"agkd {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
