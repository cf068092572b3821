"""Declaring settings: a section of the configuration is a dataclass whose fields are
made with :func:`setting` (default, meaning, allowed values). Every assignment to a field
is checked — by the dataclass's own ``__init__``, by ``from_dict`` and by later attribute
assignments alike — so an object of a section type always holds valid values, and a bad
one is a :class:`ConfigError` naming ``section.key``, the value given and what is allowed.

The sections themselves live where they are used: the distillers declare theirs in their
own files (``LogitKDSettings``, ``AGKDSettings``, ``CAKDSettings``); the data, model and
training sections are in :mod:`agkd_models.config`, which puts them together.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import inspect
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, Mapping, Optional, Sequence

__all__ = ["ConfigError", "Rule", "setting", "default_of", "Settings", "check_value", "unreadable"]


class ConfigError(ValueError):
    pass


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
        def number(v: float) -> str:  # 4294967295, not 4.29497e+09
            return str(int(v)) if float(v).is_integer() and abs(v) < 2**53 else f"{v:g}"

        bounds = [f">= {number(self.minimum)}" if self.minimum is not None else "",
                  f"> {number(self.above)}" if self.above is not None else "",
                  f"<= {number(self.maximum)}" if self.maximum is not None else "",
                  f"< {number(self.below)}" if self.below is not None else ""]
        bounds = [b for b in bounds if b]
        if self.model:
            words = "a timm model name"
        if self.file:
            words = "the path of an existing file"
        return words + (" " + " and ".join(bounds) if bounds else "")


def default_of(function: Any, parameter: str) -> Any:
    """The default of ``function``'s ``parameter`` (a class: of its constructor), for a
    setting whose default is that of the code it configures: declared there, once."""
    default = inspect.signature(function).parameters[parameter].default
    if default is inspect.Parameter.empty:
        raise TypeError(f"{getattr(function, '__qualname__', function)}: {parameter} has no default")
    return list(default) if isinstance(default, tuple) else default


def setting(default: Any, help: str, **rules: Any) -> Any:
    """A settings field: its default and its :class:`Rule`."""
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


def check_value(key: str, value: Any, annotation: Any, rule: Rule) -> Any:
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


def unreadable(path: Path) -> Optional[str]:
    """Why ``path`` cannot be opened as a file, or None when it can."""
    path = Path(path)
    if not path.is_file():
        return "not a file" if path.exists() else "no such file"
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    return None


@functools.lru_cache(maxsize=None)
def _fields_of(cls: type) -> Dict[str, tuple]:
    """name -> (type annotation, Rule) of a settings class, resolved once."""
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f.metadata["rule"]) for f in dataclasses.fields(cls)}


class Settings:
    """Base of every configuration section: subclass it as a ``@dataclass`` whose fields
    are :func:`setting`\\ s, naming the section: ``class AGKDSettings(Settings, section="agkd")``.

    Renamed settings stay readable: ``renamed`` maps an old name to its new one, so an old
    key gives a message saying what it is called now."""

    section: ClassVar[str] = ""
    renamed: ClassVar[Mapping[str, str]] = {}

    def __init_subclass__(cls, section: str = "", **kwargs):
        super().__init_subclass__(**kwargs)
        if section:
            cls.section = section

    def __setattr__(self, name: str, value: Any) -> None:
        fields = _fields_of(type(self))
        if name not in fields:
            raise self.unknown(name)
        annotation, rule = fields[name]
        super().__setattr__(name, check_value(f"{self.section}.{name}", value, annotation, rule))

    @classmethod
    def unknown(cls, name: str) -> ConfigError:
        """The error for a key this section does not have."""
        names = list(_fields_of(cls))
        if name in cls.renamed:
            return ConfigError(f"{cls.section}.{name} is now called {cls.section}.{cls.renamed[name]}")
        close = difflib.get_close_matches(name, names, n=1)
        return ConfigError(f"unknown key '{cls.section}.{name}'" + (f" (did you mean '{cls.section}.{close[0]}'?)"
                                                                     if close else "")
                           + f"; {cls.section} has: {', '.join(names)}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]):
        """The section from a mapping of its keys (defaults for those left out)."""
        unknown = sorted(set(values) - set(_fields_of(cls)))
        if unknown:
            raise cls.unknown(unknown[0])
        return cls(**values)

    def to_dict(self) -> Dict[str, Any]:
        return {name: copy.deepcopy(getattr(self, name)) for name in _fields_of(type(self))}

    def replace(self, **changes: Any):
        """A copy with ``changes`` (checked like any assignment)."""
        return type(self).from_dict({**self.to_dict(), **changes})

    @classmethod
    def rules(cls) -> Dict[str, Rule]:
        return {name: rule for name, (_, rule) in _fields_of(cls).items()}
