"""An experiment: one configuration's data and one trained teacher, built once and shared
by every run made from them.

``agkd distill``, ``evaluate`` and ``cache-teacher`` make one run from an experiment;
``agkd compare`` and ``agkd demo`` make M methods x S seeds of them. What used to be
repeated per run is done once per experiment:

- the data splits are built once; a run's data is the shared splits with the training
  set's augmentation drawn by the run's ``train.seed`` (:meth:`Experiment.data`);
- the teacher is built and its weights loaded once (:attr:`Experiment.teacher`), and its
  one identity — architecture and weights, :func:`~agkd_models.data.cache.teacher_identity`
  — computed once; teacher caches and comparison results both record it;
- the teacher's test-set logits, which every student report compares against, are
  computed once per device;
- each teacher cache is opened and its checksums verified once; a run only checks that it
  was made from the run's data and this teacher.

A run's configuration may differ from the experiment's in the students' sections
(``train``, ``distill``, the methods'), never in ``data`` or ``teacher``.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from ..config import Config, ConfigError
from ..data.cache import (CachedTeacherDataset, TeacherCache, TeacherCacheError, cache_identity, teacher_architecture,
                          teacher_identity, write_teacher_cache)
from ..distillers import METHODS, build_task
from ..engine import distributed
from ..engine.checkpoint import save_file
from ..engine.evaluation import classification_metrics
from ..engine.trainer import Trainer
from ..models.multi_teacher import MultiTeacher
from ..models.teacher import HybridTeacher
from .pipeline import (CACHEABLE, Data, build_data, build_student, build_teacher, evaluate_model, fit,
                       load_student_weights, load_teacher_weights, read_history, reusable_teacher, run_record,
                       teacher_config_of, train_teacher)
from .report import comparison_metrics, model_costs

PathLike = Union[str, os.PathLike]


class Experiment:
    """The data and the trained teacher of ``cfg``, shared by the runs made from them.

    ``teacher_path`` is the teacher's weights file; it may be given later by
    :meth:`prepare_teacher`, which trains the teacher (or reuses one trained from the same
    settings). Several files make a multi-teacher experiment: the teachers, each of its own
    architecture (:func:`~agkd_models.experiments.pipeline.teacher_config_of`), are combined
    into one :class:`~agkd_models.models.multi_teacher.MultiTeacher` as ``distill.teacher_weights``
    and ``distill.teacher_average`` say. Everything is built on first use."""

    def __init__(self, cfg: Config, teacher_path: Union[None, PathLike, Sequence[PathLike]] = None):
        self.cfg = cfg
        paths = [] if teacher_path is None else (
            [teacher_path] if isinstance(teacher_path, (str, os.PathLike)) else list(teacher_path))
        self.teacher_paths: List[Path] = [Path(p) for p in paths]
        self._splits: Optional[Data] = None
        self._teacher: Optional[nn.Module] = None  # a HybridTeacher, or several as a MultiTeacher
        self._teacher_identity: Optional[str] = None
        self._rng_after_teacher_init: Dict[int, torch.Tensor] = {}
        self._teacher_test_logits: Dict[str, tuple] = {}
        self._caches: Dict[Path, TeacherCache] = {}

    # The data -------------------------------------------------------------------------

    def data(self, seed: Optional[int] = None) -> Data:
        """The splits, the training set's augmentation drawn by ``seed`` (default: the
        configuration's ``train.seed``); the splits themselves never depend on it."""
        if self._splits is None:
            self._splits = build_data(self.cfg)
        seed = self.cfg.train.seed if seed is None else seed
        return self._splits._replace(train=self._splits.train.with_seed(seed))

    # The teacher ----------------------------------------------------------------------

    @property
    def teacher_path(self) -> Optional[Path]:
        """The (first) teacher's file; None before there is one."""
        return self.teacher_paths[0] if self.teacher_paths else None

    @property
    def multi_teacher(self) -> bool:
        return len(self.teacher_paths) > 1

    def check_serves(self, method: str) -> None:
        """A ConfigError unless this experiment's teacher can serve ``method``: several
        teachers combined give only outputs, which the methods that read nothing else use."""
        if self.multi_teacher and METHODS[method].reads_teacher and method not in CACHEABLE:
            raise ConfigError(f"several --teacher files are combined into one teacher's outputs, which serve the "
                              f"methods that read only those ({', '.join(CACHEABLE)}); {method!r} reads a hybrid "
                              f"teacher's insides")

    @property
    def teacher(self) -> nn.Module:
        """The trained teacher, loaded once from :attr:`teacher_path` (several teachers'
        files: a MultiTeacher of them). Runs move it to
        their device and may make it channels-last; it is handed out in the default
        memory format each time, so that every run sees the same teacher."""
        if self._teacher is None:
            self._load_teacher(build_teacher(self.cfg, self.data().num_classes))
        return self._teacher.to(memory_format=torch.contiguous_format)

    def _load_teacher(self, teacher: HybridTeacher) -> None:
        if self.teacher_path is None:
            raise ValueError("Experiment: no teacher_path (give one, or call prepare_teacher first)")
        if self.multi_teacher:
            self._teacher, self._teacher_identity = self._load_teachers(), None
            return
        load_teacher_weights(teacher, str(self.teacher_path), self.cfg, self.data().num_classes)
        self._teacher, self._teacher_identity = teacher, None

    def _load_teachers(self) -> MultiTeacher:
        num_classes = self.data().num_classes
        teachers = []
        for path in self.teacher_paths:
            own = teacher_config_of(path, self.cfg)
            with torch.random.fork_rng(devices=[]):  # the run's generator stays as seed_run left it
                teacher = build_teacher(own, num_classes)
            load_teacher_weights(teacher, str(path), own, num_classes)
            teachers.append(teacher)
        d = self.cfg.distill
        if d.teacher_weights == "val_acc":
            device = distributed.resolve_device(self.cfg.train.device)
            accuracies = []
            for teacher in teachers:
                logits, targets = evaluate_model(teacher, self.data().val, self.cfg, device)
                accuracies.append((logits.argmax(1) == targets).float().mean().item())
            total = sum(accuracies)
            weights = [a / total for a in accuracies] if total > 0 else [1 / len(teachers)] * len(teachers)
        else:
            weights = [1 / len(teachers)] * len(teachers)
        return MultiTeacher([t.cpu() for t in teachers], weights, d.teacher_average)

    @property
    def teacher_config(self) -> Dict[str, Any]:
        """The teacher's architecture as teacher caches and identities record it: the
        ``teacher`` section, or for several teachers each one's (with its own identity),
        their weights and how they are averaged."""
        if not self.multi_teacher:
            return self.cfg.teacher.to_dict()
        combined = self.teacher  # loads them
        architectures = [teacher_config_of(path, self.cfg).teacher.to_dict() for path in self.teacher_paths]
        return {"teachers": [{"architecture": teacher_architecture(arch), "identity": teacher_identity(t, arch)}
                             for arch, t in zip(architectures, combined.teachers)],
                "weights": combined.weights, "average": combined.average}

    @property
    def teacher_identity(self) -> str:
        """:func:`~agkd_models.data.cache.teacher_identity` of :attr:`teacher`: what teacher
        caches and comparison results record as the teacher they were made with."""
        if self._teacher_identity is None:
            self._teacher_identity = teacher_identity(self.teacher, self.teacher_config)
        return self._teacher_identity

    def seed_run(self, seed: int) -> None:
        """Seeds the global generators for a student run of ``seed`` as every run has been
        seeded: ``torch.manual_seed(seed)``, then the draws of the teacher's random
        initialisation, which precede the student's (its initial weights depend on them).
        The generator's state after those draws is kept per seed, so the teacher is
        initialised once per seed at most instead of once per run; the first one built is
        the one whose weights are loaded."""
        state = self._rng_after_teacher_init.get(seed)
        if state is None:
            torch.manual_seed(seed)
            initialised = build_teacher(self.cfg, self.data().num_classes)
            state = self._rng_after_teacher_init[seed] = torch.get_rng_state()
            if self._teacher is None and self.teacher_path is not None:
                self._load_teacher(initialised)
        torch.manual_seed(seed)  # every device's generator; the teacher is built on the CPU
        torch.set_rng_state(state)

    def prepare_teacher(self, folder: Path, epochs: int, log: Callable[[str], None] = print) -> Dict[str, Any]:
        """Makes the teacher in ``folder`` (trained for ``epochs``) this experiment's, unless
        one trained from the same settings and data is already there, which is reused.
        Returns its path, its training history and whether it was reused."""
        teacher_cfg = copy.deepcopy(self.cfg)
        teacher_cfg.train.epochs = epochs
        data = self.data(teacher_cfg.train.seed)
        reuse, why = reusable_teacher(folder, teacher_cfg, data)
        if reuse:
            log(f"reusing the teacher trained in {folder} (same configuration and data fingerprint)")
            history = read_history(folder)
        else:
            log(f"training the hybrid teacher ({self.cfg.teacher.cnn} + {self.cfg.teacher.vit}), {epochs} epochs "
                f"({why})")
            history = train_teacher(teacher_cfg, folder, data=data)["history"]
        # Loaded from its file like any teacher: the trained module may be compiled or on a device.
        # (The generator states after a teacher's initialisation depend on its seed and
        # architecture only, so those kept stay valid.)
        self.teacher_paths, self._teacher, self._teacher_identity = [folder / "teacher.pt"], None, None
        return {"path": self.teacher_path, "history": history, "reused": reuse}

    def teacher_test_logits(self, device: torch.device) -> tuple:
        """``(logits, targets)`` of the teacher on the test set, computed once per device."""
        key = str(device)
        if key not in self._teacher_test_logits:
            self._teacher_test_logits[key] = evaluate_model(self.teacher, self.data().test, self.cfg, device)
        return self._teacher_test_logits[key]

    # Teacher caches -------------------------------------------------------------------

    def open_cache(self, path: PathLike, seed: Optional[int] = None) -> TeacherCache:
        """The teacher cache in ``path``, its bytes verified against its checksums the first
        time; every time, a TeacherCacheError unless it was made from the training set of
        ``seed`` and this teacher."""
        key = Path(path).resolve()
        cache = self._caches.get(key)
        if cache is None:
            cache = self._caches[key] = TeacherCache.open(path)
        cache.check_identity(cache_identity(self.data(seed).train, self.teacher_identity))
        return cache

    def find_cache(self, path: PathLike, seed: int) -> Optional[TeacherCache]:
        """:meth:`open_cache`, or None where ``path`` holds no cache that serves ``seed``."""
        if not Path(path).is_dir():
            return None
        try:
            return self.open_cache(path, seed)
        except TeacherCacheError:
            return None

    def write_cache(self, out: PathLike, *, epochs: int, seed: Optional[int] = None, dtype: str = "float16",
                    topk: Optional[int] = None, overwrite: bool = False) -> Path:
        """Writes the teacher cache of the training set of ``seed`` (default
        ``train.seed``) over ``epochs`` augmentation draws into ``out``."""
        out = Path(out)
        inside = [p for p in self.teacher_paths if out.is_dir() and out.resolve() in p.resolve().parents]
        if inside:
            raise TeacherCacheError(f"--out {out} holds the teacher {inside[0]}; a cache folder is replaced "
                                    f"whole, so give the cache a folder of its own")
        _world, device = distributed.setup(self.cfg.train.device)
        t = self.cfg.train
        write_teacher_cache(self.teacher, self.data(seed).train, out, epochs=epochs,
                            teacher_config=self.teacher_config, dtype=dtype, topk=topk,
                            batch_size=t.batch_size, num_workers=t.num_workers, device=device,
                            overwrite=overwrite, progress=t.progress)
        self._caches.pop(out.resolve(), None)  # a new cache, verified when first opened
        return out

    # Runs -----------------------------------------------------------------------------

    def _check_shares(self, cfg: Config) -> None:
        for section in ("data", "teacher"):
            if cfg.section(section).to_dict() != self.cfg.section(section).to_dict():
                raise ValueError(f"Experiment: a run's {section} settings must be the experiment's")
        d, own = cfg.distill, self.cfg.distill  # how the teachers were combined, once
        if (d.teacher_weights, d.teacher_average) != (own.teacher_weights, own.teacher_average):
            raise ValueError("Experiment: a run's distill.teacher_weights and teacher_average must be the experiment's")

    def distill(self, cfg: Config, out: Path, resume: bool = False,
                teacher_cache: Optional[PathLike] = None, teacher: Optional[nn.Module] = None) -> Dict[str, Any]:
        """Distils ``cfg``'s student from the teacher with the method ``cfg.distill.method``
        (with its own section's settings) into ``out``; with ``teacher_cache`` the teacher's
        outputs are replayed from that cache instead of computed. ``teacher``: another
        teacher than the experiment's, for this run (a chain's step: a trained student);
        without either, only the method ``none`` can run."""
        self._check_shares(cfg)
        method = cfg.distill.method  # checked against the registry when it was set
        if teacher is None:
            self.check_serves(method)
        if teacher_cache and method not in CACHEABLE:
            raise ConfigError(f"--teacher-cache serves the methods that read only the teacher's logits and "
                              f"attention ({', '.join(CACHEABLE)}); {method!r} "
                              + ("needs the online teacher" if METHODS[method].reads_teacher
                                 else "reads no teacher output: run it without the cache"))
        if teacher_cache and (cfg.train.mixup > 0 or cfg.train.cutmix > 0):
            raise ConfigError("--teacher-cache cannot serve train.mixup / train.cutmix: the cache holds the "
                              "teacher's outputs for each image, and mixing pairs images per batch; run without "
                              "the cache")
        data = self.data(cfg.train.seed)
        self.seed_run(cfg.train.seed)
        if teacher is None and self.teacher_path is not None:
            teacher = self.teacher
        train_set = data.train
        if teacher_cache:
            cache = self.open_cache(teacher_cache, cfg.train.seed)
            if cfg.train.epochs > cache.epochs and distributed.world().is_main:
                print(f"note: {cfg.train.epochs} epochs from a cache of {cache.epochs}: epoch n replays cached "
                      f"epoch n mod {cache.epochs}", flush=True)
            train_set = CachedTeacherDataset(train_set, cache)
        student = build_student(cfg, data.num_classes)
        task = build_task(method, teacher, student, cfg.section(method) if METHODS[method].settings else None,
                          label_smoothing=cfg.train.label_smoothing,
                          sections={name: cfg.section(name) for name, m in METHODS.items() if m.settings})
        trainer = Trainer(task, cfg.train, out, num_classes=data.num_classes, run_record=run_record(cfg, data))
        history = fit(trainer, cfg, data, train_set, out, resume, "distill")
        kept = task.kept_models()
        if trainer.world.is_main:
            save_file(student.state_dict(), out / "student.pt", "the student")  # the student alone, for inference
            for name, model in kept.items():
                save_file(model.state_dict(), out / f"{name}.pt", f"the {name}")
        return {"history": history, "model": student, "kept": kept, "data": data}

    def student_report(self, cfg: Config, run: Dict[str, Any], device: torch.device,
                       costs: bool = True, teacher: Optional[nn.Module] = None) -> Dict[str, Any]:
        """The student's test accuracy and the review's metrics against the teacher, on the
        test set (against ``teacher`` where the run had another); with ``costs`` also the
        student's parameters, FLOPs and latency; and the
        test accuracy of every model the run kept beside it (``kept_test_acc``, DML's peers)."""
        s_logits, targets = evaluate_model(run["model"], run["data"].test, cfg, device)
        if teacher is None and self.teacher_path is not None:
            teacher = self.teacher
        compare = None  # a run without a teacher (a chain's first generation) is compared with none
        if teacher is not None:
            t_logits = (self.teacher_test_logits(device)[0] if teacher is self._teacher
                        else evaluate_model(teacher, run["data"].test, cfg, device)[0])
            compare = comparison_metrics(s_logits, t_logits, targets, sum(p.numel() for p in teacher.parameters()),
                                         sum(p.numel() for p in run["model"].parameters()))
        result = {"history": run["history"], "compare": compare,
                  "test_acc": (s_logits.argmax(1) == targets).float().mean().item()}
        if costs:
            result["costs"] = model_costs(run["model"], cfg.data.image_size, device)
        kept = {}
        for name, model in run.get("kept", {}).items():  # DML's other peers
            logits, _ = evaluate_model(model, run["data"].test, cfg, device)
            kept[name] = (logits.argmax(1) == targets).float().mean().item()
        if kept:
            result["kept_test_acc"] = kept
        return result

    def evaluate(self, path: PathLike, model: str = "student", split: str = "test") -> Dict[str, Any]:
        """Loss and accuracy of the saved ``model`` ("teacher" or "student") in ``path`` on
        ``split`` ("val" or "test"): what ``agkd evaluate`` prints."""
        data = self.data()
        if model == "teacher":
            net = build_teacher(self.cfg, data.num_classes)
            load_teacher_weights(net, str(path), self.cfg, data.num_classes)
        else:
            net = build_student(self.cfg, data.num_classes)
            load_student_weights(net, str(path), self.cfg, data.num_classes)
        device = distributed.resolve_device(self.cfg.train.device)
        logits, targets = evaluate_model(net, getattr(data, split), self.cfg, device)
        m = classification_metrics(logits, targets)
        return {"model": model, "split": split, f"{split}_loss": m["loss_sum"] / m["count"],
                f"{split}_acc": m["correct"] / m["count"], "samples": m["count"]}


def distill(cfg: Config, teacher_path: PathLike, out: Path, resume: bool = False,
            teacher_cache: Optional[PathLike] = None) -> Dict[str, Any]:
    """One distillation run from an experiment of its own (``agkd distill``)."""
    return Experiment(cfg, teacher_path).distill(cfg, Path(out), resume, teacher_cache)


def cache_teacher(cfg: Config, teacher_path: PathLike, out: PathLike, **options) -> Path:
    """One teacher cache from an experiment of its own (``agkd cache-teacher``); the options
    are :meth:`Experiment.write_cache`'s."""
    return Experiment(cfg, teacher_path).write_cache(out, **options)
