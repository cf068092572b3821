"""Run configuration: YAML presets shipped in agkd_models/configs, a file of your own, and
``section.key=value`` overrides; the resolved configuration is saved with every run.

A configuration is a :class:`Config`: one typed section object per part of a run — the
data, the teacher, the student, ``distill.method``, each distillation method's own
settings (the sections ``logit``, ``agkd``, ``cakd``, declared in the method's file) and
the training. Every setting is declared once, as a field of its section's class (see
:mod:`agkd_models.settings`): its default, what it means and what values it takes. Every
value is checked when it is set, so a bad one is one clear :class:`ConfigError` naming the
key, the value given and what is allowed, never a traceback from deep inside training.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Type

import yaml

from .data.datasets import DATASETS
from .distillers import METHODS as _METHOD_REGISTRY
from .engine.amp import AMP_MODES
from .engine.train_config import TrainConfig
from .models.student import Student
from .models.teacher import HybridTeacher
from .models.multi_teacher import TEACHER_AVERAGES
from .settings import ConfigError, Rule, Settings, default_of, setting

__all__ = ["PRESETS", "SECTIONS", "METHODS", "AMP_MODES", "Config", "DataConfig", "TeacherConfig", "StudentConfig",
           "DistillConfig", "TrainConfig", "load_config", "apply_overrides", "validate_config", "default_config",
           "save_config", "read_saved_config", "resume_conflicts", "ConfigError", "Rule"]

CONFIG_DIR = Path(__file__).parent / "configs"
# A file whose name starts with "_" is a base other presets build on, not a preset itself.
PRESETS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if not p.stem.startswith("_"))
METHODS = tuple(_METHOD_REGISTRY)  # the distillers' registry (agkd_models.distillers)


# --------------------------------------------------------------------------- sections


@dataclass
class DataConfig(Settings, section="data"):
    name: str = setting("digits", "data set", choices=DATASETS)
    root: Optional[str] = setting(None, "data folder (folder, cifar*, tinyimagenet)", resume="any")
    image_size: int = setting(224, "input size in pixels", minimum=8)
    val_fraction: float = setting(0.2, "share held out for validation (of the whole set when it has one split, "
                                  "else of the training split)", above=0, below=1)
    test_fraction: float = setting(0.2, "share of a single-split data set held out for the test", minimum=0,
                                   below=1)
    split_seed: int = setting(0, "seed of the train/validation/test split, separate from train.seed", minimum=0,
                              maximum=2**32 - 1)
    flip: bool = setting(True, "random horizontal flips in training")
    download: bool = setting(False, "allow fetching the data set (CIFAR)", resume="any")
    limit_train: Optional[int] = setting(None, "use only this many training samples", minimum=1)
    limit_val: Optional[int] = setting(None, "use only this many validation samples", minimum=1)
    limit_test: Optional[int] = setting(None, "use only this many test samples (evaluated after training, never "
                                        "trained or validated on)", minimum=1, resume="any")


@dataclass
class TeacherConfig(Settings, section="teacher"):
    cnn: str = setting(default_of(HybridTeacher, "cnn"), "timm CNN branch", model=True)
    cnn_kwargs: Dict[str, Any] = setting({}, "keyword arguments for the CNN's timm constructor")
    vit: str = setting(default_of(HybridTeacher, "vit"), "timm ViT branch", model=True)
    vit_kwargs: Dict[str, Any] = setting({}, "keyword arguments for the ViT's timm constructor")
    vit_attention: str = setting(default_of(HybridTeacher, "vit_attention"),
                                 "ViT attention map: last block's CLS row, or rollout",
                                 choices=("cls", "rollout"))
    combine: str = setting(default_of(HybridTeacher, "combine"), "how the CNN and ViT attention maps combine",
                           choices=("add", "concat"))
    cnn_weights: Optional[str] = setting(None, "local weights file for the CNN branch", file=True)
    vit_weights: Optional[str] = setting(None, "local weights file for the ViT branch", file=True)
    pretrained: bool = setting(default_of(HybridTeacher, "pretrained"),
                               "fetch timm's pretrained weights (needs a network)")


@dataclass
class StudentConfig(Settings, section="student"):
    name: str = setting(default_of(Student, "name"), "timm student with a 'blocks' stage list", model=True)
    stages: List[int] = setting(default_of(Student, "stages"),
                                "stages whose attention maps are aligned with the teacher's", minimum=0)
    weights: Optional[str] = setting(None, "local weights file", file=True)
    pretrained: bool = setting(default_of(Student, "pretrained"), "fetch timm's pretrained weights (needs a network)")


@dataclass
class DistillConfig(Settings, section="distill"):
    method: str = setting("agkd", "distillation method; its settings are the section of the same name",
                          choices=METHODS)
    # Several --teacher files (multi-teacher distillation): how they become one teacher.
    teacher_weights: str = setting("equal", "weights of several teachers: equal, or in proportion to each "
                                   "one's validation accuracy (val_acc)", choices=("equal", "val_acc"))
    teacher_average: str = setting("probabilities", "how several teachers' outputs combine: the weighted mean of "
                                   "their predictions (probabilities, You et al.) or of their logits",
                                   choices=TEACHER_AVERAGES)


# Each method's settings are the section named after it, declared in the method's file.
_METHOD_SECTIONS: Dict[str, Type[Settings]] = {name: m.settings for name, m in _METHOD_REGISTRY.items()
                                               if m.settings is not None}
for _name, _cls in _METHOD_SECTIONS.items():
    assert _cls.section == _name, f"{_cls.__name__} must be declared with section={_name!r}"

SECTIONS: Dict[str, Type[Settings]] = {"data": DataConfig, "teacher": TeacherConfig, "student": StudentConfig,
                                       "distill": DistillConfig, **_METHOD_SECTIONS, "train": TrainConfig}


class Config:
    """A whole configuration: one section object per entry of :data:`SECTIONS`, as an
    attribute of the same name (``cfg.train.lr``; a method's section likewise, by its name)."""

    data: DataConfig
    teacher: TeacherConfig
    student: StudentConfig
    distill: DistillConfig
    train: TrainConfig

    def __init__(self, **sections: Settings):
        unknown = sorted(set(sections) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"unknown section {unknown[0]!r}; sections are {', '.join(SECTIONS)}")
        for name, cls in SECTIONS.items():
            value = sections.get(name) or cls()
            if not isinstance(value, cls):
                raise TypeError(f"Config: section {name} must be a {cls.__name__}, got {type(value).__name__}")
            setattr(self, name, value)

    def section(self, name: str) -> Settings:
        return getattr(self, name)

    @property
    def method_settings(self) -> Optional[Settings]:
        """The settings of ``distill.method`` (None for a method without any)."""
        return getattr(self, self.distill.method, None)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "Config":
        """Defaults for what ``config`` leaves out, then every value checked (ConfigError)."""
        if not isinstance(config, Mapping):
            raise ConfigError(f"a configuration is a mapping of sections ({', '.join(SECTIONS)}), got {config!r}")
        unknown = sorted(set(config) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"unknown section {unknown[0]!r}; sections are {', '.join(SECTIONS)}")
        values = {name: dict(config.get(name) or {}) for name in SECTIONS}
        for name, section in config.items():
            if section is not None and not isinstance(section, Mapping):
                raise ConfigError(f"section {name!r} must be a mapping of settings, got {section!r}")
        for old in sorted(set(values["distill"]) - set(DistillConfig.rules())):
            value = values["distill"].pop(old)
            for section, key in _moved(old):
                values[section][key] = value
        return cls(**{name: SECTIONS[name].from_dict(v) for name, v in values.items()})

    def to_dict(self) -> Dict[str, Dict[str, Any]]:
        return {name: self.section(name).to_dict() for name in SECTIONS}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Config({self.to_dict()!r})"


def _moved(key: str) -> List[tuple]:
    """Where a key of the old flat ``distill`` section lives now, as ``(section, key)``
    pairs (a key the logit term's settings share goes to every method that has it), with
    a FutureWarning; a ConfigError for a key that never existed."""
    places = []
    for name, cls in _METHOD_SECTIONS.items():
        new = cls.renamed.get(key, key)
        if new in cls.rules():
            places.append((name, new))
    if not places:
        raise DistillConfig.unknown(key)
    warnings.warn(f"distill.{key} is deprecated: the distill section holds the method and how several teachers "
                  f"combine now, and this setting is {' and '.join(f'{s}.{k}' for s, k in places)}; it was read as "
                  f"such", FutureWarning, stacklevel=4)
    return places


def validate_config(config: Mapping[str, Any]) -> Config:
    """A :class:`Config` from a mapping of sections (defaults for what it leaves out)."""
    return Config.from_dict(config)


def default_config() -> Config:
    """Every setting at its declared default."""
    return Config()


def resume_conflicts(saved, now: Config) -> List[str]:
    """The settings in which ``now`` differs from a run's ``saved`` configuration (a
    :class:`Config`, or the mapping of sections a checkpoint records, which is not checked
    again: a weights file it names may have moved since) in a way that would change the
    run's result (each setting's ``resume`` rule), as ``"section.key: saved -> now"``;
    empty when the run may be continued with ``now``."""
    saved_values = saved.to_dict() if isinstance(saved, Config) else saved
    conflicts = []
    for section, cls in SECTIONS.items():
        # A section or key the record lacks (written by an older version) had its default.
        before_section = {**cls().to_dict(), **(saved_values.get(section) or {})}
        after_section = now.section(section).to_dict()
        for key, rule in cls.rules().items():
            before, after = before_section[key], after_section[key]
            if before == after or rule.resume == "any" or (rule.resume == "more" and after >= before):
                continue
            conflicts.append(f"{section}.{key}: {before!r} -> {after!r}")
    return conflicts


# ----------------------------------------------------------------------------- files


def _read_yaml(path: Path) -> Dict[str, Any]:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path}: cannot be read ({exc})") from None
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file {path}: not valid YAML{where}: {problem}") from None


