"""examples/budget_table.py: the budget study's numbers come from the runs as stated (gain
per seed, recipe chosen on validation per budget, no-KD students shared across teachers)."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import yaml

pytest.importorskip("matplotlib")

_spec = importlib.util.spec_from_file_location("budget_table", Path(__file__).parents[1] / "examples" / "budget_table.py")
budget_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(budget_table)


def _entry(point, test, val):
    mean = sum(test) / len(test)
    return {"point": point, "test_acc": {str(s): a for s, a in enumerate(test)}, "test_acc_mean": mean,
            "test_acc_std": 0.0, "val_acc_mean": val}


def _write_run(folder: Path, teacher_acc, methods, kd_weight=0.9):
    grid = {"train.epochs": sorted({e["point"]["train.epochs"] for m in methods.values() for e in m["grid"]})}
    extra = {k for m in methods.values() for e in m["grid"] for k in e["point"] if k != "train.epochs"}
    for key in sorted(extra):
        grid[key] = sorted({e["point"][key] for m in methods.values() for e in m["grid"] if key in e["point"]})
    summary = {"teacher": {"test_acc": teacher_acc}, "seeds": [0, 1, 2], "test_samples": 360, "grid": grid,
               "methods": {name: {"label": f"student, {name}", **m["grid"][0], "grid": m["grid"]}
                           for name, m in methods.items()}}
    folder.mkdir(parents=True)
    (folder / "comparison.json").write_text(json.dumps(summary))
    (folder / "config.yaml").write_text(yaml.safe_dump({"train": {"epochs": 6}, "logit": {"kd_weight": kd_weight}}))


def test_gain_is_per_seed_and_the_recipe_is_chosen_on_validation_at_each_budget(tmp_path):
    strong = tmp_path / "strong"
    _write_run(strong, 0.99, {
        "none": {"grid": [_entry({"train.epochs": 6}, [0.80, 0.90, 0.70], 0.8),
                          _entry({"train.epochs": 20}, [0.95, 0.96, 0.97], 0.9)]},
        "logit": {"grid": [_entry({"train.epochs": 6}, [0.85, 0.92, 0.80], 0.9),
                           _entry({"train.epochs": 20}, [0.96, 0.96, 0.98], 0.95)]}})
    weak = tmp_path / "weak"
    # At 6 epochs kd_weight 0.5 has the better validation accuracy but the worse test accuracy.
    _write_run(weak, 0.91, {"logit": {"grid": [
        _entry({"train.epochs": 6, "logit.kd_weight": 0.5}, [0.70, 0.70, 0.70], 0.95),
        _entry({"train.epochs": 6, "logit.kd_weight": 0.9}, [0.90, 0.90, 0.90], 0.90),
        _entry({"train.epochs": 20, "logit.kd_weight": 0.5}, [0.90, 0.90, 0.90], 0.90),
        _entry({"train.epochs": 20, "logit.kd_weight": 0.9}, [0.99, 0.99, 0.99], 0.91)]}})

    panels = budget_table.study([strong, weak])
    rows = {(r["method"], r["epochs"], r["recipe"]): r for r in panels[0]["rows"]}
    mean, std = rows[("logit", 6, "")]["gain"]
    differences = [0.05, 0.02, 0.10]  # logit minus no KD, seed by seed
    expected_mean = sum(differences) / 3
    assert mean == pytest.approx(expected_mean)
    assert std == pytest.approx(math.sqrt(sum((d - expected_mean) ** 2 for d in differences) / 2))
    assert rows[("none", 6, "")]["gain"] is None

    weak_rows = {(r["method"], r["epochs"], r["recipe"]): r for r in panels[1]["rows"]}
    assert weak_rows[("logit", 6, "logit.kd_weight=0.5")]["chosen"]
    assert not weak_rows[("logit", 6, "logit.kd_weight=0.9")]["chosen"]
    assert weak_rows[("logit", 20, "logit.kd_weight=0.9")]["chosen"]
    assert weak_rows[("logit", 6, "logit.kd_weight=0.9")]["preset"]
    # The weak teacher's run has no no-KD students: they come from the strong run, seed for seed.
    assert weak_rows[("logit", 6, "logit.kd_weight=0.5")]["gain"][0] == pytest.approx(0.70 - 0.80)
    assert any(r["method"] == "none" and "from strong" in r["label"] for r in panels[1]["rows"])

    budget_table.write(panels, tmp_path / "out" / "budget")
    text = (tmp_path / "out" / "budget.md").read_text()
    assert "| student, logit | 6 | logit.kd_weight=0.5 **chosen** |" in text
    assert (tmp_path / "out" / "budget.png").stat().st_size > 0


def test_a_run_without_a_budget_grid_is_refused(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "comparison.json").write_text(json.dumps({"grid": {"logit.kd_weight": [0.5, 0.9]}}))
    with pytest.raises(SystemExit, match="train.epochs"):
        budget_table.read_run(folder)
