"""What the commands do, as functions: build the data, models and distillers from a
resolved configuration, train a teacher, distil a student, write a teacher cache, and
evaluate on the test set. ``agkd_models.cli`` parses arguments and calls these;
``agkd_models.compare`` runs them over methods and seeds."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, NamedTuple, Optional

import torch

from ..config import SECTIONS, Config, ConfigError, resume_conflicts, save_config
from ..data.cache import (CachedTeacherDataset, TeacherCache, TeacherCacheError, cache_identity,
                          write_teacher_cache)
from ..data.datasets import build_datasets, fingerprint, limit
from ..distillers import METHODS, ModelFacts, build_task
from ..engine import distributed
from ..engine.checkpoint import load_model_weights, save_file
from ..engine.run_folder import mark_run_folder
from ..engine.evaluation import classification_metrics, evaluate_logits
from ..engine.task import SupervisedTask
from ..engine.trainer import Trainer
from ..models.student import Student
from ..models.teacher import HybridTeacher
from .report import comparison_metrics, model_costs, plot_curves, write_report


class Data(NamedTuple):
    train: Any
    val: Any
    test: Any
    num_classes: int
    test_is_val: bool


def build_data(cfg: Config) -> Data:
    d = cfg.data
    splits = build_datasets(d.name, d.root, image_size=d.image_size, val_fraction=d.val_fraction,
                            test_fraction=d.test_fraction, split_seed=d.split_seed, seed=cfg.train.seed,
                            download=d.download, flip=d.flip)
    # Subsets of a fixed draw (split_seed), so that train.seed changes only the training run.
    pick = d.split_seed
    return Data(limit(splits.train, d.limit_train, pick), limit(splits.val, d.limit_val, pick),
                limit(splits.test, d.limit_test, pick), splits.num_classes, splits.test_is_val)


def build_teacher(cfg: Config, num_classes: int) -> HybridTeacher:
    t = cfg.teacher
    return HybridTeacher(num_classes, cnn=t.cnn, vit=t.vit, cnn_weights=t.cnn_weights, vit_weights=t.vit_weights,
                         pretrained=t.pretrained, vit_kwargs=t.vit_kwargs, cnn_kwargs=t.cnn_kwargs,
                         vit_attention=t.vit_attention, combine=t.combine)


def build_student(cfg: Config, num_classes: int) -> Student:
    s = cfg.student
    return Student(num_classes, name=s.name, stages=s.stages, weights=s.weights, pretrained=s.pretrained)


def check_model_settings(cfg: Config) -> None:
    """The settings that concern more than one section checked together, before any work:
    the image size against each model (the ViT's image and patch size, a CNN's smallest
    input), the student's attention stages against the chosen student, and each method's
    own checks of its settings (``Method.check`` in the registry, e.g. CAKD's projected
    stage). The models are built on the meta device (no memory, no weights) and run on a
    blank batch of the configured size; a ConfigError names the settings."""
    import timm

    size, t, s = cfg.data.image_size, cfg.teacher, cfg.student
    blank = torch.empty(2, 3, size, size, device="meta")

    def runs(model: torch.nn.Module, what: str, key: str) -> None:
        try:
            model.eval()(blank)
        except Exception as exc:  # timm's shape assertions, "output size is too small", ...
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"data.image_size={size} does not suit {key}={what!r}: {reason}") from None

    def build(name: str, key: str, kwargs: Dict[str, Any], kwargs_key: Optional[str]) -> torch.nn.Module:
        try:
            return timm.create_model(name, pretrained=False, num_classes=2, **kwargs)
        except Exception as exc:  # an unknown keyword, a ViT width its num_heads does not divide, ...
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            given = f" with {kwargs_key}={kwargs}" if kwargs_key else ""
            raise ConfigError(f"{key}={name!r} cannot be built{given}: {reason[:200]}") from None

    with torch.device("meta"):
        vit = build(t.vit, "teacher.vit", t.vit_kwargs, "teacher.vit_kwargs")
        cnn = build(t.cnn, "teacher.cnn", t.cnn_kwargs, "teacher.cnn_kwargs")
        student = build(s.name, "student.name", {}, None)
    vit_size, patch = tuple(vit.patch_embed.img_size), tuple(vit.patch_embed.patch_size)
    if vit_size != (size, size) and not t.vit_kwargs.get("dynamic_img_size"):
        raise ConfigError(f"teacher.vit {t.vit!r} is built for {vit_size[0]} px images (teacher.vit_kwargs: "
                          f"{t.vit_kwargs}), data.image_size is {size}: set teacher.vit_kwargs.img_size={size}")
    if size % patch[0] or size % patch[1]:
        raise ConfigError(f"data.image_size={size} is not a multiple of the ViT's patch size {patch[0]} "
                          f"(teacher.vit_kwargs: {t.vit_kwargs}); its last {size % patch[0]} pixel rows "
                          f"and columns would never be seen")
    runs(vit, t.vit, "teacher.vit")
    runs(cnn, t.cnn, "teacher.cnn")
    if not hasattr(student, "blocks"):
        raise ConfigError(f"student.name={s.name!r} has no 'blocks' stage list to tap")
    stages = len(student.blocks)
    bad = [v for v in s.stages if not 0 <= v < stages]
    if bad:
        raise ConfigError(f"student.stages: stage {bad[0]} does not exist in {s.name!r}, which has {stages} stages "
                          f"(0 to {stages - 1})")
    facts = ModelFacts(student=s.name, student_stages=stages)
    for name, method in METHODS.items():  # each method checks its own settings against the models
        if method.check is not None:
            method.check(cfg.section(name) if method.settings else None, facts)
    runs(student, s.name, "student.name")
    _check_batch_fits(cfg)


def _available_memory(device: torch.device) -> Optional[int]:
    """Bytes free for a run on ``device`` (CPU: MemAvailable of /proc/meminfo), or None
    where that cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_batch_fits(cfg: Config) -> None:
    """A ConfigError when one float32 input batch alone would take more than half the
    memory free on the device: the run would fail later for certain (the models'
    activations need many times more). Runs that pass may still run out of memory."""
    size, batch = cfg.data.image_size, cfg.train.batch_size
    need = batch * 3 * size * size * 4
    free = _available_memory(distributed.resolve_device(cfg.train.device))
    if free is not None and need > free // 2:
        raise ConfigError(f"data.image_size={size} with train.batch_size={batch}: one input batch alone takes "
                          f"{need / 2**30:.1f} GiB, more than half of the {free / 2**30:.1f} GiB free on this "
                          f"device; lower the image size or the batch")


