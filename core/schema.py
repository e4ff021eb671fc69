"""Checking plain config values against dataclass schemas: names, types, enumerations and ranges.

A schema is a dataclass whose fields say what a config section holds. Ranges are field
metadata (`at_least(1)`, `above(0)`), enumerations are `Literal[...]` types. `from_config`
refuses an unknown key (with the closest known names), a missing one, a value of the wrong
type (`seed=abc`) or out of range (`epochs=0`), always naming the full key; it returns the
dataclass built from the converted values. This module imports nothing heavy: the trainer
and the model configs use it too.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

from core.errors import ConfigError


def at_least(bound) -> dict:
    """Field metadata: the value must be >= bound (None passes, for optional keys)."""
    return {"min": bound}


def above(bound) -> dict:
    """Field metadata: the value must be > bound."""
    return {"gt": bound}


def check_ranges(obj, where: str = "", values: Mapping | None = None) -> None:
    """Apply the range metadata of a dataclass's fields to `values` (default: the instance's own);
    raise ConfigError naming the key."""
    for f in dataclasses.fields(obj):
        if values is None:
            value = getattr(obj, f.name)
        elif f.name in values:
            value = values[f.name]
        else:
            continue
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if "min" in f.metadata and value < f.metadata["min"]:
            raise ConfigError(f"config key '{where}{f.name}' must be >= {f.metadata['min']}, got {value}")
        if "gt" in f.metadata and value <= f.metadata["gt"]:
            raise ConfigError(f"config key '{where}{f.name}' must be > {f.metadata['gt']}, got {value}")


def unknown_key(where: str, key: str, known) -> ConfigError:
    known = sorted(known)
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean '{where}{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{where}{key}'{hint} (known keys here: {', '.join(known)})")


def from_config(schema: type, values: Mapping, where: str = "", exclude: tuple[str, ...] = (),
                fixed: Mapping | None = None):
    """The dataclass `schema` built from `values` after checking every key; `where` prefixes key names.

    `exclude` names fields that are not config keys: they keep their defaults, or take the values of
    `fixed` (a model's item count, say).
    """
    if not isinstance(values, Mapping):
        raise ConfigError(f"config key '{where.rstrip('.')}' must be a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema) if f.name not in exclude}
    for key in values:
        if key not in fields:
            raise unknown_key(where, key, fields)
    kwargs = {}
    for name, f in fields.items():
        if name not in values:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"config key '{where}{name}' is missing")
            continue
        kwargs[name] = convert(values[name], hints[name], f"{where}{name}")
    # Ranges first, so that the error names the key with its section even where the schema's
    # own __post_init__ checks the same ranges.
    check_ranges(schema, where, kwargs)
    return schema(**kwargs, **(fixed or {}))


def convert(value: Any, annotation, key: str):
    """`value` checked against the type `annotation` (and converted: an int where a float is expected)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return convert(value, option, key)
            except ConfigError as error:
                errors.append(error)
        if len(options) == 1:
            raise errors[0]
        raise ConfigError(f"config key '{key}' must be {' or '.join(_describe(o) for o in options)}, got {value!r}")
    if origin is Literal:
        if value not in args or isinstance(value, bool) != any(isinstance(a, bool) for a in args):
            raise ConfigError(f"config key '{key}' is {value!r}; expected one of {', '.join(map(str, args))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        item = args[0] if args else Any
        return [convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or annotation is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(annotation):
        return from_config(annotation, value, f"{key}.")
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return value
    raise TypeError(f"schema type {annotation!r} of '{key}' is not supported")  # a bug in a schema, not in a config


def _describe(annotation) -> str:
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(annotation)))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        annotation, getattr(annotation, "__name__", str(annotation)))


def describe_differences(old: Mapping, new: Mapping, prefix: str = "") -> str:
    """`a.b: 1 -> 2, c: 'x' -> 'y'`: the keys (nested, dotted) whose values differ between two settings."""
    changes = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            inner = describe_differences(a, b, f"{prefix}{key}.")
            if inner:
                changes.append(inner)
        elif a != b:
            changes.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return ", ".join(changes)
