"""Loading a run configuration: YAML presets, `--set key=value` overrides, type checks.

Every key is checked against the schema's dataclasses, so a typo is an error naming the closest
valid key rather than a silently ignored setting; values are coerced to their annotations
(lists become tuples, so configs stay hashable), then the whole config is validated.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from pipeline.config.schema import DEFAULT_CONFIG, REPO_ROOT, Config
from pipeline.config.validate import validate
from pipeline.errors import ConfigError


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML preset, apply `key=value` overrides (values parsed as YAML), validate."""
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        presets = ", ".join(sorted(p.name for p in (REPO_ROOT / "configs").glob("*.yaml")))
        raise ConfigError(f"config file {path} not found: pass --config configs/<preset>.yaml ({presets})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML ({first}): fix the syntax") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must be a mapping of keys to values")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value (e.g. data.imb_factor=0.02), got {item!r}")
        try:
            parsed = yaml.safe_load(value) if value else None
        except yaml.YAMLError:
            parsed = value
        assign_key(raw, key.strip().split("."), parsed)
    return config_from_dict(raw)


def assign_key(tree: dict, keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        node = tree.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {'.'.join(keys)}: {k} is not a section")
        tree = node
    tree[keys[-1]] = value


def config_from_dict(raw: dict) -> Config:
    """Build and validate a Config from nested dicts (a preset, a config.json, a checkpoint's)."""
    cfg = _build(Config, raw, prefix="")
    validate(cfg)
    return cfg


def _build(cls, raw: dict, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<top>'} must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            hint = difflib.get_close_matches(key, fields, n=1)
            did_you_mean = f" (did you mean {prefix}{hint[0]}?)" if hint else ""
            raise ConfigError(
                f"unknown config key {prefix}{key}{did_you_mean}; valid keys here: {', '.join(fields)}"
            )
    kwargs = {}
    hints = typing.get_type_hints(cls)
    for name, value in raw.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value or {}, prefix=f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check a scalar against its annotation; lists become tuples so configs stay hashable."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key} cannot be {value!r}")
    if tp is tuple:
        if isinstance(value, dict):  # a mapping (e.g. sample.omega_by_method): sorted (key, value) pairs
            return tuple(sorted((str(k), v) for k, v in value.items()))
        if isinstance(value, (list, tuple)):  # nested lists (a config.json's pairs) become tuples too
            return tuple(tuple(v) if isinstance(v, list) else v for v in value)
        if isinstance(value, str):  # --set stages=data,train
            return tuple(v.strip() for v in value.split(",") if v.strip())
        raise ConfigError(f"{key} must be a list, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


