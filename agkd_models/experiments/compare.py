"""Seeded comparisons of distillation methods: one teacher, students trained with each
method over several training seeds, and a table, a JSON file and a plot of the test
accuracies (mean ± standard deviation) with the review's metrics against the teacher.

``agkd compare`` and ``agkd demo`` both run :func:`run_comparison` over one
:class:`~agkd_models.experiments.experiment.Experiment`, so the data and the teacher are
built once for all runs. The teacher's work is shared: a teacher already trained in the
output folder from the same configuration and data is reused, and the methods that read
only the teacher's logits and attention maps replay one float32 teacher cache per seed
instead of running the teacher again.
A finished run is not repeated: each writes ``result.json`` beside its checkpoint, and a
comparison started again over the same folder picks those up.

A grid (``--grid agkd.kd_weight=0.5,0.9 --grid train.lr=0.001,0.002``) trains every method
at every point of the grid that concerns it (its own section's keys and the shared ones),
over every seed, and reports per method the point chosen on **validation** accuracy (mean
over the seeds) with that point's test accuracy; the test set never chooses anything. The
whole grid is in ``comparison.json``.
"""
from __future__ import annotations

import copy
import itertools
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence

import yaml

from ..config import SECTIONS, Config, ConfigError
from ..distillers import METHODS
from ..engine.checkpoint import atomic_write_text
from ..engine.distributed import resolve_device
from .experiment import Experiment
from .pipeline import CACHEABLE, build_student
from .report import model_costs, plot_curves, write_report

__all__ = ["COMPARE_METHODS", "parse_methods", "parse_grid", "choose_on_validation", "run_comparison", "run_demo",
           "write_comparison"]


def _compare_names() -> Dict[str, str]:
    """A comparison's method names and labels: each registered method, or one entry per
    choice of the setting it names as its variants (``agkd-mse``, ..., from
    ``agkd.attention_loss``)."""
    names = {}
    for name, method in METHODS.items():
        if method.variants is None:
            names[name] = f"student, {method.label}"
            continue
        for choice in method.settings.rules()[method.variants].choices:
            names[f"{name}-{choice}"] = f"student, {method.label} ({choice})"
    return names


LABELS = _compare_names()
COMPARE_METHODS = tuple(LABELS)


def parse_methods(text: str, flag: str = "--methods") -> List[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in COMPARE_METHODS]
    if unknown or not methods:
        raise ConfigError(f"{flag}: unknown method {', '.join(unknown) or '(none given)'}; choose from "
                          f"{', '.join(COMPARE_METHODS)}")
    return list(dict.fromkeys(methods))


# Settings a grid may not take, and why.
_NOT_A_RECIPE = {"distill.method": "--methods chooses the methods", "train.seed": "--seeds chooses the seeds",
                 "distill.teacher_weights": "the teachers are combined once for the whole comparison",
                 "distill.teacher_average": "the teachers are combined once for the whole comparison",
                 **{f"{name}.{m.variants}": f"--methods {name}-<{m.variants}> chooses it"
                    for name, m in METHODS.items() if m.variants}}
_SHARED_BY_EVERY_RUN = ("data", "teacher")  # one teacher and one data split for the whole comparison

Grid = Dict[str, List[Any]]  # "section.key" -> the values to try, in order


def parse_grid(items: Sequence[str], cfg: Config) -> Grid:
    """``--grid section.key=value1,value2`` options as a grid: each key a declared setting
    a recipe may change, each value checked as the setting checks it (a ConfigError
    naming the key otherwise). A value is YAML, so lists are written ``[2, 3],[1, 3]``."""
    grid: Grid = {}
    for item in items:
        key, _, raw = item.partition("=")
        key = key.strip()
        section, _, name = key.partition(".")
        if not raw.strip():
            raise ConfigError(f"--grid {item!r}: expected section.key=value1,value2,...")
        if section not in SECTIONS or name not in SECTIONS[section].rules():
            raise ConfigError(f"--grid {key}: not a setting of the configuration (section.key, e.g. "
                              f"agkd.kd_weight or train.lr)")
        if key in _NOT_A_RECIPE:
            raise ConfigError(f"--grid {key}: {_NOT_A_RECIPE[key]}, not the grid")
        if section in _SHARED_BY_EVERY_RUN:
            raise ConfigError(f"--grid {key}: the data and the teacher are the whole comparison's; a grid varies "
                              f"the students' recipe")
        if SECTIONS[section].rules()[name].resume == "any":
            raise ConfigError(f"--grid {key}: not a recipe setting ({key} may not change a student's result)")
        if key in grid:
            raise ConfigError(f"--grid {key}: given twice")
        try:
            values = yaml.safe_load(f"[{raw}]")
        except yaml.YAMLError:
            raise ConfigError(f"--grid {item!r}: {raw!r} is not a comma-separated list of YAML values") from None
        checked = []
        for value in values:
            probe = copy.deepcopy(cfg.section(section))
            setattr(probe, name, value)  # the setting's own check: a ConfigError naming section.key
            checked.append(getattr(probe, name))
        if len({json.dumps(v) for v in checked}) != len(checked):
            raise ConfigError(f"--grid {key}: a value is repeated in {checked}")
        grid[key] = checked
    return grid


def grid_points(grid: Grid, method: str) -> List[Dict[str, Any]]:
    """The points of ``grid`` that concern ``method``: every combination of the values of
    its own section's keys and of the keys every method reads; ``[{}]`` when none do."""
    keys = [k for k in grid if k.split(".")[0] == method or k.split(".")[0] not in METHODS]
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def _point_folder(point: Dict[str, Any]) -> str:
    """A folder name for a grid point ("" for none: the runs of a comparison without a grid)."""
    text = ",".join(f"{key}={json.dumps(value, separators=(',', ':'))}" for key, value in point.items())
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)


def choose_on_validation(points: Sequence[Dict[str, Any]]) -> int:
    """The index of the grid point with the highest mean validation accuracy (the first of
    equals); test accuracy plays no part."""
    return max(range(len(points)), key=lambda i: (points[i]["val_acc_mean"], -i))


def _method_config(cfg: Config, name: str, seed: int, epochs: int):
    run_cfg = copy.deepcopy(cfg)
    run_cfg.train.seed, run_cfg.train.epochs = seed, epochs
    method, _, variant = name.partition("-")
    run_cfg.distill.method = method
    if variant:
        setattr(run_cfg.section(method), METHODS[method].variants, variant)
    return method, run_cfg


def _result_relevant(run_cfg: Config, method: str) -> Dict[str, Any]:
    """The run's configuration less the sections of the other methods (but those its loss
    is built from, ``Method.reads``), so that a new or changed setting of one method does
    not void the finished runs of others."""
    m = METHODS[method]
    kept = {method, *m.sections_read(run_cfg.section(method) if m.settings else None)}
    return {name: values for name, values in run_cfg.to_dict().items() if name in kept or name not in METHODS}


def _teacher_cache(experiment: Experiment, seed: int, folder: Path, epochs: int, log) -> Path:
    """A float32 cache of the teacher over ``epochs`` augmentation draws of ``seed`` in
    ``folder`` (float32, so that replaying it gives the same numbers as running the
    teacher), written unless one that serves is there."""
    cache = experiment.find_cache(folder, seed)
    if cache is None or cache.epochs < epochs or cache.manifest["dtype"] != "float32":
        log(f"caching the teacher over {epochs} epochs of seed {seed}'s augmentation")
        experiment.write_cache(folder, epochs=epochs, seed=seed, dtype="float32", overwrite=True)
    return folder


def _mean_std(values: Sequence[float]):
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def _seed_summary(by_seed: Dict[int, Dict[str, Any]], seeds: Sequence[int]) -> Dict[str, Any]:
    """Test accuracy (mean, std, per seed), mean validation accuracy and the review's
    metrics of one method at one grid point."""
    mean, std = _mean_std([by_seed[s]["test_acc"] for s in seeds])
    metrics = {key: _mean_std([by_seed[s]["compare"][key] for s in seeds])[0]
               for key in ("relative_error", "kl", "correlation", "distillation_factor")}
    epoch_seconds = [r["epoch_seconds"] for s in seeds for r in by_seed[s]["history"] if "epoch_seconds" in r]
    return {"test_acc_mean": mean, "test_acc_std": std, "test_acc": {str(s): by_seed[s]["test_acc"] for s in seeds},
            "val_acc_mean": _mean_std([by_seed[s]["val_acc"] for s in seeds])[0],
            **{f"{k}_mean": v for k, v in metrics.items()},
            "epoch_seconds_mean": _mean_std(epoch_seconds)[0] if epoch_seconds else None}


class _Run(NamedTuple):
    """One student run of a comparison, and its result from an earlier pass if any."""
    seed: int
    name: str
    index: int                      # of the grid point, in grid_points(...) order
    cfg: Config
    folder: Path
    identity: Dict[str, Any]
    earlier: Optional[Dict[str, Any]]


