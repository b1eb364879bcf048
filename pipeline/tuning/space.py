"""Tune search spaces: the YAML files in tune_spaces/, validated against the config schema and
the method registry, turned into Ray Tune domains or into concrete points.

A space file:
  method: cbdm              # a models.methods.registry.METHODS name ('+' combinations allowed)
  kind: train               # train: one training run per trial | sample: ω / DDIM steps on a checkpoint
  metric: fid               # mode: min
  num_samples: 8            # random draws (each grid combination is repeated this often)
  scheduler: {type: asha, grace_period: 500, reduction_factor: 2}   # time in train steps
  proxy: {images: 200, steps: 10, omega: 1.0}                       # the per-checkpoint FID
  images: 500               # sample sweeps: images per point
  space:
    cbdm.tau: {loguniform: [0.1, 10]}
    cbdm.label_set: {choice: [train, balanced, sqrt]}
Distributions: loguniform / uniform [lo, hi], randint [lo, hi) , choice [...], grid [...].
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from models.methods.registry import METHODS, method_parts, used_sections
from pipeline.config import Config, assign_key, config_from_dict
from pipeline.errors import ConfigError

DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice", "grid")
KINDS = ("train", "sample")
TOP_KEYS = ("method", "kind", "metric", "mode", "num_samples", "scheduler", "proxy", "images", "space",
            "description")
PROXY_DEFAULTS = {"images": 200, "steps": 10, "omega": 1.0, "batch_size": 100}
SCHEDULER_DEFAULTS = {"type": "asha", "grace_period": None, "reduction_factor": 2}


@dataclass(frozen=True)
class SearchSpace:
    name: str
    method: str
    kind: str
    space: dict  # dotted config key -> {distribution: args}
    metric: str = "fid"
    mode: str = "min"
    num_samples: int = 1
    scheduler: dict | None = None
    proxy: dict = field(default_factory=lambda: dict(PROXY_DEFAULTS))
    images: int = 500  # sample sweeps: images per point (class-balanced)

    def grid_keys(self) -> list[str]:
        return [k for k, d in self.space.items() if _dist(d)[0] == "grid"]


def _dist(spec: Any) -> tuple[str, Any]:
    if isinstance(spec, dict) and len(spec) == 1:
        (name, args), = spec.items()
        return name, args
    return "const", spec


def load_space(path: str | Path, base: Config | None = None) -> SearchSpace:
    """Read and validate a space file; `base` (default: the default preset) checks sampled points."""
    path = Path(path)
    if not path.is_file():
        known = ", ".join(sorted(p.name for p in Path(__file__).resolve().parent.parent.glob("tune_spaces/*.yaml")))
        raise ConfigError(f"search space {path} not found: pass --space tune_spaces/<file> ({known})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"search space {path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"search space {path} must be a mapping (method, kind, space, ...)")
    unknown = [k for k in raw if k not in TOP_KEYS]
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(TOP_KEYS)}")
    kind = raw.get("kind", "train")
    if kind not in KINDS:
        raise ConfigError(f"{path}: kind={kind!r}: use train or sample")
    if raw.get("mode", "min") not in ("min", "max"):
        raise ConfigError(f"{path}: mode must be min or max")
    if not isinstance(raw.get("space"), dict) or not raw["space"]:
        raise ConfigError(f"{path}: `space` must map dotted config keys (e.g. cbdm.tau) to distributions")
    scheduler = None
    if raw.get("scheduler"):
        scheduler = {**SCHEDULER_DEFAULTS, **raw["scheduler"]}
        if scheduler["type"] != "asha" or set(scheduler) - set(SCHEDULER_DEFAULTS):
            raise ConfigError(f"{path}: scheduler supports type: asha with grace_period and reduction_factor")
    proxy = {**PROXY_DEFAULTS, **(raw.get("proxy") or {})}
    if set(proxy) - set(PROXY_DEFAULTS):
        raise ConfigError(f"{path}: proxy keys are {', '.join(PROXY_DEFAULTS)}")
    space = SearchSpace(name=path.stem, method=str(raw.get("method", "ddpm")), kind=kind, space=raw["space"],
                        metric=raw.get("metric", "fid"), mode=raw.get("mode", "min"),
                        num_samples=int(raw.get("num_samples", 1)), scheduler=scheduler, proxy=proxy,
                        images=int(raw.get("images", 500)))
    validate_space(space, base, where=str(path))
    return space


def validate_space(space: SearchSpace, base: Config | None = None, where: str = "space") -> None:
    """Every key exists in the config schema and matters for the method; every draw is a valid config."""
    try:
        method_parts(space.method)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if space.num_samples < 1:
        raise ConfigError(f"{where}: num_samples must be >= 1")
    for key, spec in space.space.items():
        name, args = _dist(spec)
        if name not in DISTRIBUTIONS:
            raise ConfigError(f"{where}: {key} must be {{one of {', '.join(DISTRIBUTIONS)}: ...}}, got {spec!r}")
        ok = isinstance(args, list) and args and (len(args) == 2 if name in ("loguniform", "uniform", "randint")
                                                  else True)
        if not ok or (name == "loguniform" and min(args) <= 0):
            raise ConfigError(f"{where}: {key}: {name} needs a list ([lo, hi] for ranges, lo > 0 for loguniform)")
        section = key.split(".")[0]
        if space.kind == "sample" and section != "sample":
            raise ConfigError(f"{where}: {key}: a sample sweep varies only sample.* keys (no retraining)")
        if space.kind == "train" and section in ("data", "sample", "evaluate", "name", "output_dir", "stages"):
            raise ConfigError(f"{where}: {key}: a training sweep shares one dataset and evaluation: "
                              "vary train/model/method keys only")
    base = base or _default_base()
    points = sample_points(space, max(space.num_samples, 3), seed=0)
    for key, spec in space.space.items():  # every listed value, not only the ones drawn
        if _dist(spec)[0] in ("choice", "grid"):
            points += [{**points[0], key: value} for value in _dist(spec)[1]]
    for point in points:
        cfg = point_config(base, space, point)
        method_sections = set(cfg.method_options())  # every method section of the registry
        for method in cfg.train.methods:
            used = used_sections(method)
            for key in point:
                section = key.split(".")[0]
                if section in method_sections and section not in used:
                    raise ConfigError(f"{where}: {key} has no effect on method {method}: drop it or change `method`")


def _default_base() -> Config:
    from pipeline.config import load_config

    return load_config()


def point_config(base: Config, space: SearchSpace, point: dict, **top: Any) -> Config:
    """base + the space's method + a point (dotted key -> value) + top-level keys, validated."""
    raw = copy.deepcopy(base.to_dict())
    for key, value in {**point, **top}.items():
        assign_key(raw, key.split("."), value)
    if "sample.omega" in point and "sample.omega_by_method" not in point:  # a swept ω holds for every method
        raw["sample"]["omega_by_method"] = {}
    if space.kind == "train":  # a trial trains one method; fine-tuning starts from the base run's model
        methods = point.get("train.methods", space.method)
        raw["train"]["methods"] = [methods] if isinstance(methods, str) else list(methods)
        init = raw["train"].get("init_from")
        if init in METHODS and init not in raw["train"]["methods"]:
            raw["train"]["init_from"] = str((base.run_dir / "train" / init / "model.pt").resolve())
    try:
        return config_from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"search space {space.name}, point {point}: {exc}") from None


