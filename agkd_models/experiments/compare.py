"""Seeded comparisons of distillation methods: one teacher, students trained with each
method over several training seeds, and a table, a JSON file and a plot of the test
accuracies (mean ± standard deviation) with the review's metrics against the teacher.

``agkd compare`` and ``agkd demo`` both run :func:`run_comparison`. The teacher's work is
shared: a teacher already trained in the output folder from the same configuration and
data is reused, and the methods that read only the teacher's logits and attention maps
replay one float32 teacher cache per seed instead of running the teacher again.
A finished run is not repeated: each writes ``result.json`` beside its checkpoint, and a
comparison started again over the same folder picks those up.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from ..config import ConfigError
from ..data.cache import TeacherCache, TeacherCacheError, cache_identity
from ..distillers import METHODS
from ..engine.distributed import resolve_device
from .pipeline import (CACHEABLE, build_data, build_teacher, cache_teacher, distill, evaluate_model,
                       load_teacher_weights, reusable_teacher, student_report, train_teacher)

__all__ = ["COMPARE_METHODS", "parse_methods", "prepare_teacher", "run_comparison", "write_comparison"]

# A comparison's method names: a distiller, and for AGKD its attention loss.
COMPARE_METHODS = ("none", "logit", "agkd-mse", "agkd-cosine", "agkd-ssim", "agkd-hybrid", "agkd-perceptual",
                   "cakd")
LABELS = {"none": "student, no KD", "logit": "student, logit KD", "cakd": "student, CAKD",
          **{f"agkd-{loss}": f"student, AGKD ({loss})" for loss in ("mse", "cosine", "ssim", "hybrid", "perceptual")}}


def parse_methods(text: str, flag: str = "--methods") -> List[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in COMPARE_METHODS]
    if unknown or not methods:
        raise ConfigError(f"{flag}: unknown method {', '.join(unknown) or '(none given)'}; choose from "
                          f"{', '.join(COMPARE_METHODS)}")
    return list(dict.fromkeys(methods))


def _method_config(cfg: Dict[str, Any], name: str, seed: int, epochs: int):
    run_cfg = copy.deepcopy(cfg)
    run_cfg["train"]["seed"], run_cfg["train"]["epochs"] = seed, epochs
    method, _, loss = name.partition("-")
    run_cfg["distill"]["method"] = method
    if loss:
        run_cfg["distill"]["attention_loss"] = loss
    return method, run_cfg


def _result_relevant(run_cfg: Dict[str, Any], method: str) -> Dict[str, Any]:
    """The run's configuration less the ``distill`` settings its method does not read, so
    that a new or changed setting of one method does not void the finished runs of others."""
    read = set(METHODS[method].settings.values()) | {"method"}
    return {**run_cfg, "distill": {k: v for k, v in run_cfg["distill"].items() if k in read}}


def prepare_teacher(cfg: Dict[str, Any], folder: Path, epochs: int, log: Callable[[str], None] = print) -> Dict:
    """The teacher in ``folder``, trained for ``epochs`` unless one trained from the same
    configuration and data is already there."""
    teacher_cfg = copy.deepcopy(cfg)
    teacher_cfg["train"]["epochs"] = epochs
    data = build_data(teacher_cfg)
    reuse, why = reusable_teacher(folder, teacher_cfg, data)
    if reuse:
        log(f"reusing the teacher trained in {folder} (same configuration and data fingerprint)")
        history = _read_history(folder)
    else:
        log(f"training the hybrid teacher ({cfg['teacher']['cnn']} + {cfg['teacher']['vit']}), {epochs} epochs "
            f"({why})")
        history = train_teacher(teacher_cfg, folder)["history"]
    return {"path": folder / "teacher.pt", "history": history, "reused": reuse}


def _read_history(folder: Path) -> List[Dict[str, float]]:
    path = folder / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _teacher_cache(cfg: Dict[str, Any], teacher, teacher_path: Path, folder: Path, epochs: int, log) -> str:
    """A float32 cache of ``teacher`` over the seed's ``epochs`` augmentation draws (float32,
    so that replaying it gives the same numbers as running the teacher)."""
    data = build_data(cfg)  # this seed's augmentation
    if folder.is_dir():
        try:
            cache = TeacherCache.open(folder, expect=cache_identity(data.train, teacher, cfg["teacher"]))
            if cache.epochs >= epochs and cache.manifest["dtype"] == "float32":
                return str(folder)
        except TeacherCacheError:
            pass
    log(f"caching the teacher over {epochs} epochs of seed {cfg['train']['seed']}'s augmentation")
    cache_teacher(cfg, str(teacher_path), folder, epochs=epochs, dtype="float32", overwrite=True, teacher=teacher,
                  data=data)
    return str(folder)


def _mean_std(values: Sequence[float]):
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def run_comparison(cfg: Dict[str, Any], out: Path, *, methods: Sequence[str], seeds: Sequence[int],
                   teacher_path: Path, student_epochs: int, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Trains a student per method and seed and returns the comparison (also written to
    ``out/comparison.{json,md,png}``); per run: test accuracy, final validation accuracy,
    the review's metrics against the teacher on the test set, and the history."""
    start = time.time()
    device = resolve_device(cfg["train"]["device"])
    data = build_data(cfg)
    teacher = build_teacher(cfg, data.num_classes)
    load_teacher_weights(teacher, str(teacher_path), cfg, data.num_classes)
    t_logits, targets = evaluate_model(teacher, data.test, cfg, device)
    teacher_acc = (t_logits.argmax(1) == targets).float().mean().item()
    runs: Dict[str, Dict[int, Dict[str, Any]]] = {m: {} for m in methods}
    for seed in seeds:
        cache = None
        for name in methods:
            method, run_cfg = _method_config(cfg, name, seed, student_epochs)
            folder = out / name / f"seed{seed}"
            result_file = folder / "result.json"
            identity = {"config": _result_relevant(run_cfg, method), "teacher": fingerprint_file(teacher_path)}
            if result_file.is_file():
                saved = json.loads(result_file.read_text())
                if saved.get("identity") == json.loads(json.dumps(identity)):
                    log(f"{LABELS[name]}, seed {seed}: done before, test acc {saved['test_acc']:.4f}")
                    runs[name][seed] = saved
                    continue
            if method in CACHEABLE and cache is None:
                cache = _teacher_cache(run_cfg, teacher, teacher_path, out / "cache" / f"seed{seed}", student_epochs,
                                       log)
            log(f"{LABELS[name]}, seed {seed}")
            run = distill(run_cfg, str(teacher_path), method, folder,
                          teacher_cache=cache if method in CACHEABLE else None)
            report = student_report(run_cfg, run, device, costs=False)
            result = {"identity": identity, "test_acc": report["test_acc"],
                      "val_acc": run["history"][-1]["val_acc"], "compare": report["compare"],
                      "history": run["history"]}
            result_file.write_text(json.dumps(result, indent=1))
            log(f"  test acc {result['test_acc']:.4f}")
            runs[name][seed] = result
    summary = {"teacher": {"path": str(teacher_path), "test_acc": teacher_acc}, "seeds": list(seeds),
               "student_epochs": student_epochs, "test_is_val": data.test_is_val,
               "test_samples": len(data.test), "device": str(device), "seconds": time.time() - start,
               "methods": {}}
    for name, by_seed in runs.items():
        accs = [by_seed[s]["test_acc"] for s in seeds]
        mean, std = _mean_std(accs)
        metrics = {key: _mean_std([by_seed[s]["compare"][key] for s in seeds])[0]
                   for key in ("relative_error", "kl", "correlation", "distillation_factor")}
        summary["methods"][name] = {"label": LABELS[name], "test_acc_mean": mean, "test_acc_std": std,
                                    "test_acc": {str(s): by_seed[s]["test_acc"] for s in seeds},
                                    "val_acc_mean": _mean_std([by_seed[s]["val_acc"] for s in seeds])[0],
                                    **{f"{k}_mean": v for k, v in metrics.items()}}
    write_comparison(out, summary)
    summary["runs"] = runs
    return summary