def load_config(preset_or_path: str, overrides: Iterable[str] = ()) -> Config:
    """A preset name (``digits``, ``cifar100``, ...) or a YAML file, then overrides; every
    setting present (defaults filled in) and checked."""
    path = Path(preset_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{preset_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"no preset or config file {preset_or_path!r}; presets: {', '.join(PRESETS)}")
    return apply_overrides(Config.from_dict(_read_preset(path)), overrides)


def _read_preset(path: Path, within: tuple = ()) -> Dict[str, Any]:
    """A configuration file's sections, on top of those of the file its ``base:`` names
    (a preset such as ``_paper``, or a file beside it): each section's keys replace the
    base's, the rest of the base's stay."""
    values = _read_yaml(path)
    if not isinstance(values, dict) or "base" not in values:
        return values
    base = values.pop("base")
    if not isinstance(base, str):
        raise ConfigError(f"config file {path}: base must name a preset or a YAML file, got {base!r}")
    base_path = CONFIG_DIR / f"{base}.yaml" if not Path(base).suffix else (path.parent / base)
    if not base_path.is_file():
        raise ConfigError(f"config file {path}: base {base!r} is no preset or file")
    if base_path.resolve() in within:
        raise ConfigError(f"config file {path}: base {base!r} leads back to itself")
    merged = _read_preset(base_path, within + (path.resolve(),))
    for section, entries in values.items():
        if isinstance(entries, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **entries}
        else:
            merged[section] = entries
    return merged


def apply_overrides(config: Config, overrides: Iterable[str]) -> Config:
    """``config`` with ``section.key=value`` overrides (value parsed as YAML: numbers,
    booleans, lists, null).

    A mapping setting (``teacher.vit_kwargs``, ...) takes a mapping that is merged into the
    one it has, so ``teacher.vit_kwargs={patch_size: 8}`` keeps the preset's ``img_size``;
    ``teacher.vit_kwargs.patch_size=8`` sets one entry. To drop an entry, set the whole
    mapping in a config file."""
    values = config.to_dict()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        *parents, leaf = key.strip().split(".")
        node: Any = values
        for depth, part in enumerate(parents):
            if not isinstance(node.get(part), dict):
                what = "a section of the config" if depth == 0 else "a mapping setting"
                raise ConfigError(f"override {item!r}: {part!r} is not {what}")
            node = node[part]
        inside_a_mapping_setting = len(parents) >= 2  # an entry of e.g. teacher.vit_kwargs: any name
        a_moved_distill_key = parents == ["distill"]  # Config.from_dict says where it went, or that it is unknown
        if not parents:
            raise ConfigError(f"override {item!r}: {key!r} is not section.key (sections: {', '.join(SECTIONS)})")
        if leaf not in node and not (inside_a_mapping_setting or a_moved_distill_key):
            raise ConfigError(f"override {item!r}: {SECTIONS[parents[0]].unknown(leaf)}")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: {raw!r} is not a YAML value") from None
        if isinstance(node.get(leaf), dict) and isinstance(value, dict) and len(parents) == 1:
            value = {**node[leaf], **value}
        node[leaf] = value
    return Config.from_dict(values)


def read_saved_config(path: Path) -> Config:
    """A run's saved ``config.yaml``, checked like any other."""
    try:
        return Config.from_dict(_read_yaml(path))
    except ConfigError as exc:
        raise ConfigError(f"the saved configuration {path} is not one this version reads ({exc})") from None


def save_config(config: Config, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
