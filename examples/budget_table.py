"""The student-budget table and plot from an `agkd compare --grid train.epochs=...` run.

    agkd compare --methods none,agkd-hybrid --seeds 3 --teacher runs/teacher/teacher.pt \\
        --grid train.epochs=6,20 --out runs/budget
    python examples/budget_table.py runs/budget docs/results/digits/budget

Per method and budget: test accuracy (mean ± std, per seed), mean validation accuracy, and
the gain of the mean over the no-KD student's at the same budget. Every grid point is
reported here; none is chosen.
"""
import json
import sys
from pathlib import Path


def budget_rows(summary):
    """{method: {epochs: grid entry}} from a comparison whose grid is train.epochs alone."""
    if list(summary["grid"]) != ["train.epochs"]:
        raise SystemExit(f"expected a grid of train.epochs alone, got {list(summary['grid'])}")
    rows = {}
    for name, method in summary["methods"].items():
        rows[name] = {entry["point"]["train.epochs"]: entry for entry in method["grid"]}
    return rows


def write(summary, rows, stem: Path):
    seeds = summary["seeds"]
    baseline = rows.get("none", {})
    lines = ["# Student budget on digits", "",
             f"Test accuracy on {summary['test_samples']} images, mean ± std over seeds "
             f"{', '.join(map(str, seeds))}; teacher at {summary['teacher']['test_acc']:.4f}. Gain: the method's mean "
             f"minus the no-KD student's mean at the same budget. Every budget is shown; none is chosen.", "",
             "| method | epochs | test acc (mean ± std) | per seed | gain over no KD | val acc |",
             "|---|---:|---:|---|---:|---:|"]
    for name, by_epochs in rows.items():
        for epochs, e in sorted(by_epochs.items()):
            gain = "" if name == "none" or epochs not in baseline else \
                f"{e['test_acc_mean'] - baseline[epochs]['test_acc_mean']:+.4f}"
            per_seed = ", ".join(f"{e['test_acc'][str(s)]:.4f}" for s in seeds)
            lines.append(f"| {summary['methods'][name]['label']} | {epochs} | {e['test_acc_mean']:.4f} ± "
                         f"{e['test_acc_std']:.4f} | {per_seed} | {gain} | {e['val_acc_mean']:.4f} |")
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    stem.with_suffix(".json").write_text(json.dumps({"teacher": summary["teacher"], "seeds": seeds,
                                                     "budgets": rows}, indent=1))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for i, (name, by_epochs) in enumerate(rows.items()):
        epochs = sorted(by_epochs)
        ax.errorbar(epochs, [by_epochs[e]["test_acc_mean"] for e in epochs],
                    yerr=[by_epochs[e]["test_acc_std"] for e in epochs], marker="o", capsize=4, color=f"C{i}",
                    label=summary["methods"][name]["label"])
    ax.axhline(summary["teacher"]["test_acc"], color="black", linestyle="--", linewidth=1, label="teacher")
    ax.set_xlabel("student epochs")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"mean ± std over {len(seeds)} seeds", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    run, stem = Path(sys.argv[1]), Path(sys.argv[2])
    summary = json.loads((run / "comparison.json").read_text())
    write(summary, budget_rows(summary), stem)
    print(stem.with_suffix(".md").read_text())
