"""Run configuration: YAML presets shipped in agkd_models/configs, a file of your own, and
``key.sub=value`` overrides; the resolved configuration is saved with every run."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, Iterable

import yaml

__all__ = ["PRESETS", "load_config", "apply_overrides", "save_config", "ConfigError"]

CONFIG_DIR = Path(__file__).parent / "configs"
PRESETS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


class ConfigError(ValueError):
    pass


def load_config(preset_or_path: str, overrides: Iterable[str] = ()) -> Dict[str, Any]:
    """A preset name (``digits``, ``cifar100``, ...) or a YAML file, then overrides."""
    path = Path(preset_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{preset_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"no preset or config file {preset_or_path!r}; presets: {', '.join(PRESETS)}")
    config = yaml.safe_load(path.read_text()) or {}
    return apply_overrides(config, overrides)


def apply_overrides(config: Dict[str, Any], overrides: Iterable[str]) -> Dict[str, Any]:
    """``section.key=value`` (value parsed as YAML: numbers, booleans, lists, null)."""
    config = copy.deepcopy(config)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        *parents, leaf = key.strip().split(".")
        node = config
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section of the config")
            node = node[part]
        if leaf not in node:
            raise ConfigError(f"override {item!r}: unknown key {key!r} (known: {', '.join(sorted(node))})")
        node[leaf] = yaml.safe_load(raw)
    return config


def save_config(config: Dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
