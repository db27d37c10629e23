"""Typed config loading: YAML/dicts into (nested) dataclasses, unknown keys rejected with a did-you-mean."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from proreflow.errors import ProReflowError
from proreflow.limits import MAX_YAML_BYTES, MAX_YAML_VALUES

T = TypeVar("T")


def from_dict(cls: type[T], data: Any, where: str = "config") -> T:
    """Build dataclass `cls` from a mapping, checking keys and simple types recursively."""
    if not isinstance(data, dict):
        raise ProReflowError(f"{where} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {sorted(fields)}"
            raise ProReflowError(f"unknown key {key!r} in {where}{hint}")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ProReflowError(f"{where}: {exc}") from None


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, where)
            except ProReflowError as exc:
                errors.append(str(exc))
        raise ProReflowError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {args}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ProReflowError(f"{where} must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ProReflowError(f"{where} must be a list, got {value!r}")
        (inner, *_) = typing.get_args(tp) or (Any,)
        items = [_convert(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProReflowError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value):  # no setting of ours means anything at NaN or infinity
            raise ProReflowError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProReflowError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ProReflowError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ProReflowError(f"{where} must be a string, got {value!r}")
        return value
    return value


def read_text_file(path: str | Path, what: str, expected: str) -> str:
    """A user's text file (UTF-8), or one clear error: missing, a folder, or not text (`expected` says what
    should be there)."""
    p = Path(path)
    if p.is_dir():
        raise ProReflowError(f"{what} {str(p)!r} is a folder; pass {expected}")
    if not p.is_file():
        raise ProReflowError(f"{what} {str(p)!r} does not exist")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ProReflowError(f"{what} {str(p)!r} is not UTF-8 text ({expected} is expected)") from None


def _expanded_values(data: Any, limit: int) -> int:
    """The number of values in `data` with every alias expanded, counting stops past `limit`."""
    count, stack = 0, [data]
    while stack and count <= limit:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if p.is_file() and p.stat().st_size > MAX_YAML_BYTES:
        raise ProReflowError(f"config file {str(p)!r} is {p.stat().st_size} bytes; a preset is at most "
                             f"{MAX_YAML_BYTES} bytes")
    text = read_text_file(p, "config file", "a YAML file")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ProReflowError(f"config file {str(p)!r} is not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ProReflowError(f"config file {str(p)!r} must hold a mapping at the top level")
    if _expanded_values(data, MAX_YAML_VALUES) > MAX_YAML_VALUES:
        raise ProReflowError(f"config file {str(p)!r} expands to more than {MAX_YAML_VALUES} values (nested YAML "
                             f"aliases?); a preset holds a few hundred")
    return data


def load_preset(cls: type[T], default: str | Path, path: str | Path | None = None,
                overrides: dict[str, Any] | None = None, where: str = "config") -> T:
    """The one preset loader: the packaged `default` YAML, then a user YAML or preset name (`path`, only the
    keys it changes), then overrides (None values skipped), as the typed config `cls`."""
    data = load_yaml(default)
    if path is not None:
        data = merge(data, load_yaml(resolve_preset(path)))
    data = merge(data, {k: v for k, v in (overrides or {}).items() if v is not None})
    return from_dict(cls, data, where=str(path or where))


def merge(base: dict, override: dict) -> dict:
    """`override` on top of `base`: nested mappings merge key by key, anything else is replaced."""
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


#: the packaged presets (also reachable as the repository's top-level configs/)
PRESET_DIR = Path(__file__).parent / "configs"


def resolve_preset(path: str | Path) -> Path:
    """A preset name without suffix (e.g. `sd15-proreflow-I`, `eval-table1`, `digits`) -> its packaged
    YAML; anything else is taken as a path."""
    p = Path(path)
    if not p.suffix and (PRESET_DIR / f"{p.name}.yaml").is_file():
        return PRESET_DIR / f"{p.name}.yaml"
    return p
