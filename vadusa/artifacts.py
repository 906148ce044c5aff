"""Reading artifact files (config JSON, safetensors) with errors that name the file and what is wrong.

    config = config_from_json(HeadsConfig, d / "config.json")   # dataclass, every field's type checked
    state = read_safetensors(d / "model.safetensors")          # ValueError naming a truncated / garbage file

Every loader of a shipped or trained artifact (draft heads, feature drafter, block adapter, codec, judge,
vocabulary) goes through these, so a truncated, garbage or hand-edited file gives one clear ValueError
(FileNotFoundError when it is missing) instead of a traceback from deep inside torch or json.
"""

import dataclasses
import json
import math
import types
import typing
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file


def read_json(path: Path):
    """The JSON value in `path`; missing -> FileNotFoundError, not UTF-8 or not JSON -> ValueError, naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: nesting too deep
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def read_json_object(path: Path) -> dict:
    """`read_json` of a file that must hold a JSON object."""
    values = read_json(path)
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(values).__name__}")
    return values


def matches(value, hint) -> bool:
    """Whether a JSON value fits a dataclass field annotation (int, float, bool, str, list/tuple, dict, X | None)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if hint in (list, tuple) or origin in (list, tuple):
        items = [a for a in args if a is not Ellipsis]  # tuple[int, ...] -> [int]
        return isinstance(value, list) and (not items or all(matches(v, items[0]) for v in value))
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    if hint is typing.Any:
        return True
    return isinstance(value, hint)


def config_from_json(cls, path: Path):
    """The dataclass `cls` from the JSON object in `path`: unknown fields, missing required fields and values
    of the wrong type raise ValueError naming the file and the field (range checks stay with the class)."""
    path = Path(path)
    values = read_json_object(path)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{path} has unknown field(s) {unknown}; a {cls.__name__} has {sorted(fields)}")
    required = [n for n, f in fields.items() if f.default is f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in values]
    if missing:
        raise ValueError(f"{path} lacks the field(s) {missing} of a {cls.__name__}")
    for name, value in values.items():
        if not matches(value, hints[name]):
            expected = getattr(hints[name], "__name__", str(hints[name]))
            raise ValueError(f"{path}: field {name!r} must be {expected}, got {value!r}")
    try:
        return cls(**values)
    except ValueError as e:  # the class's own range checks (__post_init__)
        raise ValueError(f"{path}: {e}") from e


def read_lines(path: Path, what: str = "texts file") -> list[str]:
    """The non-empty, stripped lines of a UTF-8 text file; missing, not UTF-8 or empty -> an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist" + (" (it is a directory)" if path.is_dir() else ""))
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line, byte = raw[: e.start].count(b"\n") + 1, raw[e.start : e.start + 1]
        raise ValueError(f"{what} {path} is not UTF-8 text: line {line} has the byte {byte!r}") from e
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{what} {path} has no non-empty line")
    return lines


def read_safetensors(path: Path, shapes_only: bool = False) -> dict[str, torch.Tensor] | dict[str, tuple[int, ...]]:
    """The tensors in `path` (or, with `shapes_only`, each tensor's shape read off the header, nothing loaded);
    missing -> FileNotFoundError, truncated or not safetensors -> ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        if not shapes_only:
            return load_file(str(path))
        with safe_open(str(path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise ValueError(f"{path} is corrupt or not a safetensors file: {e}") from e
