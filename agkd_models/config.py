"""Run configuration: YAML presets shipped in agkd_models/configs, a file of your own, and
``section.key=value`` overrides; the resolved configuration is saved with every run.

Every setting is declared once, below, as a dataclass field: its default, what it means
and what values it takes. :func:`load_config` fills in the defaults, then checks every value
before any work starts, so a bad value is one clear :class:`ConfigError` naming the key,
the value given and what is allowed, never a traceback from deep inside training.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

import yaml

from .data.datasets import DATASETS
from .distillers import ATTENTION_LOSSES, PCA_ATTENTION, VIEW_TERMS
from .distillers import METHODS as _METHOD_REGISTRY
from .engine.amp import AMP_MODES
from .engine.checkpoint import unreadable

__all__ = ["PRESETS", "SECTIONS", "METHODS", "AMP_MODES", "DataConfig", "TeacherConfig", "StudentConfig",
           "DistillConfig", "TrainConfig", "load_config", "apply_overrides", "validate_config", "default_config",
           "save_config", "read_saved_config", "resume_conflicts", "ConfigError"]

CONFIG_DIR = Path(__file__).parent / "configs"
PRESETS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
METHODS = tuple(_METHOD_REGISTRY)  # the distillers' registry (agkd_models.distillers)
PADDINGS = ("valid", "reflect", "zeros")


class ConfigError(ValueError):
    pass


# ------------------------------------------------------------------ declaring settings


@dataclass(frozen=True)
class Rule:
    """What one setting accepts besides its type (the field's annotation)."""
    help: str
    choices: Optional[Sequence[str]] = None
    minimum: Optional[float] = None    # inclusive
    above: Optional[float] = None      # exclusive lower bound
    maximum: Optional[float] = None    # inclusive
    below: Optional[float] = None      # exclusive upper bound
    odd: bool = False
    model: bool = False                # a timm model name
    file: bool = False                 # an existing, readable file
    # What a resumed run may change: "same" (anything else changes the result), "any"
    # (where or how visibly it runs), "more" (only upwards: more epochs extend the run).
    resume: str = "same"

    def describe(self, kind: str) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(self.choices)
        words = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
                 "list": "a list of integers", "dict": "a mapping of keyword arguments"}[kind]
        if self.odd:
            words = "an odd integer"
        bounds = [f">= {self.minimum:g}" if self.minimum is not None else "",
                  f"> {self.above:g}" if self.above is not None else "",
                  f"<= {self.maximum:g}" if self.maximum is not None else "",
                  f"< {self.below:g}" if self.below is not None else ""]
        bounds = [b for b in bounds if b]
        if self.model:
            words = "a timm model name"
        if self.file:
            words = "the path of an existing file"
        return words + (" " + " and ".join(bounds) if bounds else "")


def setting(default: Any, help: str, **rules: Any) -> Any:
    """A config field: its default and its :class:`Rule`."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"rule": Rule(help, **rules)})
    return field(default=default, metadata={"rule": Rule(help, **rules)})


def _kind(annotation: Any):
    """(base kind, None allowed) of a field's type."""
    optional = False
    if typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional, annotation = True, args[0]
    origin = typing.get_origin(annotation) or annotation
    return {int: "int", float: "float", bool: "bool", str: "str", list: "list", dict: "dict"}[origin], optional


def _check(key: str, value: Any, annotation: Any, rule: Rule) -> Any:
    """``value`` as the setting's type, or a ConfigError that says what is allowed."""
    kind, optional = _kind(annotation)
    allowed = rule.describe(kind) + (", or null" if optional else "")
    given = value

    def bad(why: str = "") -> ConfigError:
        return ConfigError(f"{key}: got {given!r}{why}; expected {allowed}")

    if value is None:
        if optional:
            return None
        raise bad()
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad()
        return value
    if kind in ("int", "float"):
        if isinstance(value, str) and kind == "float":
            try:  # YAML 1.1 reads 1e-3 (no dot) as a string
                value = float(value)
            except ValueError:
                raise bad() from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        if kind == "int":
            if isinstance(value, float):
                if not value.is_integer():
                    raise bad()
                value = int(value)
        else:
            value = float(value)
            if not math.isfinite(value):
                raise bad()
        if ((rule.minimum is not None and value < rule.minimum) or (rule.above is not None and value <= rule.above)
                or (rule.maximum is not None and value > rule.maximum)
                or (rule.below is not None and value >= rule.below) or (rule.odd and value % 2 != 1)):
            raise bad()
        return value
    if kind == "list":
        if not isinstance(value, (list, tuple)) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in value) or not value:
            raise bad()
        if rule.minimum is not None and min(value) < rule.minimum:
            raise bad()
        return list(value)
    if kind == "dict":
        if not isinstance(value, dict):
            raise bad()
        return dict(value)
    if not isinstance(value, str):
        raise bad()
    if rule.choices is not None and value not in rule.choices:
        close = difflib.get_close_matches(value, rule.choices, n=1)
        raise bad(f" (did you mean {close[0]!r}?)" if close else "")
    if rule.model:
        import timm

        if not timm.is_model(value):
            close = difflib.get_close_matches(value, timm.list_models(), n=1)
            raise bad(", which timm does not know" + (f" (did you mean {close[0]!r}?)" if close else ""))
    if rule.file:
        reason = unreadable(Path(value).expanduser())
        if reason is not None:
            raise bad(f" ({reason})")
    return value


