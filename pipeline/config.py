"""Run configuration: frozen dataclasses per stage, YAML presets, `--set key=value` overrides.

Every key is checked against the dataclasses, so a typo is an error naming the closest valid
key rather than a silently ignored setting. Validation that needs domain knowledge (dataset
names, profiles, resampling modes) comes from the same registries the stages use.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from models.longtail import PROFILES
from models.resampling import MODES
from pipeline.errors import ConfigError
from pipeline.sources import SOURCES

STAGES = ("data",)
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "fmnist_lt.yaml"


@dataclass(frozen=True)
class DataConfig:
    """Which dataset, how it is made long-tailed, and how it is sharded."""

    dataset: str = "fashion-mnist"
    data_root: Optional[str] = None  # folder with the source files; None = the usual places
    download: bool = True  # fetch through torchvision when the files are missing and online
    profile: str = "exp"
    imb_factor: Optional[float] = 0.01  # n_min / n_max; None keeps imagefolder's own counts
    n_max: Optional[int] = None  # head-class count; None = the smallest class's full count
    class_order: Union[str, tuple, None] = None  # label | reverse | random | list, head first
    seed: int = 0  # LDAM-DRW draws the LT subset with numpy legacy seed 0
    image_size: Optional[int] = None  # imagefolder only: resize + centre-crop to a square
    channels: int = 3  # imagefolder only: 1 (grey) or 3 (RGB)
    on_corrupt: str = "fail"  # imagefolder only: fail | skip (counted in the manifest)
    test_fraction: float = 0.2  # imagefolder without train/ and test/ subfolders
    shard_rows: int = 4096  # rows per Parquet shard


@dataclass(frozen=True)
class ResampleConfig:
    """How the training stream re-weights classes each epoch (models/resampling.py)."""

    mode: str = "none"
    power: float = 1.0  # exponent p for mode `power`: class frequency ∝ n_c ** p
    epoch_size: Optional[int] = None  # rows per epoch; None = the LT split's size
    batch_size: int = 128  # per-worker batch; balanced_batch balances each of these


@dataclass(frozen=True)
class Config:
    """A whole run. `pipeline/run.py` resolves it, writes it as JSON, then chains the stages."""

    name: str = "fmnist_lt"
    output_dir: str = "outputs"
    seed: int = 0
    stages: tuple = STAGES
    data: DataConfig = field(default_factory=DataConfig)
    resample: ResampleConfig = field(default_factory=ResampleConfig)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / "runs" / self.name


def config_hash(section: Any, exclude: tuple[str, ...] = ()) -> str:
    """Stable short hash of a config section, for naming artifact folders."""
    payload = {k: v for k, v in dataclasses.asdict(section).items() if k not in exclude}
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


# ---------------------------------------------------------------------------------------------
# Loading and overriding


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
        _assign(raw, key.strip().split("."), parsed)
    return config_from_dict(raw)


def _assign(tree: dict, keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        node = tree.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {'.'.join(keys)}: {k} is not a section")
        tree = node
    tree[keys[-1]] = value


def config_from_dict(raw: dict) -> Config:
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
        if isinstance(value, (list, tuple)):
            return tuple(value)
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
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


def validate(cfg: Config) -> None:
    """Domain checks, each a one-line error that names the fix."""
    d, r = cfg.data, cfg.resample
    if d.dataset not in SOURCES:
        raise ConfigError(f"unknown dataset {d.dataset!r}: set data.dataset to one of {', '.join(SOURCES)}")
    if d.profile not in PROFILES:
        raise ConfigError(f"unknown imbalance profile {d.profile!r}: set data.profile to one of {', '.join(PROFILES)}")
    if d.imb_factor is None and d.dataset != "imagefolder":
        raise ConfigError(f"data.imb_factor is required for {d.dataset}: use a value in (0, 1], 1 = balanced")
    if d.imb_factor is not None and not 0.0 < d.imb_factor <= 1.0:
        raise ConfigError(
            f"data.imb_factor={d.imb_factor} is outside (0, 1]: it is n_min / n_max, e.g. 0.01 for 100:1"
        )
    if d.n_max is not None and d.n_max < 1:
        raise ConfigError(f"data.n_max={d.n_max} must be a positive count (or null for the default)")
    if d.on_corrupt not in ("fail", "skip"):
        raise ConfigError(f"data.on_corrupt={d.on_corrupt!r}: use fail or skip")
    if d.channels not in (1, 3):
        raise ConfigError(f"data.channels={d.channels}: use 1 (grey) or 3 (RGB)")
    if d.image_size is not None and (d.dataset != "imagefolder" or d.image_size < 1):
        raise ConfigError("data.image_size resizes imagefolder images only: set it to null for built-in datasets")
    if not 0.0 <= d.test_fraction < 1.0:
        raise ConfigError(f"data.test_fraction={d.test_fraction} must be in [0, 1)")
    if d.shard_rows < 1:
        raise ConfigError(f"data.shard_rows={d.shard_rows} must be positive")
    if r.mode not in MODES:
        raise ConfigError(f"unknown resample mode {r.mode!r}: set resample.mode to one of {', '.join(MODES)}")
    if r.batch_size < 1 or (r.epoch_size is not None and r.epoch_size < 1):
        raise ConfigError("resample.batch_size and resample.epoch_size must be positive")
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage(s) {', '.join(unknown)}: choose from {', '.join(STAGES)}")
    if not cfg.name or "/" in cfg.name:
        raise ConfigError(f"run name {cfg.name!r} must be a non-empty folder name without '/'")
