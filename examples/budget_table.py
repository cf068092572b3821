"""The student-budget study's table and plot, from `agkd compare` runs whose grid includes
``train.epochs``; one run per teacher, drawn as one panel each.

    agkd compare --methods none,logit,agkd-hybrid --seeds 5 --teacher runs/teacher/teacher.pt \\
        --grid train.epochs=6,20 --out runs/budget
    agkd compare --methods logit,agkd-hybrid --seeds 3 --teacher runs/weak/teacher.pt \\
        --grid train.epochs=6,20 --grid logit.kd_weight=0.5,0.9 --grid agkd.kd_weight=0.5,0.9 \\
        --out runs/budget_weak
    python examples/budget_table.py docs/results/digits/budget runs/budget runs/budget_weak

Per teacher, method and budget, every grid point is listed: test accuracy (mean ± std, per
seed), mean validation accuracy, and the gain over the no-KD student at the same budget and
seeds (mean of the per-seed differences ± their std: both students of a seed start from the
same weights and see the same batches). Where the other grid keys give a method several
recipes at one budget, the one with the best mean validation accuracy is marked (a ring in
the plot, which draws one line per recipe). Test accuracy chooses nothing.

A run without no-KD students takes them from the first run that has them at the same
budget and seeds: the no-KD student never reads the teacher, so its runs are the same under
any teacher (its identity still names the teacher, so `agkd compare` would train it again).
"""
import json
import statistics
import sys
from pathlib import Path

import yaml

from agkd_models.experiments.compare import choose_on_validation


def read_run(folder: Path):
    """(summary, {method: {epochs: [grid entries]}}, the preset's value of each grid key)."""
    summary = json.loads((folder / "comparison.json").read_text())
    if "train.epochs" not in summary["grid"]:
        raise SystemExit(f"{folder}: expected a comparison with --grid train.epochs=..., got {list(summary['grid'])}")
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    preset = {key: saved[key.split(".")[0]][key.split(".")[1]] for key in summary["grid"]}
    budgets = {}
    for name, method in summary["methods"].items():
        for entry in method.get("grid", [method]):
            budgets.setdefault(name, {}).setdefault(entry["point"]["train.epochs"], []).append(entry)
    return summary, budgets, preset


def _gain(entry, baseline, seeds):
    differences = [entry["test_acc"][str(s)] - baseline["test_acc"][str(s)] for s in seeds]
    return statistics.mean(differences), statistics.stdev(differences) if len(differences) > 1 else 0.0


def _recipe(point):
    return ", ".join(f"{k}={v}" for k, v in point.items() if k != "train.epochs")


def study(folders):
    """One panel per run: {folder, teacher_acc, seeds, test_samples, rows}, a row per grid point."""
    runs = [read_run(folder) for folder in folders]
    panels = []
    for folder, (summary, budgets, preset) in zip(folders, runs):
        seeds = summary["seeds"]
        no_kd, borrowed = budgets.get("none"), None
        if no_kd is None:
            for other_folder, (other, other_budgets, _) in zip(folders, runs):
                if "none" in other_budgets and set(seeds) <= set(other["seeds"]):
                    no_kd, borrowed = other_budgets["none"], other_folder
                    break
        rows = []
        for name, by_epochs in budgets.items():
            label = summary["methods"][name]["label"]
            for epochs, entries in sorted(by_epochs.items()):
                chosen = choose_on_validation(entries)
                for i, entry in enumerate(entries):
                    is_preset = all(entry["point"][k] == preset[k] for k in entry["point"] if k != "train.epochs")
                    gain = None
                    if name != "none" and no_kd and epochs in no_kd:
                        gain = _gain(entry, no_kd[epochs][0], seeds)
                    rows.append({"method": name, "label": label, "epochs": epochs, "recipe": _recipe(entry["point"]),
                                 "chosen": i == chosen and len(entries) > 1, "preset": is_preset, "gain": gain,
                                 "entry": entry})
        if borrowed is not None:
            for epochs, entries in sorted(no_kd.items()):
                rows.insert(0, {"method": "none", "label": f"student, no KD (from {borrowed.name})", "epochs": epochs,
                                "recipe": "", "chosen": False, "preset": True, "gain": None, "entry": entries[0]})
        panels.append({"folder": folder.name, "teacher_acc": summary["teacher"]["test_acc"], "seeds": seeds,
                       "test_samples": summary["test_samples"], "rows": rows})
    return panels