# --------------------------------------------------------------------------- sections


def _device(value: str) -> bool:
    return bool(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value))


@dataclass
class DataConfig:
    name: str = setting("digits", "data set", choices=DATASETS)
    root: Optional[str] = setting(None, "data folder (folder, cifar*, tinyimagenet)", resume="any")
    image_size: int = setting(224, "input size in pixels", minimum=8)
    val_fraction: float = setting(0.2, "share held out for validation (of the whole set when it has one split, "
                                  "else of the training split)", above=0, below=1)
    test_fraction: float = setting(0.2, "share of a single-split data set held out for the test", minimum=0,
                                   below=1)
    split_seed: int = setting(0, "seed of the train/validation/test split, separate from train.seed", minimum=0)
    flip: bool = setting(True, "random horizontal flips in training")
    download: bool = setting(False, "allow fetching the data set (CIFAR)", resume="any")
    limit_train: Optional[int] = setting(None, "use only this many training samples", minimum=1)
    limit_val: Optional[int] = setting(None, "use only this many validation samples", minimum=1)
    limit_test: Optional[int] = setting(None, "use only this many test samples", minimum=1)


@dataclass
class TeacherConfig:
    cnn: str = setting("vgg19", "timm CNN branch", model=True)
    cnn_kwargs: Dict[str, Any] = setting({}, "keyword arguments for the CNN's timm constructor")
    vit: str = setting("vit_base_patch16_224", "timm ViT branch", model=True)
    vit_kwargs: Dict[str, Any] = setting({}, "keyword arguments for the ViT's timm constructor")
    vit_attention: str = setting("cls", "ViT attention map: last block's CLS row, or rollout",
                                 choices=("cls", "rollout"))
    combine: str = setting("add", "how the CNN and ViT attention maps combine", choices=("add", "concat"))
    cnn_weights: Optional[str] = setting(None, "local weights file for the CNN branch", file=True)
    vit_weights: Optional[str] = setting(None, "local weights file for the ViT branch", file=True)
    pretrained: bool = setting(False, "fetch timm's pretrained weights (needs a network)")


@dataclass
class StudentConfig:
    name: str = setting("efficientnet_b0", "timm student with a 'blocks' stage list", model=True)
    stages: List[int] = setting([3, 4, 5], "stages whose attention maps are aligned with the teacher's", minimum=0)
    weights: Optional[str] = setting(None, "local weights file", file=True)
    pretrained: bool = setting(False, "fetch timm's pretrained weights (needs a network)")


