"""The ``agkd`` command: ``train-teacher``, ``distill``, ``cache-teacher``, ``evaluate``
and ``demo``.

    agkd train-teacher --config digits --out runs/teacher
    agkd distill --config digits --teacher runs/teacher/teacher.pt --method agkd --out runs/agkd
    agkd cache-teacher --config digits --teacher runs/teacher/teacher.pt --epochs 5 --out runs/cache
    agkd distill ... --teacher-cache runs/cache     # replays the cache: no teacher forward passes
    agkd evaluate --config digits --checkpoint runs/agkd/student.pt --model student
    agkd demo                                  # digits: teacher, then three students, a table
    torchrun --nproc_per_node=4 -m agkd_models.cli distill ...   # DDP, one process per GPU

``--config`` takes a preset name (``agkd_models/configs``) or a YAML file; ``--set
section.key=value`` overrides any entry; the resolved configuration is saved as
``config.yaml`` in the output folder. Under ``torchrun`` only rank 0 writes files.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from . import distributed
from .checkpoint import CheckpointError, check_readable, load_model_weights
from .cache import CachedTeacherDataset, TeacherCache, TeacherCacheError, cache_identity, write_teacher_cache
from .config import AMP_MODES, METHODS, PRESETS, ConfigError, load_config, save_config
from .data import DataError, build_datasets, limit
from .distill import AGKD, ATTENTION_LOSSES, LogitKD
from .cakd import CAKD
from .report import comparison_metrics, model_costs, plot_curves, write_report
from .student import Student
from .teacher import HybridTeacher
from .trainer import (NonFiniteLossError, TeacherTask, Trainer, TrainConfig, classification_metrics,
                      evaluate_logits, resolve_device)

# Errors about the user's input (configuration, files, data), reported in one line; any
# other exception is a bug in agkd and keeps its traceback.
USER_ERRORS = (ConfigError, DataError, NonFiniteLossError, TeacherCacheError, CheckpointError)


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
        return CAKD(teacher, student, replace_prob=d["replace_prob"], lam=d["lam"], ce_weight=d["ce_weight"],
                    discriminator_every=d["discriminator_every"], discriminator_lr=d["discriminator_lr"],
                    dropout=d["dropout"], view_prob=d["view_prob"])
    return AGKD(teacher, student, attention_loss=d["attention_loss"], alpha=d["alpha"], beta=d["beta"],
                temperature=d["temperature"], kd_alpha=d["kd_alpha"], hybrid_alpha=d["hybrid_alpha"],
                hybrid_beta=d["hybrid_beta"], window_size=d["window_size"], padding=d["padding"],
                perceptual_layers=d["perceptual_layers"])


def load_teacher_weights(teacher: HybridTeacher, path: str, cfg: Dict[str, Any], num_classes: int) -> None:
    t = cfg["teacher"]
    load_model_weights(teacher, path, "teacher file",
                       f"a hybrid teacher {t['cnn']} + {t['vit']} for {num_classes} classes")


def load_student_weights(student: Student, path: str, cfg: Dict[str, Any], num_classes: int) -> None:
    load_model_weights(student, path, "student file",
                       f"student weights ({cfg['student']['name']}, {num_classes} classes)")


def _seeded(cfg):
    torch.manual_seed(cfg["train"]["seed"])


def train_teacher(cfg: Dict[str, Any], out: Path, resume: bool = False) -> Dict[str, Any]:
    train_set, val_set, num_classes = build_data(cfg)
    _seeded(cfg)
    teacher = build_teacher(cfg, num_classes)
    trainer = Trainer(TeacherTask(teacher), TrainConfig.from_dict(cfg["train"]), out, evaluate_model=teacher)
    history = trainer.fit(train_set, val_set, resume=resume)
    if trainer.world.is_main:
        torch.save(teacher.state_dict(), out / "teacher.pt")
    return {"history": history, "model": teacher}


# Methods that need only the teacher's logits and attention map, which a cache holds.
CACHEABLE = ("agkd", "logit")


def open_teacher_cache(path: str, cfg: Dict[str, Any], train_set, teacher) -> TeacherCache:
    return TeacherCache.open(path, expect=cache_identity(train_set, teacher, cfg["teacher"]))


def distill(cfg: Dict[str, Any], teacher_path: str, method: str, out: Path, resume: bool = False,
            teacher_cache: Optional[str] = None) -> Dict[str, Any]:
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if teacher_cache and method not in CACHEABLE:
        raise ConfigError(f"--teacher-cache serves the methods that read only the teacher's logits and attention "
                          f"({', '.join(CACHEABLE)}); {method!r} needs the online teacher")
    train_set, val_set, num_classes = build_data(cfg)
    _seeded(cfg)
    teacher = build_teacher(cfg, num_classes)
    load_teacher_weights(teacher, teacher_path, cfg, num_classes)
    if teacher_cache:
        cache = open_teacher_cache(teacher_cache, cfg, train_set, teacher)
        if cfg["train"]["epochs"] > cache.epochs and distributed.world().is_main:
            print(f"note: {cfg['train']['epochs']} epochs from a cache of {cache.epochs}: epoch n replays cached "
                  f"epoch n mod {cache.epochs}", flush=True)
        train_set = CachedTeacherDataset(train_set, cache)
    student = build_student(cfg, num_classes)
    task = build_task(method, cfg, teacher, student)
    trainer = Trainer(task, TrainConfig.from_dict(cfg["train"]), out, evaluate_model=student)
    history = trainer.fit(train_set, val_set, resume=resume)
    if trainer.world.is_main:
        torch.save(student.state_dict(), out / "student.pt")  # the student alone, for inference
    return {"history": history, "model": student, "teacher": teacher, "val_set": val_set}


def cache_teacher(cfg: Dict[str, Any], teacher_path: str, out: Path, *, epochs: int, dtype: str = "float16",
                  topk: Optional[int] = None, overwrite: bool = False) -> Path:
    _world, device = distributed.setup(cfg["train"]["device"])
    train_set, _val_set, num_classes = build_data(cfg)
    teacher = build_teacher(cfg, num_classes)
    load_teacher_weights(teacher, teacher_path, cfg, num_classes)
    t = cfg["train"]
    return write_teacher_cache(teacher, train_set, out, epochs=epochs, teacher_config=cfg["teacher"], dtype=dtype,
                               topk=topk, batch_size=t["batch_size"], num_workers=t["num_workers"], device=device,
                               overwrite=overwrite, progress=t.get("progress", False))


def _write_run_report(out: Path, title: str, runs: Dict[str, Dict]) -> None:
    write_report(out / "report.md", title, runs)
    plot_curves(out / "curves.png", {name: run["history"] for name, run in runs.items()})


def _evaluate(model, val_set, cfg, device):
    model.to(device).eval()
    loader = torch.utils.data.DataLoader(val_set, batch_size=cfg["train"]["batch_size"])
    return evaluate_logits(model, loader, device)


def _is_main() -> bool:
    return distributed.world().is_main


def cmd_train_teacher(args, cfg):
    out = Path(args.out)
    if _is_main():
        save_config(cfg, out / "config.yaml")
    run = train_teacher(cfg, out, args.resume)
    if not _is_main():
        return
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
    if _is_main():
        save_config(cfg, out / "config.yaml")
    run = distill(cfg, args.teacher, cfg["distill"]["method"], out, args.resume, args.teacher_cache)
    if not _is_main():
        return
    device = resolve_device(cfg["train"]["device"])
    _write_run_report(out, f"Distillation ({cfg['distill']['method']})",
                      {f"student ({cfg['distill']['method']})": _student_run(cfg, run, device)})
    print(f"student: val acc {run['history'][-1]['val_acc']:.4f}; wrote {out}/student.pt, report.md")


def cmd_evaluate(args, cfg):
    _, val_set, num_classes = build_data(cfg)
    if args.model == "teacher":
        model = build_teacher(cfg, num_classes)
        load_teacher_weights(model, args.checkpoint, cfg, num_classes)
    else:
        model = build_student(cfg, num_classes)
        load_student_weights(model, args.checkpoint, cfg, num_classes)
    device = resolve_device(cfg["train"]["device"])
    logits, targets = _evaluate(model, val_set, cfg, device)
    m = classification_metrics(logits, targets)
    result = {"model": args.model, "val_loss": m["loss_sum"] / m["count"], "val_acc": m["correct"] / m["count"],
              "samples": m["count"]}
    print(json.dumps(result))
    return result


def cmd_cache_teacher(args, cfg):
    out = cache_teacher(cfg, args.teacher, Path(args.out), epochs=args.epochs, dtype=args.dtype, topk=args.topk,
                        overwrite=args.overwrite)
    if _is_main():
        manifest = TeacherCache.open(out).manifest
        size = sum((out / f["file"]).stat().st_size for f in manifest["fields"].values())
        print(f"teacher cache: {manifest['num_samples']} samples x {manifest['epochs']} epochs, {manifest['dtype']}"
              f"{'' if manifest['topk'] is None else ', top-' + str(manifest['topk'])}, {size / 2**20:.1f} MiB in {out}")


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

    def speed(p):
        p.add_argument("--amp", choices=AMP_MODES, default=None, help="autocast (default: the config's train.amp)")
        p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
        p.add_argument("--compile", action="store_true",
                       help="torch.compile the model (and a distiller's loss path, fullgraph)")

    p = sub.add_parser("train-teacher", help="train the hybrid teacher")
    common(p, "digits")
    p.add_argument("--out", default="runs/teacher")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    speed(p)
    p = sub.add_parser("distill", help="train a student from a trained teacher")
    common(p, "digits")
    p.add_argument("--teacher", required=True, help="teacher.pt written by train-teacher")
    p.add_argument("--method", choices=METHODS, default=None, help="default: the config's distill.method")
    p.add_argument("--out", default="runs/student")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--teacher-cache", default=None, metavar="DIR",
                   help="read the teacher's outputs from a cache-teacher folder instead of running it")
    speed(p)
    p = sub.add_parser("cache-teacher", help="run the teacher once over E epochs of augmentation and store it")
    common(p, "digits")
    p.add_argument("--teacher", required=True, help="teacher.pt written by train-teacher")
    p.add_argument("--out", required=True, help="cache folder to create")
    p.add_argument("--epochs", type=int, required=True, help="augmentation epochs to cache")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="storage precision")
    p.add_argument("--topk", type=int, default=None, help="keep only the k largest teacher logits per sample")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache folder")
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

    for action in sub.choices.values():
        action.add_argument("--debug", action="store_true",
                            help="show the full traceback of an error (also: AGKD_DEBUG=1)")

    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        if args.download:
            cfg["data"]["download"] = True
        if getattr(args, "amp", None):
            cfg["train"]["amp"] = args.amp
        if getattr(args, "channels_last", False):
            cfg["train"]["channels_last"] = True
        if getattr(args, "compile", False):
            cfg["train"]["compile"] = True
        # Files named on the command line, before any work starts.
        for flag, what in (("teacher", "teacher file"), ("checkpoint", "checkpoint")):
            if getattr(args, flag, None):
                check_readable(Path(getattr(args, flag)), what)
        if getattr(args, "teacher_cache", None) and not Path(args.teacher_cache).is_dir():
            raise TeacherCacheError(f"teacher cache {args.teacher_cache}: no such folder (write one with "
                                    f"agkd cache-teacher)")
        if args.command in ("train-teacher", "distill", "cache-teacher"):
            distributed.setup(cfg["train"]["device"])  # under torchrun: join the group before anything is written
        {"train-teacher": cmd_train_teacher, "distill": cmd_distill, "cache-teacher": cmd_cache_teacher,
         "evaluate": cmd_evaluate, "demo": cmd_demo}[args.command](args, cfg)
    except USER_ERRORS as exc:  # the user's input is wrong, not agkd: one line, exit status 2
        if args.debug or os.environ.get("AGKD_DEBUG", "0") not in ("", "0"):
            raise
        message = " ".join(str(exc).split())
        print(f"agkd {args.command}: error: {message}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