def write(panels, stem: Path):
    lines = ["# Student budget and teacher strength on digits", "",
             "Test accuracy, mean ± std over the seeds. Gain: the mean of the per-seed differences from the "
             "no-KD student at the same budget, ± their std. Where a method has several recipes at one budget, "
             "**chosen** marks the one with the best mean validation accuracy; test accuracy chooses nothing."]
    for panel in panels:
        lines += ["", f"## Teacher at {panel['teacher_acc']:.4f} test accuracy ({panel['folder']}; seeds "
                      f"{', '.join(map(str, panel['seeds']))}; {panel['test_samples']} test images)", "",
                  "| method | epochs | recipe | test acc | per seed | gain over no KD | val acc |",
                  "|---|---:|---|---:|---|---:|---:|"]
        for row in sorted(panel["rows"], key=lambda r: (r["method"] != "none", r["method"], r["epochs"])):
            e = row["entry"]
            per_seed = ", ".join(f"{e['test_acc'][str(s)]:.3f}" for s in panel["seeds"])
            gain = "" if row["gain"] is None else f"{row['gain'][0]:+.4f} ± {row['gain'][1]:.4f}"
            recipe = (row["recipe"] + " (preset)" if row["preset"] else row["recipe"]) if row["recipe"] else "preset"
            recipe += " **chosen**" if row["chosen"] else ""
            lines.append(f"| {row['label']} | {row['epochs']} | {recipe} | {e['test_acc_mean']:.4f} ± "
                         f"{e['test_acc_std']:.4f} | {per_seed} | {gain} | {e['val_acc_mean']:.4f} |")
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    stem.with_suffix(".json").write_text(json.dumps(panels, indent=1))
    _plot(panels, stem.with_suffix(".png"))


def _plot(panels, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), sharey=True, squeeze=False)
    for ax, panel in zip(axes[0], panels):
        methods = list(dict.fromkeys(r["method"] for r in panel["rows"] if r["gain"] is not None))
        for i, name in enumerate(methods):
            rows = [r for r in panel["rows"] if r["method"] == name]
            label = rows[0]["label"].replace("student, ", "")
            for style, recipe in zip(("-", "--", ":", "-."), dict.fromkeys(r["recipe"] for r in rows)):
                line = sorted((r for r in rows if r["recipe"] == recipe), key=lambda r: r["epochs"])
                ax.errorbar([r["epochs"] for r in line], [r["gain"][0] for r in line],
                            yerr=[r["gain"][1] for r in line], marker="o", capsize=4, color=f"C{i}",
                            linestyle=style, label=f"{label}, {recipe}" if recipe else label)
                chosen = [r for r in line if r["chosen"]]
                ax.scatter([r["epochs"] for r in chosen], [r["gain"][0] for r in chosen], s=120,
                           facecolors="none", edgecolors="black", zorder=3,
                           label="chosen on validation" if chosen and not ax.get_legend_handles_labels()[1].count(
                               "chosen on validation") else None)
        ax.axhline(0, color="black", linewidth=1)
        ax.set_title(f"teacher {panel['teacher_acc']:.3f}, {len(panel['seeds'])} seeds", fontsize=9)
        ax.set_xlabel("student epochs")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("test accuracy gain over no KD")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit("usage: budget_table.py OUT_STEM COMPARISON_FOLDER [COMPARISON_FOLDER ...]")
    stem, folders = Path(sys.argv[1]), [Path(a) for a in sys.argv[2:]]
    write(study(folders), stem)
    print(stem.with_suffix(".md").read_text())
