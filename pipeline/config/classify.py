"""Config section of the classify stage (models/resnet.py, models/lt_losses.py), re-exported by
pipeline/config.py.

The optimiser and schedule default to the LDAM-DRW CIFAR recipe (SGD momentum 0.9, wd 2e-4,
batch 128, lr 0.1, 200 epochs, 5 warm-up epochs, lr ×0.01 at 160 and ×0.0001 at 180, DRW from
160). Epoch milestones left null scale with `epochs` (160/200 of the run, ...), so a CPU preset
that sets `epochs: 15` keeps the recipe's shape.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from pipeline.errors import ConfigError

SYNTHETIC_PLANS = ("fill", "per_class", "none")


@dataclass(frozen=True)
class ClassifyConfig:
    """ResNet-32 long-tailed classifiers: classifier-only baselines and real + synthetic sets."""

    baselines: tuple = ("ce", "rs", "la", "ldam_drw")  # recipes trained on the real LT split
    methods: Optional[tuple] = None  # diffusion methods whose samples augment (None = train.methods)
    synthetic: str = "fill"  # fill: every class up to fill_to | per_class: +per_class each | none
    fill_to: Optional[int] = None  # fill target per class (None = n_max, the head count)
    per_class: int = 0  # synthetic=per_class: images added to every class
    synthetic_recipes: tuple = ("ce",)  # recipes trained on real + synthetic (baseline names)
    filter_min_confidence: float = 0.0  # >0: keep synthetic images the real-data CE classifier
    #                                     gives p(y | x) >= this; the CE baseline then trains first
    sampler: Optional[str] = None  # generation for augmentation; None = the sample section's
    steps: Optional[int] = None
    omega: Optional[float] = None
    seeds: int = 1  # every arm trains once per seed (arm names get -s1, -s2, ...)
    epochs: int = 200
    batch_size: int = 128  # global, split over the workers
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2e-4
    warmup_epochs: Optional[int] = None  # None = round(5/200 · epochs), at least 1
    decay_epochs: Optional[tuple] = None  # None = (160/200, 180/200) · epochs; lr ×0.01 then ×0.0001
    drw_epoch: Optional[int] = None  # None = the first decay epoch
    lr_schedule: str = "step"  # step: LDAM-DRW's per-epoch schedule above (the paper's) | cosine: per-iteration
    #                            warm-up over warmup_epochs, then a cosine to 0 (steadier last epoch for short runs)
    drw_beta: float = 0.9999  # class-balanced weights (1-β)/(1-β^n_c) from drw_epoch on
    ldam_max_m: float = 0.5
    ldam_s: float = 30.0
    la_tau: float = 1.0  # logit adjustment: logits + τ·log π_y (Menon et al. 2021)
    input_size: int = 32  # the canvas images are centred on (the recipe's 32; 28 = Fashion-MNIST's own)
    augment: bool = True  # RandomCrop(input_size, pad 4) + horizontal flip
    eval_every: int = 1  # test-set evaluation cadence in epochs (the last epoch always)
    bf16: Union[bool, str] = "auto"  # auto: bf16 where the device has bf16 kernels (models/precision.py)
    channels_last: Optional[bool] = None  # None = per device: CUDA or an fp32 CPU (pipeline/common/devices.py)
    num_workers: int = 1
    use_gpu: Union[bool, str] = "auto"  # auto: GPUs when the cluster has them
    cpus_per_worker: float = 1.0
    torch_threads: Optional[int] = None  # None = cpus_per_worker
    keep_checkpoints: int = 1


def validate_classify(c: ClassifyConfig, train_methods: tuple) -> None:
    from models.classify.lt_losses import LR_SCHEDULES, RECIPES
    from models.diffusion.samplers import SAMPLERS

    if not c.synthetic_recipes and c.synthetic != "none":
        raise ConfigError("classify.synthetic_recipes is empty: list at least one recipe (e.g. [ce]) or set "
                          "classify.synthetic=none")
    for name in (*c.baselines, *c.synthetic_recipes):
        if name not in RECIPES:
            raise ConfigError(f"unknown classifier recipe {name!r} (classify.baselines / synthetic_recipes): "
                              f"use one of {', '.join(RECIPES)}")
    if c.methods is not None:
        missing = [m for m in c.methods if m not in train_methods]
        if missing:
            raise ConfigError(f"classify.methods names {', '.join(missing)}, not in train.methods: train it "
                              "first or drop it")
    if c.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"unknown classify.lr_schedule {c.lr_schedule!r}: use one of {', '.join(LR_SCHEDULES)}")
    if c.synthetic not in SYNTHETIC_PLANS:
        raise ConfigError(f"unknown classify.synthetic {c.synthetic!r}: use one of {', '.join(SYNTHETIC_PLANS)}")
    if c.synthetic == "per_class" and c.per_class < 1:
        raise ConfigError("classify.synthetic=per_class needs classify.per_class >= 1 (images added per class)")
    if c.input_size < 8:
        raise ConfigError(f"classify.input_size={c.input_size} is too small for ResNet-32: use the images' size "
                          "or 32")
    if c.sampler is not None and c.sampler not in SAMPLERS:
        raise ConfigError(f"unknown classify.sampler {c.sampler!r}: use one of {', '.join(SAMPLERS)}")
    if not 0.0 <= c.filter_min_confidence < 1.0:
        raise ConfigError(f"classify.filter_min_confidence={c.filter_min_confidence} must be in [0, 1) (0 = off)")
    for key in ("epochs", "batch_size", "num_workers", "eval_every", "keep_checkpoints", "seeds"):
        if getattr(c, key) < 1:
            raise ConfigError(f"classify.{key}={getattr(c, key)} must be positive")
    if c.batch_size % c.num_workers:
        raise ConfigError(f"classify.batch_size={c.batch_size} must divide evenly over classify.num_workers")
    if c.lr <= 0 or c.cpus_per_worker <= 0 or not 0.0 <= c.drw_beta < 1.0:
        raise ConfigError("classify.lr and classify.cpus_per_worker must be positive, drw_beta in [0, 1)")