def fingerprint_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_comparison(out: Path, summary: Dict[str, Any], title: Optional[str] = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps(summary, indent=1))
    methods, seeds = summary["methods"], summary["seeds"]
    baseline = methods.get("none", {}).get("test_acc_mean")
    split = "validation set (the data set has no separate test set)" if summary["test_is_val"] else "test set"
    lines = [f"# {title or 'Distillation methods compared'}", "",
             f"Test accuracy on the {split} ({summary['test_samples']} images): mean ± standard deviation over "
             f"{len(seeds)} training seed{'s' if len(seeds) > 1 else ''} ({', '.join(map(str, seeds))}); students "
             f"trained {summary['student_epochs']} epochs each. Teacher: test accuracy "
             f"{summary['teacher']['test_acc']:.4f}. Relative error E_s/E_t, KL(teacher ‖ student) and the "
             f"probability correlation are against the teacher on the same set, averaged over seeds.", "",
             "| method | test acc (mean ± std) | per seed | vs no KD | val acc | E_s/E_t | KL | correlation |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for name, m in methods.items():
        delta = "" if baseline is None or name == "none" else f"{m['test_acc_mean'] - baseline:+.4f}"
        per_seed = ", ".join(f"{m['test_acc'][str(s)]:.4f}" for s in seeds)
        lines.append(f"| {m['label']} | {m['test_acc_mean']:.4f} ± {m['test_acc_std']:.4f} | {per_seed} | {delta} | "
                     f"{m['val_acc_mean']:.4f} | {m['relative_error_mean']:.3f} | {m['kl_mean']:.4f} | "
                     f"{m['correlation_mean']:.4f} |")
    lines += ["", f"{summary['seconds']:.0f} s on {summary['device']}."]
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    _plot(out / "comparison.png", summary)


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
