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
from models.methods import METHODS, get_method
from models.resampling import MODES
from models.sampling import SAMPLERS
from models.schedule import SCHEDULES
from models.unet import COND_DROP_MODES, PRESETS as MODEL_PRESETS
from pipeline.config_classify import ClassifyConfig, validate_classify
from pipeline.config_methods import CBDMConfig, DiffROPConfig, OCConfig, ReweightConfig, method_options
from pipeline.errors import ConfigError
from pipeline.sources import SOURCES

STAGES = ("data", "train", "sample", "evaluate", "classify", "report")
SAMPLE_PLANS = ("balanced", "fill", "counts")
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
class ModelConfig:
    """The denoiser and its noise schedule (models/unet.py, models/schedule.py)."""

    preset: str = "small"  # small | cifar (the DDPM CIFAR-10 network, 35.7M)
    image_size: int = 32  # training resolution; smaller images are padded (value −1), samples cropped back
    dropout: Optional[float] = None  # None = the preset's (0.1)
    cond_drop: str = "sample"  # CFG label dropout: sample (learned null class) | batch (released code)
    schedule: str = "linear"
    timesteps: int = 1000


@dataclass(frozen=True)
class TrainConfig:
    """One Ray Train run per method; hyper-parameters as models/training.py's TrainHParams."""

    methods: tuple = ("ddpm",)
    steps: int = 1500
    batch_size: int = 64  # global: split evenly over the workers
    lr: float = 1e-3
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_warmup: bool = True
    p_uncond: float = 0.1
    hflip: bool = False
    bf16: bool = True
    channels_last: bool = False
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0  # fractions let small CPU runs leave cores to Ray Data
    torch_threads: Optional[int] = None  # None = cpus_per_worker
    log_every: int = 50
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    max_failures: int = 1
    init_from: Optional[str] = None  # fine-tune: a method of this run (e.g. ddpm) or a model.pt path
    finetune_steps: Optional[int] = None  # steps of the methods initialised from init_from (None = steps)


@dataclass(frozen=True)
class SampleConfig:
    """Generation on a Ray Data actor pool from the EMA weights."""

    plan: str = "balanced"  # balanced: per_class each | fill: up to n_max | counts: explicit
    per_class: int = 10
    counts: Optional[tuple] = None  # plan=counts: one count per class, label order
    sampler: str = "ddim"  # ddim | ddpm (ancestral, all T steps)
    steps: int = 50  # DDIM steps
    eta: float = 0.0
    omega: float = 1.0  # guidance ω in (1+ω)·ε(x,y) − ω·ε(x,∅)
    clip_x0: Optional[bool] = None  # None = the sampler's default
    batch_size: int = 50
    num_actors: int = 1  # one per GPU (use_gpu) or CPU slot
    use_gpu: bool = False
    bf16: bool = True
    grid_per_class: int = 10


@dataclass(frozen=True)
class EvalConfig:
    """The evaluation stage: metrics through torch-fidelity on a named feature extractor."""

    extractor: str = "domain"  # domain (trained here on the balanced set) | inception (TF-ported weights)
    weights_path: Optional[str] = None  # inception: local weights (None = torch-fidelity's download)
    domain_epochs: int = 3
    kid_subset_size: int = 1000
    prc_neighborhood: int = 5  # k of improved precision/recall (Kynkäänniemi et al.)
    prd_runs: int = 10
    prd_clusters_per_class: int = 20
    memorization_quantile: float = 0.01  # held-out real images flagged at this rate
    min_per_class: int = 2  # fewer generated images of a class: its FID is n/a
    many_above: int = 100  # the absolute group convention
    few_below: int = 20


