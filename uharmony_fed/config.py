"""Typed, frozen configuration parsed once at the boundary from YAML.

Every config object in the project is a frozen dataclass with defaults. :func:`parse`
turns a plain mapping (read from YAML) into such a dataclass, recursing into nested
dataclasses, and raises :class:`ConfigError` with the key path, the expected type, the
value found and, for unknown keys, the nearest valid key. Library code receives these
objects, never the raw dict.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type.

    Attributes:
        where: the file or key path that is wrong (``fed.yaml: train.lr``).
    """

    def __init__(self, where: str, message: str) -> None:
        self.where = where
        super().__init__(f"{where}: {message}")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, where: str) -> Any:
    """Convert ``value`` to type ``tp`` or raise ConfigError naming ``where``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            msg = f"expected a mapping ({tp.__name__}), found {value!r}"
            raise ConfigError(where, msg)
        return parse(tp, value, where)
    if origin is typing.Literal:
        allowed = get_args(tp)
        if value not in allowed:
            near = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            msg = f"expected one of {', '.join(repr(a) for a in allowed)}, found {value!r}{hint}"
            raise ConfigError(where, msg)
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except ConfigError as exc:
                errors.append(exc)
        msg = f"expected {_type_name(tp)}, found {value!r}"
        raise ConfigError(where, msg)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            msg = f"expected a list ({_type_name(tp)}), found {value!r}"
            raise ConfigError(where, msg)
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                msg = f"expected {len(args)} items ({_type_name(tp)}), found {len(value)}"
                raise ConfigError(where, msg)
            items = [_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value))]
        else:
            item_tp = args[0] if args else Any
            items = [_convert(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            msg = f"expected a mapping ({_type_name(tp)}), found {value!r}"
            raise ConfigError(where, msg)
        kt, vt = get_args(tp) or (Any, Any)
        return {_convert(kt, k, _join(where, k)): _convert(vt, v, _join(where, k)) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(where, f"expected true or false, found {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(where, f"expected an integer, found {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(where, f"expected a number, found {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(where, f"expected a string, found {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(where, f"expected a path, found {value!r}")
        return Path(value)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(where, f"expected {_type_name(tp)}, found {value!r}")


def _join(where: str, key: object) -> str:
    # "fed.yaml:" + "federation" -> "fed.yaml: federation"; "fed.yaml: federation" + "rounds"
    # -> "fed.yaml: federation.rounds".
    if not where:
        return str(key)
    return f"{where} {key}" if where.endswith(":") else f"{where}.{key}"


def parse(cls: type[T], data: Mapping[str, Any] | None, where: str = "config") -> T:
    """Build the frozen dataclass ``cls`` from ``data``, checking every key and type.

    Args:
        cls: a dataclass type whose fields all have type hints.
        data: the mapping read from YAML (``None`` means all defaults).
        where: the file or key path used in error messages.

    Returns:
        An instance of ``cls``.

    Raises:
        ConfigError: on an unknown key (with the nearest valid key), a missing required
            key, a wrong type, or a value the class's ``__post_init__`` rejects.
    """
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(where, f"expected a mapping, found {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    # YAML keys may use hyphens (Flower style) or underscores; fields use underscores.
    kwargs: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key not in fields:
            near = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            valid = ", ".join(sorted(fields))
            msg = f"unknown key {raw_key!r}{hint} (valid keys: {valid})"
            raise ConfigError(_join(where, raw_key), msg)
        kwargs[key] = _convert(hints[key], value, _join(where, raw_key))
    for name, f in fields.items():
        missing = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if missing and name not in kwargs:
            raise ConfigError(_join(where, name), f"required key is missing ({_type_name(hints[name])})")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(where, str(exc)) from exc


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with a clear error for a missing file or bad syntax.

    Raises:
        ConfigError: the file is missing, unreadable, not YAML, or not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "config file not found; pass an existing YAML file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(str(path), f"not valid YAML{line}: {problem}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), f"expected a mapping at the top level, found {type(data).__name__}")
    return data


def to_dict(obj: Any) -> Any:
    """The plain-data (YAML/JSON-ready) form of a config dataclass."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj
