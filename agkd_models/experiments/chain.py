"""Chains of distillation runs in which each step's student is the next step's teacher:

- a **teacher assistant** (Mirzadeh et al., "Improved Knowledge Distillation via Teacher
  Assistant", AAAI 2020): teacher → assistant (a mid-size architecture, distilled from the
  teacher) → student, for gaps too wide to bridge in one step (``--through ARCH,...``);
- **born-again networks** (Furlanello et al., ICML 2018): the student's own architecture
  as its teacher, generation after generation (``--generations N``), generation 0 trained
  on the labels where no teacher is given.

Each step is an ordinary distillation run (``Experiment.distill``) in a folder of its own
under the chain's, with the chosen method and the configuration's settings; its teacher is
the previous step's student loaded from its ``student.pt`` (:class:`StudentTeacher`), so
the methods that read only a teacher's outputs can run in a chain. A finished step leaves
``result.json``; running the same command again skips every step whose configuration and
teacher are unchanged (an unfinished one is trained again), as ``agkd compare`` does.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence

from torch import nn

from ..config import Config, ConfigError
from ..data.cache import teacher_fingerprint
from ..engine.distributed import resolve_device
from ..engine.checkpoint import atomic_write_text
from ..models.student import StudentTeacher
from ..distillers import METHODS
from .compare import _earlier_result, _result_relevant
from .experiment import Experiment
from .pipeline import CACHEABLE, build_student, load_student_weights

__all__ = ["ChainStep", "plan_chain", "run_chain", "write_chain_report"]


class ChainStep(NamedTuple):
    """One run of a chain: its folder's name, the student architecture and the method."""
    name: str
    student: str
    method: str


def plan_chain(cfg: Config, *, through: Sequence[str] = (), generations: int = 0,
               has_teacher: bool = True) -> List[ChainStep]:
    """The steps of a chain from ``cfg`` (its student and ``distill.method``): one per
    architecture in ``through`` (the assistants, largest first), then the student, or with
    ``generations`` that many generations of the student (preceded, where there is no
    teacher, by generation 0 trained on the labels alone). A ConfigError for a chain that
    cannot run."""
    method = cfg.distill.method
    if generations < 0:
        raise ConfigError(f"--generations must be at least 1, got {generations}")
    if method not in CACHEABLE:
        raise ConfigError(f"a chain distils each step from the previous step's student, which serves the methods "
                          f"that read only a teacher's outputs ({', '.join(CACHEABLE)}); distill.method is "
                          f"{method!r}")
    if not has_teacher and (through or not generations):
        raise ConfigError("a chain without --teacher starts from a generation trained on the labels: give "
                          "--generations N (born-again networks), or --teacher for assistants (--through)")
    steps = [ChainStep(f"assistant{i}-{arch}", arch, method) for i, arch in enumerate(through, start=1)]
    if not generations:
        return steps + [ChainStep("student", cfg.student.name, method)]
    if not has_teacher:
        steps.append(ChainStep("gen0", cfg.student.name, "none"))
    return steps + [ChainStep(f"gen{g}", cfg.student.name, method) for g in range(1, generations + 1)]


def step_config(cfg: Config, step: ChainStep) -> Config:
    """``cfg`` as the step runs it: its student architecture and method."""
    step_cfg = copy.deepcopy(cfg)
    step_cfg.student.name, step_cfg.distill.method = step.student, step.method
    return step_cfg


def run_chain(experiment: Experiment, out: Path, steps: Sequence[ChainStep],
              log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Runs ``steps`` in order under ``out`` (each in ``out/<step.name>``), every step's
    teacher the previous one's student (the first's: the experiment's teacher, if any), and
    returns the chain's summary (also written to ``out/chain.{json,md}``): per step its
    teacher, test and validation accuracy, the review's metrics against its own teacher,
    and its mean epoch time."""
    start = time.time()
    cfg = experiment.cfg
    device = resolve_device(cfg.train.device)
    num_classes = experiment.data().num_classes
    teacher: Optional[nn.Module] = experiment.teacher if experiment.teacher_path is not None else None
    teacher_id = experiment.teacher_identity if teacher is not None else None
    teacher_name = None if teacher is None else (f"{len(experiment.teacher_paths)} teachers combined"
                                                 if experiment.multi_teacher else f"{cfg.teacher.cnn} + {cfg.teacher.vit}")
    results = []
    for index, step in enumerate(steps, start=1):
        step_cfg = step_config(cfg, step)
        folder = out / step.name
        identity = {"config": _result_relevant(step_cfg, step.method), "teacher": teacher_id}
        where = f"step {index}/{len(steps)}: {step.student} by {METHODS[step.method].label}" + (
            f" from {teacher_name}" if teacher_name else " on the labels")
        result = _earlier_result(folder, identity)
        if result is not None:
            log(f"{where}: done before, test acc {result['test_acc']:.4f}")
        else:
            log(where)
            run = experiment.distill(step_cfg, folder, teacher=teacher)
            report = experiment.student_report(step_cfg, run, device, costs=False, teacher=teacher)
            result = {"identity": identity, "test_acc": report["test_acc"], "val_acc": run["history"][-1]["val_acc"],
                      "compare": report["compare"], "history": run["history"]}
            atomic_write_text(folder / "result.json", json.dumps(result, indent=1))  # never a truncated result
            log(f"  test acc {result['test_acc']:.4f}")
        epoch_seconds = [r["epoch_seconds"] for r in result["history"] if "epoch_seconds" in r]
        results.append({"step": step.name, "student": step.student, "method": step.method, "teacher": teacher_name,
                        "test_acc": result["test_acc"], "val_acc": result["val_acc"], "compare": result["compare"],
                        "epoch_seconds_mean": sum(epoch_seconds) / len(epoch_seconds) if epoch_seconds else None})
        # The next step's teacher: this step's student, from its file like any teacher.
        student = build_student(step_cfg, num_classes)
        load_student_weights(student, str(folder / "student.pt"), step_cfg, num_classes)
        teacher = StudentTeacher(student)
        teacher_id = teacher_fingerprint(teacher, {"student": step.student, "stages": list(step_cfg.student.stages)})
        teacher_name = f"{step.name} ({step.student})"
    summary = {"teacher": ", ".join(map(str, experiment.teacher_paths)) or None, "steps": results,
               "device": str(device), "seconds": time.time() - start}
    write_chain_report(out, summary)
    return summary


def write_chain_report(out: Path, summary: Dict[str, Any]) -> None:
    """``chain.json`` and ``chain.md``: one row per step, in order."""
    atomic_write_text(out / "chain.json", json.dumps(summary, indent=1))
    lines = ["# Distillation chain", "",
             f"Teacher: {summary['teacher'] or 'none (generation 0 trained on the labels)'}; each later step is "
             f"distilled from the step before it. Test accuracy on the test set; the metrics are against each "
             f"step's own teacher.", "",
             "| step | student | method | teacher | test acc | val acc | relative error E_s/E_t | "
             "KL(teacher ‖ student) | s / epoch |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in summary["steps"]:
        c = r["compare"] or {}
        fmt = lambda v, d=4: "—" if v is None else f"{v:.{d}f}"  # noqa: E731
        lines.append(f"| {r['step']} | {r['student']} | {METHODS[r['method']].label} | "
                     f"{r['teacher'] or '—'} | {r['test_acc']:.4f} | {r['val_acc']:.4f} | "
                     f"{fmt(c.get('relative_error'), 3)} | {fmt(c.get('kl'))} | {fmt(r['epoch_seconds_mean'], 1)} |")
    atomic_write_text(out / "chain.md", "\n".join(lines) + "\n")