@dataclass
class DistillConfig:
    method: str = setting("agkd", "distillation method", choices=METHODS)
    # logit and agkd
    temperature: float = setting(4.0, "softmax temperature of the KD term", above=0)
    kd_alpha: float = setting(0.9, "KD weight α in (1-α)·CE + α·τ²·KL", minimum=0, maximum=1)
    # agkd: total = alpha·L_logits + beta·L_attention
    attention_loss: str = setting("hybrid", "agkd: attention-map loss", choices=ATTENTION_LOSSES)
    alpha: float = setting(1.0, "agkd: weight of the logit (KD) term", minimum=0)
    beta: float = setting(1.0, "agkd: weight of the attention term", minimum=0)
    hybrid_alpha: float = setting(0.5, "agkd, hybrid loss: weight of 1 - SSIM", minimum=0)
    hybrid_beta: float = setting(0.5, "agkd, hybrid loss: weight of 1 - cos", minimum=0)
    window_size: int = setting(3, "agkd, ssim/hybrid: SSIM window", minimum=1, odd=True)
    padding: str = setting("zeros", "agkd, ssim/hybrid: SSIM padding", choices=PADDINGS)
    perceptual_layers: int = setting(4, "agkd, perceptual loss: feature layers compared", minimum=1)
    # cakd: total = w(t)·(L_proj1 + L_proj2 + lam·L_MVG) + ce_weight·CE (agkd_models.distillers.cakd)
    projected_stage: Optional[int] = setting(None, "cakd: student stage the projectors read (null: the deepest "
                                             "whose grid equals the teacher's token grid)", minimum=0)
    pca_attention: str = setting("logits", "cakd: PCA loss compares attention logits Q·Kᵀ/√d averaged over heads "
                                 "(authors' code) or per-head softmax probabilities (paper, Eq. 4)",
                                 choices=PCA_ATTENTION)
    pca_attention_weight: float = setting(0.2, "cakd: weight of the PCA loss's attention term", minimum=0)
    pca_value_weight: float = setting(0.05, "cakd: weight of the PCA loss's V·Vᵀ/√d term", minimum=0)
    replace_prob: float = setting(0.5, "cakd: probability of replacing the student's Q/K/V by the teacher's",
                                  minimum=0, maximum=1)
    replace_elementwise: bool = setting(True, "cakd: replace Q/K/V element by element (paper, Eq. 3), else "
                                        "whole tensors")
    lam: float = setting(1.0, "cakd: weight of the multi-view adversarial term", minimum=0)
    ce_weight: float = setting(1.0, "cakd: weight of the cross-entropy with the labels", minimum=0)
    distill_weight: float = setting(0.2, "cakd: weight w of the distillation terms once ramped in", minimum=0)
    ce_only_epochs: float = setting(1.0, "cakd: epochs of cross-entropy alone before the distillation terms",
                                    minimum=0)
    ramp_epochs: float = setting(2.0, "cakd: epochs over which w rises linearly from 0 (0: at once)", minimum=0)
    view_terms: str = setting("adversarial", "cakd: which terms see the multi-view samples (adversarial: that "
                              "term alone, as in Eq. 7; all: every term)", choices=VIEW_TERMS)
    discriminator_every: int = setting(1, "cakd: discriminator update period (iterations)", minimum=1)
    discriminator_lr: float = setting(1e-4, "cakd: the discriminator's Adam learning rate", above=0)
    dropout: float = setting(0.1, "cakd: dropout of the group-wise linear projector", minimum=0, below=1)
    view_prob: float = setting(0.5, "cakd: probability of each multi-view transform", minimum=0, maximum=1)


@dataclass
class TrainConfig:
    epochs: int = setting(20, "training epochs (a resumed run may be given more)", minimum=1, resume="more")
    batch_size: int = setting(128, "global batch, split evenly over torchrun's processes", minimum=1)
    optimizer: str = setting("adam", "optimizer", choices=("adam", "sgd"))
    lr: float = setting(0.01, "learning rate", above=0)
    momentum: float = setting(0.9, "SGD momentum", minimum=0, below=1)
    weight_decay: float = setting(0.0, "weight decay", minimum=0)
    scheduler: str = setting("cosine", "learning-rate schedule", choices=("cosine", "step"))
    warmup_epochs: int = setting(0, "epochs of linear learning-rate warm-up before the schedule", minimum=0)
    step_size: int = setting(10, "step schedule: epochs between decays", minimum=1)
    gamma: float = setting(0.1, "step schedule: decay factor", above=0)
    grad_clip: Optional[float] = setting(5.0, "gradient-norm clip (null: none)", above=0)
    label_smoothing: float = setting(0.0, "label smoothing ε of every cross-entropy term, as "
                                     "F.cross_entropy's (the teacher's, the student's, kd_loss's)",
                                     minimum=0, maximum=1)
    mixup: float = setting(0.0, "mixup's Beta(α, α) parameter (timm Mixup); 0: off. Training targets "
                           "become probabilities and the teacher sees the mixed images", minimum=0)
    cutmix: float = setting(0.0, "cutmix's Beta(α, α) parameter (timm Mixup); 0: off", minimum=0)
    mixup_prob: float = setting(1.0, "probability that a batch is mixed (when mixup or cutmix is on; with "
                                "both on, half the mixed batches use each)", minimum=0, maximum=1)
    num_workers: int = setting(0, "data-loader worker processes (augmentation draws do not depend on them)",
                               minimum=0, resume="any")
    seed: int = setting(0, "training seed", minimum=0)
    device: str = setting("auto", "auto, cpu, cuda or cuda:N (a run resumed on another device agrees to float "
                          "rounding, not bit for bit)", resume="any")
    progress: bool = setting(True, "progress bars and per-epoch lines", resume="any")
    amp: str = setting("off", "autocast precision", choices=AMP_MODES)
    channels_last: bool = setting(False, "channels_last memory format")
    compile: bool = setting(False, "torch.compile the model and the loss path")
    sync_bn: bool = setting(False, "SyncBatchNorm across GPU processes")

    def __post_init__(self):
        for name, value in validate_section("train", dataclasses.asdict(self)).items():
            setattr(self, name, value)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