def load_teacher_weights(teacher: HybridTeacher, path: str, cfg: Config, num_classes: int) -> None:
    load_model_weights(teacher, path, "teacher file",
                       f"a hybrid teacher {cfg.teacher.cnn} + {cfg.teacher.vit} for {num_classes} classes")


def load_student_weights(student: Student, path: str, cfg: Config, num_classes: int) -> None:
    load_model_weights(student, path, "student file", f"student weights ({cfg.student.name}, {num_classes} classes)")


def _seeded(cfg: Config) -> None:
    torch.manual_seed(cfg.train.seed)


def teacher_identity(cfg: Config, record: Dict[str, Any]) -> Dict[str, Any]:
    """What a trained teacher was made from: its architecture, the data and training
    settings that change the result (the same rule as a resume's: every setting but those
    declared ``resume="any"``, where and how visibly it runs), and the fingerprints of the
    training and validation samples in ``record`` (:func:`run_record`, computed once)."""
    def section(name: str) -> Dict[str, Any]:
        rules = SECTIONS[name].rules()
        return {k: v for k, v in cfg.section(name).to_dict().items() if rules[k].resume != "any"}
    return {"teacher": section("teacher"), "data": section("data"), "train": section("train"),
            "train_set": record["train_set"], "val_set": record["val_set"]}


def write_teacher_identity(out: Path, cfg: Config, record: Dict[str, Any]) -> None:
    (out / "teacher_identity.json").write_text(json.dumps(teacher_identity(cfg, record), indent=1, sort_keys=True))


def reusable_teacher(out: Path, cfg: Config, data: Data) -> tuple:
    """``(True, "")`` when ``out`` holds a teacher trained from the same configuration and
    data; else ``(False, why)``."""
    if not (out / "teacher.pt").is_file() or not (out / "teacher_identity.json").is_file():
        return False, f"no trained teacher in {out}"
    try:
        saved = json.loads((out / "teacher_identity.json").read_text())
    except (OSError, ValueError) as exc:
        return False, f"{out}/teacher_identity.json is unreadable ({exc})"
    now = json.loads(json.dumps(teacher_identity(cfg, run_record(cfg, data))))  # the saved one's JSON types
    differ = []
    for key in sorted(set(saved) | set(now)):
        if isinstance(now.get(key), dict) and isinstance(saved.get(key), dict):
            differ += [f"{key}.{k}" for k in sorted(set(saved[key]) | set(now[key]))
                       if saved[key].get(k) != now[key].get(k)]
        elif saved.get(key) != now.get(key):
            differ.append(f"{key} fingerprint" if key.endswith("_set") else key)
    if differ:
        return False, f"the teacher in {out} was trained with a different {', '.join(differ)}"
    return True, ""


