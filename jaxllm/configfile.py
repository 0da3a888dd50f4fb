"""Run configs: nested dataclasses filled from YAML plus `section.key=value` overrides.

Every key is checked: an unknown one is an error that lists the valid keys, so a typo never
silently trains with a default.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any

import yaml

INT_MIN, INT_MAX = -2 ** 63, 2 ** 63 - 1   # what NumPy and JAX take as an integer (a seed, a size)
# What yaml.safe_load raises on text it cannot read: YAMLError, and from its constructors ValueError
# ("!!int x", an integer of over 4,300 digits), AttributeError ("!!timestamp x"), OverflowError,
# TypeError; RecursionError for deeply nested collections.
YAML_ERRORS = (yaml.YAMLError, ValueError, TypeError, AttributeError, OverflowError, RecursionError)


def _fields(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def valid_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    for name, tp in _fields(cls).items():
        if dataclasses.is_dataclass(tp):
            keys += valid_keys(tp, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key) if len(inner) == 1 else value
    try:
        if tp is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            if isinstance(value, bool):
                return value
            raise ValueError
        if tp is int:
            if isinstance(value, bool):
                raise ValueError
            number = value
            if not isinstance(value, int):  # "1e3", 100.0 (an int is taken as it is: no float rounding)
                f = float(value)
                if f != int(f):
                    raise ValueError
                number = int(f)
            if not INT_MIN <= number <= INT_MAX:
                raise OverflowError
            return number
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)  # also accepts YAML 1.1 strings like "1e-3"
        if tp is str:
            return str(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf), float(10**400), out of range
        whole = f" (a whole number from {INT_MIN} to {INT_MAX})" if tp is int else ""
        raise ValueError(
            f"config key {key!r}: cannot use {value!r} as {getattr(tp, '__name__', tp)}{whole}") from None
    return value


def from_dict(cls, data: dict[str, Any], prefix: str = ""):
    if not isinstance(data, dict):
        raise ValueError(f"config section {prefix.rstrip('.') or '<top>'} must be a mapping, got {data!r}")
    fields = _fields(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ValueError(
            f"unknown config key(s) {[f'{prefix}{k}' for k in unknown]}; valid keys: "
            + ", ".join(valid_keys(cls, prefix)))
    kwargs = {}
    for name, value in data.items():
        tp = fields[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, prefix + name)
    return cls(**kwargs)


def to_dict(config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = _merge({}, data)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value (e.g. train.max_iters=100)")
        dotted, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except YAML_ERRORS as e:
            raise ValueError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(e)}); "
                             f"quote it to pass it as text, e.g. {dotted.strip()}='\"...\"'") from None
        node = data
        *parents, leaf = dotted.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {p!r} is not a section")
        node[leaf] = value
    return data


def _yaml_problem(e: BaseException) -> str:
    """The one-line gist of a YAML error (its multi-line text points into a one-line string)."""
    problem = getattr(e, "problem", None) or (str(e).splitlines() or [type(e).__name__])[0]
    return f"{getattr(e, 'context', None) + ': ' if getattr(e, 'context', None) else ''}{problem}"


def _known(base: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The keys of `base` that `defaults` also has (a saved config may hold settings since removed)."""
    return {k: _known(v, defaults[k]) if isinstance(v, dict) and isinstance(defaults[k], dict) else v
            for k, v in base.items() if k in defaults}


def load_config(cls, path: str | os.PathLike | None = None, overrides: list[str] = (),
                base: dict[str, Any] | None = None):
    """Defaults of `cls` (updated by `base`, e.g. the settings a run being resumed was started
    with), then the YAML file at `path`, then the overrides, in that order."""
    data: dict[str, Any] = {}
    defaults = to_dict(cls())
    if base:
        defaults = _merge(defaults, _known(base, defaults))
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file {path} does not exist")
        with open(path, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise ValueError(f"config file {path} is not UTF-8 text (byte {e.object[e.start]:#04x} on line "
                             f"{line}: {e.reason}); save it as UTF-8") from None
        try:
            data = yaml.safe_load(text) or {}
        except YAML_ERRORS as e:
            raise ValueError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return from_dict(cls, apply_overrides(_merge(defaults, data), list(overrides)))
