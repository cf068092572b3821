"""The parts every run is made of: the data, teacher and student built from a resolved
configuration, the checks of settings that span sections, a run's record and the resume
check against it, teacher training and the teacher's recipe. Runs that share a teacher
are made from an :class:`~agkd_models.experiments.experiment.Experiment`."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Union

import torch

from ..config import SECTIONS, Config, ConfigError, resume_conflicts, save_config
from ..data.datasets import build_datasets, fingerprint, limit
from ..distillers import METHODS, ModelFacts
from ..engine import distributed
from ..engine.checkpoint import CheckpointError, load_model_weights, read_newest_checkpoint, save_file
from ..engine.run_folder import mark_run_folder
from ..engine.evaluation import evaluate_logits
from ..engine.task import SupervisedTask
from ..engine.trainer import Trainer
from ..models.student import Student
from ..models.teacher import HybridTeacher
from .report import plot_curves, write_report

PathLike = Union[str, os.PathLike]


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


def teacher_config_of(path: PathLike, cfg: Config) -> Config:
    """``cfg`` with the ``teacher`` section of the teacher in ``path``: that of the
    ``teacher_recipe.json`` beside it (what ``train-teacher`` writes), where there is one,
    so that teachers of different architectures can be combined; else ``cfg``'s."""
    folder = Path(path).parent
    recipe = next((folder / name for name in (RECIPE_FILE, _OLD_RECIPE_FILE) if (folder / name).is_file()), None)
    own = copy.deepcopy(cfg)
    if recipe is None:
        return own
    try:
        saved = json.loads(recipe.read_text())["teacher"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{recipe}: cannot read the teacher's architecture from it ({exc})") from None
    for key, value in saved.items():
        setattr(own.teacher, key, value)  # checked like any setting
    return own


def load_teacher_weights(teacher: HybridTeacher, path: str, cfg: Config, num_classes: int) -> None:
    load_model_weights(teacher, path, "teacher file",
                       f"a hybrid teacher {cfg.teacher.cnn} + {cfg.teacher.vit} for {num_classes} classes")


def load_student_weights(student: Student, path: str, cfg: Config, num_classes: int) -> None:
    load_model_weights(student, path, "student file", f"student weights ({cfg.student.name}, {num_classes} classes)")


def _seeded(cfg: Config) -> None:
    torch.manual_seed(cfg.train.seed)


def teacher_recipe(cfg: Config, record: Dict[str, Any]) -> Dict[str, Any]:
    """What a trained teacher was made from (its recipe; the teacher's identity is its
    weights, :func:`~agkd_models.data.cache.teacher_identity`): its architecture, the data and training
    settings that change the result (the same rule as a resume's: every setting but those
    declared ``resume="any"``, where and how visibly it runs), and the fingerprints of the
    training and validation samples in ``record`` (:func:`run_record`, computed once)."""
    def section(name: str) -> Dict[str, Any]:
        rules = SECTIONS[name].rules()
        return {k: v for k, v in cfg.section(name).to_dict().items() if rules[k].resume != "any"}
    return {"teacher": section("teacher"), "data": section("data"), "train": section("train"),
            "train_set": record["train_set"], "val_set": record["val_set"]}


RECIPE_FILE = "teacher_recipe.json"
_OLD_RECIPE_FILE = "teacher_identity.json"  # its earlier name: teachers trained then are still reused


def write_teacher_recipe(out: Path, cfg: Config, record: Dict[str, Any]) -> None:
    (out / RECIPE_FILE).write_text(json.dumps(teacher_recipe(cfg, record), indent=1, sort_keys=True))


def reusable_teacher(out: Path, cfg: Config, data: Data) -> tuple:
    """``(True, "")`` when ``out`` holds a teacher trained from the same configuration and
    data; else ``(False, why)``."""
    recipe = next((out / name for name in (RECIPE_FILE, _OLD_RECIPE_FILE) if (out / name).is_file()), None)
    if not (out / "teacher.pt").is_file() or recipe is None:
        return False, f"no trained teacher in {out}"
    try:
        saved = json.loads(recipe.read_text())
    except (OSError, ValueError) as exc:
        return False, f"{recipe} is unreadable ({exc})"
    now = json.loads(json.dumps(teacher_recipe(cfg, run_record(cfg, data))))  # the saved one's JSON types
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


def read_history(folder: Path) -> List[Dict[str, float]]:
    """A finished run's per-epoch history: from ``metrics.jsonl``, or where that is damaged
    (a full disk, an edit) from the checkpoint, which holds it too; [] when neither can be read."""
    try:
        return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    except (OSError, ValueError):
        pass
    try:
        state = read_newest_checkpoint(folder / "checkpoint.pt", warn=False)
        return list(state["history"]) if state is not None else []
    except CheckpointError:
        return []


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


def fit(trainer: Trainer, cfg: Config, data: Data, train_set, out: Path, resume: bool, kind: str):
    """Checks a resumed run against its checkpoint, writes ``config.yaml`` (the settings
    this run trains with, once they are accepted), then trains."""
    state = trainer.read_resume_state() if resume else None
    if state is not None:
        check_resume(state, cfg, trainer.run_record, out)
    if trainer.world.is_main:
        mark_run_folder(out, kind)
        save_config(cfg, out / "config.yaml")
    return trainer.fit(train_set, data.val, resume=resume, state=state)


def train_teacher(cfg: Config, out: Path, resume: bool = False, data: Optional[Data] = None) -> Dict[str, Any]:
    """Trains ``cfg``'s teacher into ``out`` (on ``data`` where the caller has built it)."""
    data = data if data is not None else build_data(cfg)
    _seeded(cfg)
    teacher = build_teacher(cfg, data.num_classes)
    trainer = Trainer(SupervisedTask(teacher, label_smoothing=cfg.train.label_smoothing), cfg.train, out,
                      num_classes=data.num_classes,
                      run_record=run_record(cfg, data))
    history = fit(trainer, cfg, data, data.train, out, resume, "train-teacher")
    if trainer.world.is_main:
        save_file(teacher.state_dict(), out / "teacher.pt", "the teacher")
        write_teacher_recipe(out, cfg, trainer.run_record)  # the record's fingerprints, not new ones
    return {"history": history, "model": teacher, "data": data}


# Methods that need only the teacher's logits and attention map, which a cache holds.
CACHEABLE = tuple(name for name, method in METHODS.items() if method.cacheable)


def write_run_report(out: Path, title: str, runs: Dict[str, Dict], notes: Optional[List[str]] = None) -> None:
    write_report(out / "report.md", title, runs, notes)
    plot_curves(out / "curves.png", {name: run["history"] for name, run in runs.items()})


def evaluate_model(model, dataset, cfg: Config, device):
    model.to(device).eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.train.batch_size)
    return evaluate_logits(model, loader, device)


def test_accuracy(model, data: Data, cfg: Config, device) -> float:
    logits, targets = evaluate_model(model, data.test, cfg, device)
    return (logits.argmax(1) == targets).float().mean().item()
