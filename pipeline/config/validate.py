"""Validation of a whole run configuration: domain checks, each a one-line error naming the fix.

Names come from the registries the stages use (datasets, profiles, resampling modes, samplers,
model presets, methods), so what validates here is what the stages can run.
"""
from __future__ import annotations

from models.data.longtail import PROFILES
from models.data.resampling import MODES
from models.diffusion.samplers import SAMPLERS
from models.diffusion.schedule import SCHEDULES
from models.diffusion.unet import COND_DROP_MODES, PRESETS as MODEL_PRESETS
from models.precision import BF16_SETTINGS
from models.methods.registry import METHODS, validate_method
from pipeline.common.devices import COMPILE_SETTINGS
from pipeline.config.classify import validate_classify
from pipeline.config.schema import SAMPLE_PLANS, STAGES
from pipeline.errors import ConfigError
from pipeline.sources import SOURCES

STORAGE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "file", "local", "mock")


def validate(cfg) -> None:
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
    if cfg.storage is not None:
        scheme = cfg.storage.split("://", 1)[0] if "://" in cfg.storage else ""
        if scheme not in STORAGE_SCHEMES:
            raise ConfigError(f"storage={cfg.storage!r} is not a filesystem URI: give s3://bucket/prefix, "
                              "gs://bucket/prefix, hdfs://host/path or file:///absolute/path (or leave it null)")
    if not cfg.name or "/" in cfg.name:
        raise ConfigError(f"run name {cfg.name!r} must be a non-empty folder name without '/'")


def _validate_model_train_sample(cfg) -> None:
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
    options = cfg.method_options()
    for section, opts in options.items():  # every section, also of methods this run does not train
        try:
            opts.validate()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    for name in t.methods:
        try:
            validate_method(name, options)
        except ValueError as exc:
            raise ConfigError(f"{exc} (train.methods, or that method's config section)") from None
    if t.init_from and t.init_from in METHODS and t.init_from not in t.methods:
        raise ConfigError(f"train.init_from={t.init_from} names a method this run does not train: add it to "
                          "train.methods before the fine-tuned one, or give a model.pt path")
    from models.diffusion.training import LR_SCHEDULES

    if t.lr_schedule not in LR_SCHEDULES or not 0.0 < t.decay_fraction <= 1.0:
        raise ConfigError(f"train.lr_schedule={t.lr_schedule!r} / decay_fraction={t.decay_fraction}: use one of "
                          f"{', '.join(LR_SCHEDULES)} and a fraction in (0, 1]")
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
    if s.guidance_norm not in ("rms", "l2"):
        raise ConfigError(f"sample.guidance_norm={s.guidance_norm!r}: use rms (unit RMS per image) or l2 (unit norm)")
    if s.eta and s.sampler != "ddim":
        raise ConfigError(f"sample.eta={s.eta} is DDIM's noise level: set sample.eta=0 for the {s.sampler} sampler")
    for section in ("train", "sample", "evaluate", "classify"):
        if getattr(cfg, section).use_gpu not in (True, False, "auto"):
            raise ConfigError(f"{section}.use_gpu={getattr(cfg, section).use_gpu!r}: use auto, true or false")
        if getattr(getattr(cfg, section), "bf16", False) not in BF16_SETTINGS:
            raise ConfigError(f"{section}.bf16={getattr(cfg, section).bf16!r}: use auto, true or false")
    if cfg.sample.compile not in COMPILE_SETTINGS:
        raise ConfigError(f"sample.compile={cfg.sample.compile!r}: use auto, true or false")
    if cfg.evaluate.domain_bf16 not in BF16_SETTINGS:
        raise ConfigError(f"evaluate.domain_bf16={cfg.evaluate.domain_bf16!r}: use auto, true or false")
    if s.batch_size < 1 or s.num_actors < 1 or s.per_class < 0 or s.omega < 0:
        raise ConfigError("sample.batch_size and sample.num_actors must be positive, per_class and omega >= 0")
    for pair in s.omega_by_method:
        if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[1], (int, float))
                and not isinstance(pair[1], bool) and pair[1] >= 0):
            raise ConfigError(f"sample.omega_by_method entry {pair!r}: give a mapping of method to ω >= 0, "
                              "e.g. sample.omega_by_method={ddpm: 3.0}")
        try:
            validate_method(pair[0], cfg.method_options())
        except ValueError as exc:
            raise ConfigError(f"sample.omega_by_method: {exc}") from None
    if t.finetune_lr is not None and t.finetune_lr <= 0:
        raise ConfigError(f"train.finetune_lr={t.finetune_lr} must be positive (or null for train.lr)")
    if t.finetune_steps is not None and t.finetune_steps < 1:
        raise ConfigError(f"train.finetune_steps={t.finetune_steps} must be positive (or null for train.steps)")
    e = cfg.evaluate
    if e.extractor not in ("domain", "inception"):
        raise ConfigError(f"unknown evaluate.extractor {e.extractor!r}: use domain or inception")
    if not 0.0 < e.memorization_quantile < 1.0 or e.min_per_class < 2 or e.kid_subset_size < 2:
        raise ConfigError("evaluate.memorization_quantile must be in (0, 1), min_per_class and kid_subset_size >= 2")