SECTIONS = {"data": DataConfig, "teacher": TeacherConfig, "student": StudentConfig, "distill": DistillConfig,
            "train": TrainConfig}


def validate_section(section: str, values: Dict[str, Any]) -> Dict[str, Any]:
    """The section's values checked and normalised; unknown keys are errors."""
    cls = SECTIONS[section]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        close = difflib.get_close_matches(unknown[0], fields, n=1)
        raise ConfigError(f"unknown key '{section}.{unknown[0]}'" + (f" (did you mean '{section}.{close[0]}'?)"
                                                                      if close else "")
                          + f"; {section} has: {', '.join(fields)}")
    out = {}
    for name, value in values.items():
        if section == "train" and name == "amp" and value in (False, None):
            value = "off"  # YAML reads a bare `off` as false
        out[name] = _check(f"{section}.{name}", value, hints[name], fields[name].metadata["rule"])
    if section == "train" and not _device(out.get("device", "auto")):
        raise ConfigError(f"train.device: got {out['device']!r}; expected auto, cpu, cuda or cuda:N")
    return out


def resume_conflicts(saved: Dict[str, Any], now: Dict[str, Any]) -> List[str]:
    """The settings in which ``now`` differs from a run's ``saved`` configuration in a way
    that would change the run's result (each setting's ``resume`` rule), as
    ``"section.key: saved -> now"``; empty when the run may be continued with ``now``."""
    saved, now = validate_config(saved), validate_config(now)
    conflicts = []
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            before, after = saved[section][f.name], now[section][f.name]
            allowed = f.metadata["rule"].resume
            if before == after or allowed == "any" or (allowed == "more" and after >= before):
                continue
            conflicts.append(f"{section}.{f.name}: {before!r} -> {after!r}")
    return conflicts


def default_config() -> Dict[str, Any]:
    """Every setting at its declared default."""
    return {name: {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
                   for f in dataclasses.fields(cls)} for name, cls in SECTIONS.items()}


def validate_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """Defaults for what ``config`` leaves out, then every value checked (ConfigError)."""
    if not isinstance(config, dict):
        raise ConfigError(f"a configuration is a mapping of sections ({', '.join(SECTIONS)}), got {config!r}")
    unknown = sorted(set(config) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section {unknown[0]!r}; sections are {', '.join(SECTIONS)}")
    resolved = default_config()
    for section, values in config.items():
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"section {section!r} must be a mapping of settings, got {values!r}")
        resolved[section].update(values)
    return {section: validate_section(section, values) for section, values in resolved.items()}


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


def load_config(preset_or_path: str, overrides: Iterable[str] = ()) -> Dict[str, Any]:
    """A preset name (``digits``, ``cifar100``, ...) or a YAML file, then overrides; every
    setting present (defaults filled in) and checked."""
    path = Path(preset_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{preset_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"no preset or config file {preset_or_path!r}; presets: {', '.join(PRESETS)}")
    config = validate_config(_read_yaml(path))
    return validate_config(apply_overrides(config, overrides))


def apply_overrides(config: Dict[str, Any], overrides: Iterable[str]) -> Dict[str, Any]:
    """``section.key=value`` (value parsed as YAML: numbers, booleans, lists, null).

    A mapping setting (``teacher.vit_kwargs``, ...) takes a mapping that is merged into the
    one it has, so ``teacher.vit_kwargs={patch_size: 8}`` keeps the preset's ``img_size``;
    ``teacher.vit_kwargs.patch_size=8`` sets one entry. To drop an entry, set the whole
    mapping in a config file."""
    config = copy.deepcopy(config)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        *parents, leaf = key.strip().split(".")
        node = config
        for depth, part in enumerate(parents):
            if not isinstance(node.get(part), dict):
                what = "a section of the config" if depth == 0 else "a mapping setting"
                raise ConfigError(f"override {item!r}: {part!r} is not {what}")
            node = node[part]
        inside_a_mapping_setting = len(parents) >= 2  # an entry of e.g. teacher.vit_kwargs: any name
        if leaf not in node and not inside_a_mapping_setting:
            raise ConfigError(f"override {item!r}: unknown key {key!r} (known: {', '.join(sorted(node))})")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: {raw!r} is not a YAML value") from None
        if isinstance(node.get(leaf), dict) and isinstance(value, dict) and len(parents) == 1:
            value = {**node[leaf], **value}
        node[leaf] = value
    return config


def read_saved_config(path: Path) -> Dict[str, Any]:
    """A run's saved ``config.yaml``, checked like any other."""
    try:
        return validate_config(_read_yaml(path))
    except ConfigError as exc:
        raise ConfigError(f"the saved configuration {path} is not one this version reads ({exc})") from None


def save_config(config: Dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