def run_record(cfg: Config, data: Data) -> Dict[str, Any]:
    """What a training run is made from, kept in each of its checkpoints: the whole
    configuration and fingerprints of the training and validation samples."""
    return {"config": cfg.to_dict(), "train_set": fingerprint(data.train), "val_set": fingerprint(data.val)}


def check_resume(state: Dict[str, Any], cfg: Config, now: Dict[str, Any], out: Path) -> None:
    """A ConfigError when the run in ``out`` (its checkpoint ``state``) was made with other
    settings (each setting's resume rule) or other samples than ``cfg`` (whose
    :func:`run_record` is ``now``): the checkpoint's own record is checked, whatever
    ``config.yaml`` says or whether it exists."""
    record = state.get("run")
    if not isinstance(record, dict):
        if (out / "config.yaml").is_file():
            return  # a checkpoint from before runs were recorded in it: config.yaml was checked
        raise ConfigError(f"--resume: the checkpoint in {out} does not record the settings it was trained with and "
                          f"{out}/config.yaml is missing, so this run cannot be checked against it; start a new "
                          f"run (another --out, or --overwrite)")
    saved = record.get("config")
    if not isinstance(saved, dict) or not all(isinstance(v, dict) for v in saved.values()):
        raise ConfigError(f"--resume: the checkpoint in {out} holds a damaged record of its settings; start a new "
                          f"run (another --out, or --overwrite)")
    conflicts = resume_conflicts(saved, cfg)
    if conflicts:
        raise ConfigError(f"--resume continues the run in {out} as it was configured; these settings differ and "
                          f"would change its result: {'; '.join(conflicts)}. Start a new run (another --out, or "
                          f"--overwrite) to train with them")
    for key, what in (("train_set", "training"), ("val_set", "validation")):
        if record.get(key) != now[key]:
            raise ConfigError(f"--resume: the {what} samples differ from those the run in {out} was trained on "
                              f"(data.root={cfg.data.root!r}, data.name={cfg.data.name!r}, or the files in it "
                              f"changed); start a new run (another --out, or --overwrite) to train on them")


def _fit(trainer: Trainer, cfg: Config, data: Data, train_set, out: Path, resume: bool, kind: str):
    """Checks a resumed run against its checkpoint, writes ``config.yaml`` (the settings
    this run trains with, once they are accepted), then trains."""
    state = trainer.read_resume_state() if resume else None
    if state is not None:
        check_resume(state, cfg, trainer.run_record, out)
    if trainer.world.is_main:
        mark_run_folder(out, kind)
        save_config(cfg, out / "config.yaml")
    return trainer.fit(train_set, data.val, resume=resume, state=state)


def train_teacher(cfg: Config, out: Path, resume: bool = False) -> Dict[str, Any]:
    data = build_data(cfg)
    _seeded(cfg)
    teacher = build_teacher(cfg, data.num_classes)
    trainer = Trainer(SupervisedTask(teacher, label_smoothing=cfg.train.label_smoothing), cfg.train, out,
                      num_classes=data.num_classes,
                      run_record=run_record(cfg, data))
    history = _fit(trainer, cfg, data, data.train, out, resume, "train-teacher")
    if trainer.world.is_main:
        save_file(teacher.state_dict(), out / "teacher.pt", "the teacher")
        write_teacher_identity(out, cfg, trainer.run_record)  # the record's fingerprints, not new ones
    return {"history": history, "model": teacher, "data": data}


# Methods that need only the teacher's logits and attention map, which a cache holds.
CACHEABLE = tuple(name for name, method in METHODS.items() if method.cacheable)


def open_teacher_cache(path: str, cfg: Config, train_set, teacher) -> TeacherCache:
    return TeacherCache.open(path, expect=cache_identity(train_set, teacher, cfg.teacher.to_dict()))


def distill(cfg: Config, teacher_path: str, out: Path, resume: bool = False,
            teacher_cache: Optional[str] = None) -> Dict[str, Any]:
    """Distils ``cfg``'s student from the teacher file with the method ``cfg.distill.method``
    (with its own section's settings) into ``out``."""
    method = cfg.distill.method  # checked against the registry when it was set
    if teacher_cache and method not in CACHEABLE:
        raise ConfigError(f"--teacher-cache serves the methods that read only the teacher's logits and attention "
                          f"({', '.join(CACHEABLE)}); {method!r} needs the online teacher")
    if teacher_cache and (cfg.train.mixup > 0 or cfg.train.cutmix > 0):
        raise ConfigError("--teacher-cache cannot serve train.mixup / train.cutmix: the cache holds the teacher's "
                          "outputs for each image, and mixing pairs images per batch; run without the cache")
    data = build_data(cfg)
    train_set, num_classes = data.train, data.num_classes
    _seeded(cfg)
    teacher = build_teacher(cfg, num_classes)
    load_teacher_weights(teacher, teacher_path, cfg, num_classes)
    if teacher_cache:
        cache = open_teacher_cache(teacher_cache, cfg, train_set, teacher)
        if cfg.train.epochs > cache.epochs and distributed.world().is_main:
            print(f"note: {cfg.train.epochs} epochs from a cache of {cache.epochs}: epoch n replays cached "
                  f"epoch n mod {cache.epochs}", flush=True)
        train_set = CachedTeacherDataset(train_set, cache)
    student = build_student(cfg, num_classes)
    task = build_task(method, teacher, student, cfg.section(method) if METHODS[method].settings else None,
                      label_smoothing=cfg.train.label_smoothing)
    trainer = Trainer(task, cfg.train, out, num_classes=num_classes, run_record=run_record(cfg, data))
    history = _fit(trainer, cfg, data, train_set, out, resume, "distill")
    if trainer.world.is_main:
        save_file(student.state_dict(), out / "student.pt", "the student")  # the student alone, for inference
    return {"history": history, "model": student, "teacher": teacher, "data": data}


def cache_teacher(cfg: Config, teacher_path: str, out: Path, *, epochs: int, dtype: str = "float16",
                  topk: Optional[int] = None, overwrite: bool = False, teacher: Optional[HybridTeacher] = None,
                  data: Optional[Data] = None) -> Path:
    """Writes the teacher cache of ``cfg``'s training set; ``teacher`` and ``data``, where
    the caller has them already, save loading them again."""
    if teacher_path and Path(out).is_dir() and Path(out).resolve() in Path(teacher_path).resolve().parents:
        raise TeacherCacheError(f"--out {out} holds the teacher {teacher_path}; a cache folder is replaced whole, so "
                                f"give the cache a folder of its own")
    _world, device = distributed.setup(cfg.train.device)
    data = data if data is not None else build_data(cfg)
    if teacher is None:
        teacher = build_teacher(cfg, data.num_classes)
        load_teacher_weights(teacher, teacher_path, cfg, data.num_classes)
    t = cfg.train
    return write_teacher_cache(teacher, data.train, out, epochs=epochs, teacher_config=cfg.teacher.to_dict(),
                               dtype=dtype, topk=topk, batch_size=t.batch_size, num_workers=t.num_workers,
                               device=device, overwrite=overwrite, progress=t.progress)


def write_run_report(out: Path, title: str, runs: Dict[str, Dict]) -> None:
    write_report(out / "report.md", title, runs)
    plot_curves(out / "curves.png", {name: run["history"] for name, run in runs.items()})


def evaluate_model(model, dataset, cfg: Config, device):
    model.to(device).eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.train.batch_size)
    return evaluate_logits(model, loader, device)


def evaluate_checkpoint(cfg: Config, path: str, model: str, split: str) -> Dict[str, Any]:
    """Loss and accuracy of a saved ``model`` ("teacher" or "student") on ``split`` ("val"
    or "test") of ``cfg``'s data: what ``agkd evaluate`` prints."""
    data = build_data(cfg)
    if model == "teacher":
        net = build_teacher(cfg, data.num_classes)
        load_teacher_weights(net, path, cfg, data.num_classes)
    else:
        net = build_student(cfg, data.num_classes)
        load_student_weights(net, path, cfg, data.num_classes)
    logits, targets = evaluate_model(net, getattr(data, split), cfg, distributed.resolve_device(cfg.train.device))
    m = classification_metrics(logits, targets)
    return {"model": model, "split": split, f"{split}_loss": m["loss_sum"] / m["count"],
            f"{split}_acc": m["correct"] / m["count"], "samples": m["count"]}


def test_accuracy(model, data: Data, cfg: Config, device) -> float:
    logits, targets = evaluate_model(model, data.test, cfg, device)
    return (logits.argmax(1) == targets).float().mean().item()


def student_report(cfg: Config, run, device, costs: bool = True) -> Dict[str, Any]:
    """The student's test accuracy and the review's metrics against the teacher, on the test set."""
    s_logits, targets = evaluate_model(run["model"], run["data"].test, cfg, device)
    t_logits, _ = evaluate_model(run["teacher"], run["data"].test, cfg, device)
    compare = comparison_metrics(s_logits, t_logits, targets, sum(p.numel() for p in run["teacher"].parameters()),
                                 sum(p.numel() for p in run["model"].parameters()))
    result = {"history": run["history"], "compare": compare,
              "test_acc": (s_logits.argmax(1) == targets).float().mean().item()}
    if costs:
        result["costs"] = model_costs(run["model"], cfg.data.image_size, device)
    return result
