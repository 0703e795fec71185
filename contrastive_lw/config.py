"""Typed configuration: dataclasses read from plain dicts / YAML with unknown keys rejected."""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import ConfigError

T = TypeVar("T")


def from_dict(cls: type[T], values: dict[str, Any] | None, where: str = "config") -> T:
    """Build dataclass ``cls`` from ``values``; nested dataclasses are built recursively, each on
    top of its field's own default (a partial mapping changes only the keys it names).

    Raises:
        ConfigError: naming any unknown key (and the valid ones) or a value of the wrong kind.
    """
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; valid keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.{name} must be a mapping, got {value!r}")
            value = from_dict(kind, _merged(_field_default(fields[name]), value), f"{where}.{name}")
        else:
            value = _check_scalar(value, kind, f"{where}.{name}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from None


def _field_default(f: dataclasses.Field) -> dict[str, Any]:
    """The plain-dict form of a dataclass field's default (its factory's product), {} without one."""
    if f.default_factory is not dataclasses.MISSING:
        return to_dict(f.default_factory())
    return {} if f.default is dataclasses.MISSING else to_dict(f.default)


def _merged(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """``values`` on top of ``base``, nested mappings merged key by key."""
    out = dict(base)
    for key, value in values.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _check_scalar(value: Any, kind: Any, where: str) -> Any:
    """Coerce ints to floats where a float is expected, lists to tuples; reject the wrong kind."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        kind = next(o for o in options if o is not type(None))
        origin = typing.get_origin(kind)
    if origin is tuple:
        items = value if isinstance(value, (list, tuple)) else [value]
        inner = typing.get_args(kind)[0]
        return tuple(_check_scalar(v, inner, where) for v in items)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind in (int, float, str, bool) and not (
        isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{where} must be {kind.__name__}, got {value!r}")
    return value


def to_dict(config: Any) -> dict[str, Any]:
    """Plain-dict form of a dataclass config (tuples become lists, for YAML)."""
    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(config))


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing or malformed file is a ConfigError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"malformed YAML in {path}: {err}".splitlines()[0]) from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of keys to values")
    return values


def set_dotted(values: dict[str, Any], assignment: str) -> None:
    """Apply ``"a.b.c=VALUE"`` to nested ``values`` in place: ``values["a"]["b"]["c"] = VALUE``,
    VALUE read as YAML (``0.2``, ``[64, 128]``, ``true``, ``infonce``), missing sections created.

    Example:
        >>> values = {"pretrain": {"lr": 0.1}}
        >>> set_dotted(values, "pretrain.loss.temperature=0.2"); values
        {'pretrain': {'lr': 0.1, 'loss': {'temperature': 0.2}}}
    """
    path, equals, text = assignment.partition("=")
    keys = path.strip().split(".")
    if not equals or not all(keys):
        raise ConfigError(f"--set takes SECTION.KEY=VALUE, got {assignment!r}")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"--set {assignment!r}: {text!r} is not a YAML value") from None
    node = values
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {assignment!r}: {key!r} is a value, not a section")
    node[keys[-1]] = value


def save_yaml(values: dict[str, Any], path: str | Path) -> None:
    """Write a mapping as YAML (block style, keys in insertion order)."""
    Path(path).write_text(yaml.safe_dump(values, sort_keys=False))


def per_layer(values: tuple[T, ...], k: int) -> T:
    """Value for layer ``k`` (1-based) of a per-layer tuple; the last entry repeats."""
    return values[min(k, len(values)) - 1]
