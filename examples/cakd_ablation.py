"""The CAKD ablation on digits: which of CAKD's settings kept it from training.

One ``agkd compare --methods cakd`` per variant, all with the same teacher and seeds; the
variants change one factor at a time from the settings CAKD had before (``before``), then
all together (the defaults now). A no-KD row gives the bar to clear. The table goes to
``OUT/cakd_ablation.{md,json}``: test accuracy (mean ± std and per seed) and the loss terms'
magnitudes in the first and last epoch.

    python examples/cakd_ablation.py --teacher RUN/teacher/teacher.pt --out RUN/ablation [--jobs 2]

A finished variant is not run again (``agkd compare`` keeps each run's result).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Optional, Tuple

# What CAKD did before the ablation, in today's settings.
BEFORE = {"cakd.view_terms": "all", "cakd.ce_only_epochs": 0, "cakd.ramp_epochs": 0,
          "cakd.distill_weight": 1.0, "cakd.projected_stage": 3, "cakd.pca_attention": "probabilities",
          "cakd.pca_attention_weight": 1.0, "cakd.pca_value_weight": 1.0,
          "cakd.replace_elementwise": False, "cakd.discriminator_every": 5}

# name -> (what changes from BEFORE, student epochs or None for the preset's)
VARIANTS: Dict[str, Tuple[Dict[str, object], Optional[int]]] = {
    "before": ({}, None),
    "views for L_MVG only": ({"cakd.view_terms": "adversarial"}, None),
    "CE first, then ramp to 0.2": ({"cakd.ce_only_epochs": 1, "cakd.ramp_epochs": 2,
                                    "cakd.distill_weight": 0.2}, None),
    "stage matching the teacher grid": ({"cakd.projected_stage": None}, None),
    "PCA on logits (0.2, 0.05), element-wise": ({"cakd.pca_attention": "logits", "cakd.pca_attention_weight": 0.2,
                                                 "cakd.pca_value_weight": 0.05,
                                                 "cakd.replace_elementwise": True}, None),
    "discriminator every step": ({"cakd.discriminator_every": 1}, None),
    "all (the defaults now)": (None, None),  # None: the preset's settings, nothing from BEFORE
}
ALL = "all (the defaults now)"  # run beside the no-KD student, in one comparison


def _settings(changes: Optional[Dict[str, object]]) -> Dict[str, object]:
    return {} if changes is None else {**BEFORE, **changes}


def _yaml(value: object) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def run_variant(name: str, folder: Path, teacher: Path, seeds: int, methods: str, threads: int,
                settings: Dict[str, object], epochs: Optional[int]) -> None:
    command = [sys.executable, "-m", "agkd_models.cli", "compare", "--methods", methods, "--seeds", str(seeds),
               "--teacher", str(teacher), "--out", str(folder), "--set", "train.progress=false"]
    for key, value in settings.items():
        command += ["--set", f"{key}={_yaml(value)}"]
    if epochs:
        command += ["--student-epochs", str(epochs)]
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.time()
    with open(folder / "log.txt", "a") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    print(f"{name}: {time.time() - start:.0f} s", flush=True)


def _terms(record: Dict[str, float]) -> Dict[str, float]:
    return {k[len("train_"):]: v for k, v in record.items()
            if k.startswith("train_") and k not in ("train_acc", "train_loss")}


def summarise(folders: Dict[str, Path]) -> Dict[str, object]:
    rows = {}
    for name in ["no KD"] + list(folders):
        folder = folders[ALL if name == "no KD" else name]
        summary = json.loads((folder / "comparison.json").read_text())
        method = "none" if name == "no KD" else "cakd"
        result = summary["methods"][method]
        seeds = summary["seeds"]
        histories = [json.loads((folder / method / f"seed{s}" / "result.json").read_text())["history"]
                     for s in seeds]
        first = [_terms(h[0]) for h in histories]
        last = [_terms(h[-1]) for h in histories]
        keys = list(dict.fromkeys([k for r in first + last for k in r]))
        mean = lambda records, key: (sum(r[key] for r in records) / len(records)  # noqa: E731
                                     if all(key in r for r in records) else None)
        rows[name] = {"test_acc_mean": result["test_acc_mean"], "test_acc_std": result["test_acc_std"],
                      "test_acc": result["test_acc"], "epochs": summary["student_epochs"],
                      "settings": _settings(VARIANTS[name][0]) if name in VARIANTS else {},
                      "terms_first_epoch": {k: mean(first, k) for k in keys},
                      "terms_last_epoch": {k: mean(last, k) for k in keys},
                      "teacher_test_acc": summary["teacher"]["test_acc"], "seconds": summary["seconds"]}
    return rows


def write_table(out: Path, rows: Dict[str, Dict[str, object]]) -> None:
    (out / "cakd_ablation.json").write_text(json.dumps(rows, indent=1))
    teacher = next(iter(rows.values()))["teacher_test_acc"]
    lines = ["# CAKD ablation on digits", "",
             f"Test accuracy over {len(next(iter(rows.values()))['test_acc'])} seeds, one teacher (test accuracy "
             f"{teacher:.4f}). Each row changes one factor from `before` (CAKD's settings before this ablation), "
             "except the last, which is every change together (the defaults now). Loss terms: the training "
             "mean of each term in the first → last epoch, averaged over seeds (unweighted; `total` is the "
             "weighted sum; – where a term was off in that epoch).", "",
             "`before` can be a comparison run with the code before the rework (`--before`, as for the "
             "committed table); the other rows run the reworked code, whose multi-view samples are made in "
             "pixel space (black fills; the old ones were the data set's mean grey), so each of them has that "
             "change too.", "",
             "| variant | epochs | test acc (mean ± std) | per seed | terms, first → last epoch |",
             "|---|---:|---:|---|---|"]
    for name, row in rows.items():
        show = lambda v: "–" if v is None else f"{v:.3g}"  # noqa: E731 (–: the term was off that epoch)
        terms = ", ".join(f"{k} {show(row['terms_first_epoch'][k])} → {show(row['terms_last_epoch'][k])}"
                          for k in row["terms_first_epoch"])
        per_seed = ", ".join(f"{v:.4f}" for v in row["test_acc"].values())
        lines.append(f"| {name} | {row['epochs']} | {row['test_acc_mean']:.4f} ± {row['test_acc_std']:.4f} | "
                     f"{per_seed} | {terms} |")
    lines += ["", "Settings of `before`: " + ", ".join(f"`{k}={_yaml(v)}`" for k, v in BEFORE.items()) + "."]
    (out / "cakd_ablation.md").write_text("\n".join(lines) + "\n")


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=1, help="variants run side by side (threads split between them)")
    parser.add_argument("--before", type=Path, help="a finished `agkd compare --methods none,cakd` with the code "
                        "before the ablation, to stand for the `before` row instead of running it")
    parser.add_argument("--only", default="", help="comma-separated slugs of variants to run (default: all); "
                        "the table is written when every variant is done")
    parser.add_argument("--threads", type=int, help="torch threads per variant (default: CPUs / jobs)")
    args = parser.parse_args(argv)
    folders = {name: args.out / _slug(name) for name in VARIANTS}
    if args.before:
        folders["before"] = args.before
    by_slug = {_slug(n): n for n in VARIANTS}
    todo = [by_slug[slug] for slug in args.only.split(",")] if args.only else list(VARIANTS)
    todo = [n for n in todo if not (n == "before" and args.before)]
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_variant, n, folders[n], args.teacher, args.seeds,
                               "none,cakd" if n == ALL else "cakd", threads, _settings(VARIANTS[n][0]),
                               VARIANTS[n][1]) for n in todo]
        for f in futures:
            f.result()
    if not all((folder / "comparison.json").is_file() for folder in folders.values()):
        return 0
    write_table(args.out, summarise(folders))
    print((args.out / "cakd_ablation.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