def tune_param_space(space: SearchSpace) -> dict:
    """The space as Ray Tune domains (flat dict of dotted keys)."""
    from ray import tune

    make = {"loguniform": lambda a: tune.loguniform(*a), "uniform": lambda a: tune.uniform(*a),
            "randint": lambda a: tune.randint(*a), "choice": tune.choice, "grid": tune.grid_search}
    return {key: make[_dist(spec)[0]](_dist(spec)[1]) for key, spec in space.space.items()}


def sample_points(space: SearchSpace, n: int | None = None, seed: int = 0) -> list[dict]:
    """Concrete points: the grid's cartesian product × n random draws of the other keys."""
    rng = np.random.default_rng(seed)
    n = space.num_samples if n is None else n
    grid = space.grid_keys()
    combos = list(itertools.product(*[_dist(space.space[k])[1] for k in grid])) or [()]
    points = []
    for _ in range(n):
        for combo in combos:
            point = dict(zip(grid, combo))
            for key, spec in space.space.items():
                if key not in point:
                    point[key] = _draw(*_dist(spec), rng)
            points.append(point)
    return points


def _draw(name: str, args: list, rng: np.random.Generator) -> Any:
    if name == "loguniform":
        return float(np.exp(rng.uniform(np.log(args[0]), np.log(args[1]))))
    if name == "uniform":
        return float(rng.uniform(args[0], args[1]))
    if name == "randint":
        return int(rng.integers(args[0], args[1]))
    return args[int(rng.integers(len(args)))]  # choice
