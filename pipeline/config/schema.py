"""The run configuration's schema: one frozen dataclass per section.

The long-tail methods' sections (cbdm, oc, diffrop, ...) are not listed here: each method's
options dataclass *is* its section, and `Config` takes them from the method registry
(models/methods/registry.py), so a new method's knobs appear in YAML, `--set`, validation and
the Tune space checks without this file naming it. `use_gpu: auto` (every section that places
work) uses GPUs when the Ray cluster has them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from models.methods.registry import sections as method_sections
from pipeline.config.classify import ClassifyConfig

STAGES = ("data", "train", "sample", "evaluate", "classify", "report")
SAMPLE_PLANS = ("balanced", "fill", "counts")
REPO_ROOT = Path(__file__).resolve().parents[2]
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
    lr_schedule: str = "constant"  # constant (the papers) | cosine | linear: to 0 over the last decay_fraction
    decay_fraction: float = 0.3
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_warmup: bool = True
    p_uncond: float = 0.1
    hflip: bool = False
    bf16: Union[bool, str] = "auto"  # auto: bf16 where the device has bf16 kernels (models/precision.py)
    channels_last: Optional[bool] = None  # None = per device (on for CUDA)
    num_workers: int = 1
    use_gpu: Union[bool, str] = "auto"  # auto: GPUs when the cluster has them | true (must have) | false
    cpus_per_worker: float = 1.0  # fractions let small CPU runs leave cores to Ray Data
    torch_threads: Optional[int] = None  # None = cpus_per_worker
    log_every: int = 50
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    max_failures: int = 1
    init_from: Optional[str] = None  # fine-tune: a method of this run (e.g. ddpm) or a model.pt path
    finetune_steps: Optional[int] = None  # steps of the methods initialised from init_from (None = steps)
    finetune_lr: Optional[float] = None  # their learning rate (None = lr); CBDM's released schedule: 2e-4


@dataclass(frozen=True)
class SampleConfig:
    """Generation on a Ray Data actor pool from the EMA weights."""

    plan: str = "balanced"  # balanced: per_class each | fill: up to n_max | counts: explicit
    per_class: int = 10
    counts: Optional[tuple] = None  # plan=counts: one count per class, label order
    sampler: str = "ddim"  # models/diffusion/samplers.py: ddim | ddpm | dpmpp_2m | unipc | euler_a
    steps: int = 50  # sampler steps (ddpm visits all T)
    eta: float = 0.0
    omega: float = 1.0  # guidance ω in (1+ω)·ε(x,y) − ω·ε(x,∅), for every method not in omega_by_method
    omega_by_method: tuple = ()  # a method's own ω, YAML {ddpm: 3.0} (kept as sorted (method, ω) pairs)
    guidance_scale: Optional[float] = None  # a method's sampling-time guidance (DiffRC's s); None = its own
    guidance_norm: str = "rms"  # how the guidance gradient is normalised (Eq. 13's ∇̂): rms (unit RMS per image) | l2 (unit norm)
    clip_x0: Optional[bool] = None  # None = the sampler's default
    batch_size: int = 50
    num_actors: int = 1  # one per GPU (use_gpu) or CPU slot
    use_gpu: Union[bool, str] = "auto"
    bf16: Union[bool, str] = "auto"  # auto: as train.bf16
    compile: Union[bool, str] = False  # torch.compile the network (opt-in; auto: fp32 CPU actors with a large share, devices.resolve_compile)
    grid_per_class: int = 10

    def omega_for(self, method: str) -> float:
        """The guidance ω that `method` samples with: its own entry in omega_by_method, else omega."""
        return float(dict(self.omega_by_method).get(method, self.omega))

    def omega_label(self) -> str:
        """"2" or "2 (ddpm 3)": the default ω and the methods' own."""
        own = ", ".join(f"{m} {float(w):g}" for m, w in self.omega_by_method)
        return f"{self.omega:g}" + (f" ({own})" if own else "")

    def for_method(self, method: str) -> "SampleConfig":
        """This section as `method` samples with it: ω resolved, no per-method table left."""
        return dataclasses.replace(self, omega=self.omega_for(method), omega_by_method=())


