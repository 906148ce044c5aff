"""Artifact configs read from JSON: one place that turns a config file into its dataclass, or a clear error.

    config = read_config(HeadsConfig, directory / "config.json")

Every error is a ValueError naming the file: not JSON (or not UTF-8), not a JSON object, a field the
dataclass does not have, a required field missing, or a value of the wrong type (a bool is not an int,
an int is a float), or a value the class itself refuses (its __post_init__ checks ranges).
"""

import json
import reprlib
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path


def read_json_object(path: Path) -> dict:
    """The JSON object in `path`; anything else raises a ValueError naming the file."""
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def type_matches(value, hint) -> bool:
    """Whether a JSON value fits a field annotation (int, float, bool, str, dict, list, unions, X | None)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(type_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, typing.get_origin(hint) or hint)  # str, dict, list (elements unchecked)


def type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def read_config(cls, path: Path, data: dict | None = None):
    """`cls(**fields)` from the JSON object in `path` (or `data`, already read from it), every field checked."""
    data = read_json_object(path) if data is None else data
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{path} has unknown field(s) {unknown}; a {cls.__name__} has {sorted(known)}")
    required = [n for n, f in known.items() if f.default is MISSING and f.default_factory is MISSING]
    missing = [n for n in required if n not in data]
    if missing:
        raise ValueError(f"{path} lacks the required field(s) {missing} of a {cls.__name__}")
    for name, value in data.items():
        if not type_matches(value, hints[name]):
            expected = type_name(hints[name])
            raise ValueError(f"{path}: field {name!r} must be of type {expected}, got {reprlib.repr(value)}")
    try:
        return cls(**data)
    except ValueError as e:  # the class's own checks (__post_init__): name the file
        raise ValueError(f"{path}: {e}") from e