@dataclass(frozen=True)
class Config:
    """A whole run. `pipeline/run.py` resolves it, writes it as JSON, then chains the stages."""

    name: str = "fmnist_lt"
    output_dir: str = "outputs"
    seed: int = 0
    stages: tuple = STAGES
    data: DataConfig = field(default_factory=DataConfig)
    resample: ResampleConfig = field(default_factory=ResampleConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    cbdm: CBDMConfig = field(default_factory=CBDMConfig)
    oc: OCConfig = field(default_factory=OCConfig)
    diffrop: DiffROPConfig = field(default_factory=DiffROPConfig)
    reweight: ReweightConfig = field(default_factory=ReweightConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / "runs" / self.name


def stable_hash(payload: Any) -> str:
    """Short hash of JSON-able data, stable across processes and runs."""
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def config_hash(section: Any, exclude: tuple[str, ...] = ()) -> str:
    """Stable short hash of a config section, for naming artifact folders."""
    return stable_hash({k: v for k, v in dataclasses.asdict(section).items() if k not in exclude})


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


RENAMED = {("classify", "synthetic_recipe"): ("synthetic_recipes", lambda v: [v])}  # old key: (new key, value map)


def config_from_dict(raw: dict) -> Config:
    """Build and validate a Config; keys renamed since a config (or checkpoint) was written are upgraded."""
    raw = _upgrade(raw)
    cfg = _build(Config, raw, prefix="")
    validate(cfg)
    return cfg


def _upgrade(raw: dict) -> dict:
    if not isinstance(raw, dict):
        return raw
    raw = dict(raw)
    for (section, old), (new, convert) in RENAMED.items():
        body = raw.get(section)
        if isinstance(body, dict) and old in body and new not in body:
            body = dict(body)
            body[new] = convert(body.pop(old))
            raw[section] = body
    return raw


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
    _validate_model_train_sample(cfg)
    validate_classify(cfg.classify, cfg.train.methods)
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage(s) {', '.join(unknown)}: choose from {', '.join(STAGES)}")
    if not cfg.name or "/" in cfg.name:
        raise ConfigError(f"run name {cfg.name!r} must be a non-empty folder name without '/'")


def _validate_model_train_sample(cfg: Config) -> None:
    m, t, s = cfg.model, cfg.train, cfg.sample
    if m.preset not in MODEL_PRESETS:
        raise ConfigError(f"unknown model.preset {m.preset!r}: use one of {', '.join(MODEL_PRESETS)}")
    if m.cond_drop not in COND_DROP_MODES:
        raise ConfigError(f"model.cond_drop={m.cond_drop!r}: use one of {', '.join(COND_DROP_MODES)}")
    if m.schedule not in SCHEDULES:
        raise ConfigError(f"unknown model.schedule {m.schedule!r}: use one of {', '.join(SCHEDULES)}")
    if m.image_size < 4 or m.timesteps < 2:
        raise ConfigError("model.image_size must be >= 4 and model.timesteps >= 2")
    if not t.methods:
        raise ConfigError(f"train.methods is empty: choose from {', '.join(METHODS)} (combine with '+')")
    try:
        for name in t.methods:
            get_method(name)
        method_options(cfg).validate()
    except ValueError as exc:
        raise ConfigError(f"{exc} (train.methods / the cbdm, oc, diffrop sections)") from None
    if t.init_from and t.init_from in METHODS and t.init_from not in t.methods:
        raise ConfigError(f"train.init_from={t.init_from} names a method this run does not train: add it to "
                          "train.methods before the fine-tuned one, or give a model.pt path")
    if t.cpus_per_worker <= 0:
        raise ConfigError(f"train.cpus_per_worker={t.cpus_per_worker} must be positive")
    for key in ("steps", "batch_size", "num_workers", "log_every", "checkpoint_every", "keep_checkpoints"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key}={getattr(t, key)} must be positive")
    if t.batch_size % t.num_workers:
        raise ConfigError(f"train.batch_size={t.batch_size} must divide evenly over train.num_workers={t.num_workers}")
    if not 0.0 <= t.p_uncond < 1.0 or t.lr <= 0 or not 0.0 <= t.ema_decay < 1.0:
        raise ConfigError("train.p_uncond and train.ema_decay must be in [0, 1), train.lr positive")
    if s.plan not in SAMPLE_PLANS:
        raise ConfigError(f"unknown sample.plan {s.plan!r}: use one of {', '.join(SAMPLE_PLANS)}")
    if s.plan == "counts" and not s.counts:
        raise ConfigError("sample.plan=counts needs sample.counts=[n_0, n_1, ...] (one per class)")
    if s.sampler not in SAMPLERS:
        raise ConfigError(f"unknown sample.sampler {s.sampler!r}: use one of {', '.join(SAMPLERS)}")
    if not 1 <= s.steps <= m.timesteps:
        raise ConfigError(f"sample.steps={s.steps} must be in [1, model.timesteps={m.timesteps}]")
    if s.batch_size < 1 or s.num_actors < 1 or s.per_class < 0 or s.omega < 0:
        raise ConfigError("sample.batch_size and sample.num_actors must be positive, per_class and omega >= 0")
    if t.finetune_steps is not None and t.finetune_steps < 1:
        raise ConfigError(f"train.finetune_steps={t.finetune_steps} must be positive (or null for train.steps)")
    e = cfg.evaluate
    if e.extractor not in ("domain", "inception"):
        raise ConfigError(f"unknown evaluate.extractor {e.extractor!r}: use domain or inception")
    if not 0.0 < e.memorization_quantile < 1.0 or e.min_per_class < 2 or e.kid_subset_size < 2:
        raise ConfigError("evaluate.memorization_quantile must be in (0, 1), min_per_class and kid_subset_size >= 2")