@dataclass(frozen=True)
class EvalConfig:
    """The evaluation stage: metrics through torch-fidelity on a named feature extractor."""

    extractor: str = "domain"  # domain (trained here on the balanced set) | inception (TF-ported weights)
    weights_path: Optional[str] = None  # inception: local weights (None = torch-fidelity's download)
    domain_epochs: int = 3
    domain_bf16: Union[bool, str] = False  # autocast its training in bfloat16 (auto: where the CPU has bf16 kernels)
    kid_subset_size: int = 1000
    prc_neighborhood: int = 5  # k of improved precision/recall (Kynkäänniemi et al.)
    prd_runs: int = 10
    prd_clusters_per_class: int = 20
    memorization_quantile: float = 0.01  # held-out real images flagged at this rate
    min_per_class: int = 2  # fewer generated images of a class: its FID is n/a
    many_above: int = 100  # the absolute group convention
    few_below: int = 20
    bootstrap: int = 200  # bootstrap replicates for the FID intervals (0 = none)
    use_gpu: Union[bool, str] = "auto"  # feature extraction on a GPU when the driver has one


@dataclass(frozen=True)
class TrackingConfig:
    """Experiment tracking from the workers (pipeline/common/tracking.py)."""

    tensorboard: bool = True  # event files under <run_dir>/tensorboard/<job>/
    mlflow_uri: Optional[str] = None  # e.g. file:///path/mlruns (offline) or http://server:5000
    grid_per_class: int = 4  # the per-class sample grid logged at each diffusion checkpoint (0 = none)
    grid_steps: int = 10  # its sampler steps (dpmpp_2m)


@dataclass(frozen=True)
class StudyConfig:
    """`run.py study` (pipeline/tools/study.py): every method from one shared DDPM, compared with intervals."""

    base: Optional[str] = None  # the shared DDPM: a run name of output_dir or a model.pt (None = train one)
    methods: tuple = ("ddpm", "cbdm", "t2h", "h2t", "oc_full", "diffrop", "cbdm+diffrop", "diffrc_cfg", "rs",
                      "rs_sqrt", "reweight")
    equal_compute: tuple = ("cbdm", "diffrop", "cbdm+diffrop")  # also at finetune_steps / their training cost
    omega_grid: tuple = (0.5, 1.0, 2.0, 3.0)  # ω chosen per model on a held-out set ...
    omega_images: int = 200  # ... of this many images with their own seeds
    classify_top: int = 3  # real + synthetic arms for DDPM and the best methods by few-group FID ...
    classify_always: tuple = ("diffrc_cfg",)  # ... and these whatever their FID (DiffRC's claim is a classifier's)
    results_dir: str = "results/fmnist_lt"


class _ConfigBody:
    """Methods shared by every Config (the dataclass itself is assembled below)."""

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / "runs" / self.name

    def method_options(self) -> dict:
        """Section name -> options instance, for every method section (models.methods.registry)."""
        return {name: getattr(self, name) for name in method_sections()}


_CORE_FIELDS = [
    ("name", str, field(default="fmnist_lt")),
    ("output_dir", str, field(default="outputs")),
    ("storage", Optional[str], field(default=None)),  # a URI holding the durable copy (pipeline/common/storage.py)
    ("seed", int, field(default=0)),
    ("stages", tuple, field(default=STAGES)),
    ("data", DataConfig, field(default_factory=DataConfig)),
    ("resample", ResampleConfig, field(default_factory=ResampleConfig)),
    ("model", ModelConfig, field(default_factory=ModelConfig)),
    ("train", TrainConfig, field(default_factory=TrainConfig)),
    ("sample", SampleConfig, field(default_factory=SampleConfig)),
    ("evaluate", EvalConfig, field(default_factory=EvalConfig)),
    ("classify", ClassifyConfig, field(default_factory=ClassifyConfig)),
    ("tracking", TrackingConfig, field(default_factory=TrackingConfig)),
    ("study", StudyConfig, field(default_factory=StudyConfig)),
]

# A whole run: the core sections plus one section per method options dataclass.
# `pipeline/run.py` resolves it, writes it as JSON, then chains the stages.
Config = dataclasses.make_dataclass(
    "Config", _CORE_FIELDS + [(name, cls, field(default_factory=cls)) for name, cls in method_sections().items()],
    bases=(_ConfigBody,), frozen=True)
Config.__module__ = __name__


def stable_hash(payload: Any) -> str:
    """Short hash of JSON-able data, stable across processes and runs."""
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def config_hash(section: Any, exclude: tuple[str, ...] = ()) -> str:
    """Stable short hash of a config section, for naming artifact folders."""
    return stable_hash({k: v for k, v in dataclasses.asdict(section).items() if k not in exclude})