def run_comparison(experiment: Experiment, out: Path, *, methods: Sequence[str], seeds: Sequence[int],
                   student_epochs: int, grid: Optional[Grid] = None,
                   log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Trains a student per method, grid point and seed from ``experiment``'s teacher and
    returns the comparison (also written to ``out/comparison.{json,md,png}``); per run:
    test accuracy, final validation accuracy, the review's metrics against the teacher on
    the test set, and the history. With a grid, each method is reported at the point
    chosen on validation (:func:`choose_on_validation`)."""
    start = time.time()
    grid = grid or {}
    cfg, data = experiment.cfg, experiment.data()
    device = resolve_device(cfg.train.device)
    t_logits, targets = experiment.teacher_test_logits(device)
    teacher_acc = (t_logits.argmax(1) == targets).float().mean().item()
    points = {name: grid_points(grid, name.partition("-")[0]) for name in methods}
    for name in methods:  # before any work: several teachers serve only the methods that read their outputs
        experiment.check_serves(name.partition("-")[0])

    plan: List[_Run] = []
    for seed in seeds:
        for name in methods:
            for index, point in enumerate(points[name]):
                method, run_cfg = _method_config(cfg, name, seed, student_epochs)
                for key, value in point.items():
                    section, _, setting_name = key.partition(".")
                    setattr(run_cfg.section(section), setting_name, value)
                folder = out / name / _point_folder(point) / f"seed{seed}"
                identity = {"config": _result_relevant(run_cfg, method), "teacher": experiment.teacher_identity}
                plan.append(_Run(seed, name, index, run_cfg, folder, identity, _earlier_result(folder, identity)))
    cache_epochs = {seed: max(step.cfg.train.epochs for step in plan if step.seed == seed) for seed in seeds}
    _say_what_it_costs(experiment, plan, methods, points, seeds, cache_epochs, out, log)

    runs: Dict[str, Dict[int, Dict[int, Dict[str, Any]]]] = {m: {i: {} for i in range(len(points[m]))}
                                                            for m in methods}
    caches: Dict[int, Path] = {}
    for seed, name, index, run_cfg, folder, identity, earlier in plan:
        where = f"{LABELS[name]}{_point_label(points[name][index])}, seed {seed}"
        if earlier is not None:
            log(f"{where}: done before, test acc {earlier['test_acc']:.4f}")
            runs[name][index][seed] = earlier
            continue
        cached = _replays_cache(run_cfg)
        if cached and seed not in caches:
            epochs = cache_epochs[seed]  # the longest run of the seed: every budget replays the same draws
            caches[seed] = _teacher_cache(experiment, seed, out / "cache" / f"seed{seed}", epochs, log)
        log(where)
        run = experiment.distill(run_cfg, folder, teacher_cache=caches[seed] if cached else None)
        report = experiment.student_report(run_cfg, run, device, costs=False)
        result = {"identity": identity, "test_acc": report["test_acc"], "val_acc": run["history"][-1]["val_acc"],
                  "compare": report["compare"], "history": run["history"]}
        if "kept_test_acc" in report:  # DML's other peers
            result["kept_test_acc"] = report["kept_test_acc"]
        atomic_write_text(folder / "result.json", json.dumps(result, indent=1))  # never a truncated result
        log(f"  test acc {result['test_acc']:.4f}")
        runs[name][index][seed] = result

    summary = {"teacher": {"path": str(experiment.teacher_path), "test_acc": teacher_acc,
                           **({"paths": [str(p) for p in experiment.teacher_paths]} if experiment.multi_teacher else {})},
               "seeds": list(seeds),
               "student_epochs": student_epochs, "test_is_val": data.test_is_val,
               "test_samples": len(data.test), "device": str(device), "seconds": time.time() - start,
               "grid": grid, "methods": {}}
    chosen = {}
    for name in methods:
        tried = [{"point": point, **_seed_summary(runs[name][i], seeds)} for i, point in enumerate(points[name])]
        chosen[name] = choose_on_validation(tried)
        summary["methods"][name] = {"label": LABELS[name], **tried[chosen[name]]}
        if len(tried) > 1:
            summary["methods"][name]["grid"] = tried
    write_comparison(out, summary)
    summary["runs"] = {name: runs[name][chosen[name]] for name in methods}  # seed -> result, as chosen
    return summary


def _replays_cache(run_cfg: Config) -> bool:
    """Whether a run replays the seed's teacher cache (mixed images have no cached teacher)."""
    return run_cfg.distill.method in CACHEABLE and not (run_cfg.train.mixup > 0 or run_cfg.train.cutmix > 0)


def _earlier_result(folder: Path, identity: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The result a finished run with the same identity left in ``folder``, if any."""
    result_file = folder / "result.json"
    if not result_file.is_file():
        return None
    try:
        saved = json.loads(result_file.read_text())
    except (OSError, ValueError):  # truncated by a full disk or a crash: the run is trained again
        print(f"note: {result_file} is unreadable; that run is trained again", file=sys.stderr, flush=True)
        return None
    needed = ("identity", "test_acc", "val_acc", "compare", "history")
    if not isinstance(saved, dict) or not all(key in saved for key in needed):
        return None
    return saved if saved["identity"] == json.loads(json.dumps(identity)) else None


def _point_label(point: Dict[str, Any]) -> str:
    return f" [{', '.join(f'{k}={v}' for k, v in point.items())}]" if point else ""


def _say_what_it_costs(experiment: Experiment, plan, methods, points, seeds, cache_epochs: Dict[int, int], out: Path,
                       log) -> None:
    """One line before any work: how many student runs, how many done before, (from the
    finished runs' epoch times) about how long the rest will take, and how many teacher
    caches are still to be made."""
    todo = [step for step in plan if step.earlier is None]
    epochs = sum(step.cfg.train.epochs for step in todo)
    recipes = sum(len(points[name]) for name in methods)
    plural = lambda n, word: f"{n} {word}{'s' if n != 1 else ''}"  # noqa: E731
    what = (plural(len(methods), "method") if recipes == len(methods)
            else f"{plural(recipes, 'recipe')} of {plural(len(methods), 'method')} over the grid")
    line = (f"{len(plan)} student runs ({what} x {plural(len(seeds), 'seed')}); {len(plan) - len(todo)} done "
            f"before, {len(todo)} to train ({epochs} epochs)")
    seconds = [r["epoch_seconds"] for step in plan if step.earlier is not None for r in step.earlier["history"]
               if "epoch_seconds" in r]
    if todo and seconds:
        line += f", about {epochs * sum(seconds) / len(seconds) / 60:.0f} min at the finished runs' pace"
    to_cache = sorted({step.seed for step in todo if _replays_cache(step.cfg)
                       and _cached_epochs(experiment, out / "cache", step.seed) < cache_epochs[step.seed]})
    if to_cache:
        line += (f"; first the teacher is cached over {plural(cache_epochs[to_cache[0]], 'epoch')} of "
                 f"augmentation for {plural(len(to_cache), 'seed')} (one teacher pass per epoch and seed)")
    log(line)


def _cached_epochs(experiment: Experiment, caches: Path, seed: int) -> int:
    """How many epochs the cache of ``seed`` in ``caches`` holds (0 if none serves): opened
    and verified once, here, for the whole comparison."""
    cache = experiment.find_cache(caches / f"seed{seed}", seed)
    return cache.epochs if cache is not None and cache.manifest["dtype"] == "float32" else 0


def run_demo(experiment: Experiment, out: Path, *, attention_losses: Sequence[str], teacher_epochs: int,
             student_epochs: int, log: Callable[[str], None] = print) -> Path:
    """``agkd demo``: a teacher trained in ``out/teacher`` (or reused), then one seed of
    students without KD, with logit KD and with AGKD for each of ``attention_losses``;
    writes the comparison and ``report.md`` (Table I, the students against the teacher,
    every model's cost) and returns the report's path."""
    start = time.time()
    cfg = experiment.cfg
    methods = ["none", "logit"] + [f"agkd-{loss}" for loss in attention_losses]
    teacher = experiment.prepare_teacher(out / "teacher", teacher_epochs, log=log)
    summary = run_comparison(experiment, out, methods=methods, seeds=[cfg.train.seed],
                             student_epochs=student_epochs, log=log)
    device = resolve_device(cfg.train.device)
    size, seed = cfg.data.image_size, cfg.train.seed
    runs = {"teacher": {"history": teacher["history"], "costs": model_costs(experiment.teacher, size, device)}}
    student = build_student(cfg, experiment.data().num_classes).to(device)
    student_costs = model_costs(student, size, device)  # the same architecture for every student
    for name in methods:
        result = summary["runs"][name][seed]
        runs[LABELS[name]] = {"history": result["history"], "compare": result["compare"], "costs": student_costs}
    teacher_note = ("reused from an earlier run with the same configuration and data" if teacher["reused"]
                    else f"trained {teacher_epochs} epochs")
    notes = [f"Digits ({size} px): teacher {teacher_note}, test accuracy {summary['teacher']['test_acc']:.4f}; "
             f"students {student_epochs} epochs each, seed {seed}; total {time.time() - start:.0f} s on "
             f"{device}. Test accuracies are in comparison.md. One seed on a small data set: differences of a "
             f"point or two are noise; `agkd compare --seeds 3` gives mean ± std."]
    write_report(out / "report.md", "agkd demo: a teacher and its students on digits", runs, notes)
    plot_curves(out / "curves.png", {name: run["history"] for name, run in runs.items() if run["history"]})
    (out / "summary.json").write_text(json.dumps({
        "teacher": {"test_acc": summary["teacher"]["test_acc"], "reused": teacher["reused"]},
        "students": {LABELS[name]: summary["runs"][name][seed]["test_acc"] for name in methods},
        "test_samples": summary["test_samples"], "seconds": time.time() - start}, indent=1))
    return out / "report.md"


def write_comparison(out: Path, summary: Dict[str, Any], title: Optional[str] = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps(summary, indent=1))
    methods, seeds = summary["methods"], summary["seeds"]
    baseline = methods.get("none", {}).get("test_acc_mean")
    split = "validation set (the data set has no separate test set)" if summary["test_is_val"] else "test set"
    gridded_epochs = (summary.get("grid") or {}).get("train.epochs")
    epochs = " or ".join(map(str, gridded_epochs)) if gridded_epochs else summary["student_epochs"]
    lines = [f"# {title or 'Distillation methods compared'}", "",
             f"Test accuracy on the {split} ({summary['test_samples']} images): mean ± standard deviation over "
             f"{len(seeds)} training seed{'s' if len(seeds) > 1 else ''} ({', '.join(map(str, seeds))}); students "
             f"trained {epochs} epochs each. Teacher: test accuracy "
             f"{summary['teacher']['test_acc']:.4f}. Relative error E_s/E_t, KL(teacher ‖ student) and the "
             f"probability correlation are against the teacher on the same set, averaged over seeds.", "",
             "| method | test acc (mean ± std) | per seed | vs no KD | val acc | E_s/E_t | KL | correlation | s / epoch |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    grid = summary.get("grid") or {}
    if grid:
        lines[2] += (f" Grid: {'; '.join(f'{k} in {v}' for k, v in grid.items())}; each method at the point with "
                     f"the highest mean validation accuracy (its column here), the whole grid in comparison.json.")
        lines[-2] = lines[-2].replace("| method |", "| method | chosen on validation |")
        lines[-1] = lines[-1].replace("|---|", "|---|---|", 1)
    for name, m in methods.items():
        delta = "" if baseline is None or name == "none" else f"{m['test_acc_mean'] - baseline:+.4f}"
        per_seed = ", ".join(f"{m['test_acc'][str(s)]:.4f}" for s in seeds)
        chosen = (f" {', '.join(f'{k}={v}' for k, v in m.get('point', {}).items()) or '(no grid key)'} |"
                  if grid else "")
        lines.append(f"| {m['label']} |{chosen} {m['test_acc_mean']:.4f} ± {m['test_acc_std']:.4f} | {per_seed} | "
                     f"{delta} | {m['val_acc_mean']:.4f} | {m['relative_error_mean']:.3f} | {m['kl_mean']:.4f} | "
                     f"{m['correlation_mean']:.4f} | {_seconds(m.get('epoch_seconds_mean'))} |")
    lines += ["", f"{summary['seconds']:.0f} s on {summary['device']}. s / epoch: the mean training epoch of the "
              f"method's runs, from their histories (on a shared machine it varies with the load)."]
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    _plot(out / "comparison.png", summary)


def _seconds(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.1f}"


def _plot(path: Path, summary: Dict[str, Any]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = summary["methods"]
    names = list(methods)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(names) + 2), 4))
    for i, name in enumerate(names):
        m = methods[name]
        ax.errorbar([i], [m["test_acc_mean"]], yerr=[m["test_acc_std"]], fmt="o", capsize=4, color=f"C{i % 10}")
        ax.scatter([i] * len(m["test_acc"]), list(m["test_acc"].values()), s=12, color=f"C{i % 10}", alpha=0.4)
    ax.axhline(summary["teacher"]["test_acc"], color="black", linestyle="--", linewidth=1, label="teacher")
    if "none" in methods:
        ax.axhline(methods["none"]["test_acc_mean"], color="grey", linestyle=":", linewidth=1,
                   label="student, no KD (mean)")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy")
    ax.set_title(f"mean ± std over {len(summary['seeds'])} seed(s); dots: each seed", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
