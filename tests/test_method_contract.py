"""What a method may rely on, and what it must not need: its settings checks run through
its registry entry, the task gets the trainer's label smoothing when it is built, and
one rule per setting says whether it changes a run's result (resume and the teacher's
identity alike). No module outside the distillers names a method's settings."""
import re
from pathlib import Path

import torch

from agkd_models.config import SECTIONS, ConfigError, load_config
from agkd_models.distillers import METHODS, Method, ModelFacts
from agkd_models.experiments.pipeline import Data, check_model_settings, run_record, teacher_recipe

ROOT = Path(__file__).resolve().parent.parent


class _InMemory(torch.utils.data.Dataset):
    """A set with .data and .targets, as fingerprint() reads torchvision's."""

    def __init__(self, n):
        self.data, self.targets = torch.arange(n * 4, dtype=torch.uint8).reshape(n, 4).numpy(), list(range(n))

    def __len__(self):
        return len(self.targets)


def test_a_methods_own_check_runs_before_any_work(monkeypatch):
    seen = []

    def check(settings, facts):
        seen.append(facts)
        raise ConfigError("probe.setting: refused by the method itself")

    monkeypatch.setitem(METHODS, "probe", Method(METHODS["none"].build, None, cacheable=False, label="probe",
                                                 check=check))
    try:
        check_model_settings(load_config("digits"))
    except ConfigError as exc:
        assert "refused by the method itself" in str(exc)
    else:
        raise AssertionError("the method's check did not run")
    assert seen == [ModelFacts(student="efficientnet_b0", student_stages=7)]


def test_teacher_recipe_follows_each_settings_resume_rule():
    cfg = load_config("digits")
    data = Data(_InMemory(6), _InMemory(3), _InMemory(3), 10, False)
    identity = teacher_recipe(cfg, run_record(cfg, data))
    for section in ("data", "train", "teacher"):
        for key, rule in SECTIONS[section].rules().items():
            assert (key in identity[section]) == (rule.resume != "any"), (section, key, rule.resume)


def test_no_module_outside_the_distillers_names_a_methods_settings():
    methods = "|".join(name for name, m in METHODS.items() if m.settings is not None)
    pattern = re.compile(rf"\b(?:cfg|config|run_cfg)\.(?:{methods})\b|[\"'](?:{methods})\.[a-z_]+[\"']")
    offenders = []
    for path in (ROOT / "agkd_models").rglob("*.py"):
        if "distillers" in path.parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_each_default_is_the_one_of_the_code_it_configures():
    """A setting that configures a model or a loss has that code's default: two places that
    disagree fail here (the settings read them with ``default_of``)."""
    import inspect

    import agkd_ops
    from agkd_models.models.student import Student
    from agkd_models.models.teacher import HybridTeacher

    def defaults(function):
        return {k: p.default for k, p in inspect.signature(function).parameters.items()
                if p.default is not inspect.Parameter.empty}

    same_as = {"teacher": (HybridTeacher,), "student": (Student,), "logit": (agkd_ops.kd_loss,),
               "agkd": (agkd_ops.kd_loss, agkd_ops.hybrid_loss)}
    checked = 0
    for section, functions in same_as.items():
        ours = SECTIONS[section]().to_dict()
        for function in functions:
            for key, theirs in defaults(function).items():
                if key in ours and key not in ("window_size", "padding"):  # AGKD's own window, on purpose
                    want = {} if theirs is None and isinstance(ours[key], dict) else theirs  # None: no kwargs
                    want = list(want) if isinstance(want, tuple) else want
                    assert ours[key] == want, (section, key, ours[key], theirs)
                    checked += 1
    assert SECTIONS["agkd"]().sigma == inspect.signature(agkd_ops.ssim).parameters["sigma"].default
    assert checked >= 12
