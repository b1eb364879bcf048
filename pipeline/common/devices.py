"""`use_gpu: auto | true | false` resolved against the Ray cluster, and the per-device choices.

auto   GPUs when the cluster has any, else CPUs;
true   GPUs, and a cluster without one stops with one line (before any work is placed);
false  CPUs.
The resolved choice (and the precision / memory format / optimiser it implies) is written into
the run's config.json and the report, so a number always says where it was computed. `bf16: auto`
is resolved where the work runs (models/precision.py: bf16 only on a device with bf16 kernels;
on an AVX2-only CPU bf16 autocast is ~10× slower than fp32); the record here is the driver's
answer, which is the workers' on a cluster of one machine kind.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from models.precision import resolve_bf16
from pipeline.errors import ConfigError


def resolve_use_gpu(setting, cluster_gpus: float, what: str) -> bool:
    """The GPU decision of one section. `cluster_gpus`: ray.cluster_resources().get("GPU", 0)."""
    if setting == "auto":
        return cluster_gpus > 0
    if setting is True and cluster_gpus <= 0:
        raise ConfigError(f"{what}.use_gpu=true but the Ray cluster has no GPU: set {what}.use_gpu=auto (or false), "
                          "or start Ray on a machine with GPUs")
    return bool(setting)


@dataclass(frozen=True)
class DeviceChoice:
    """What a section runs with once its device is known."""

    use_gpu: bool
    bf16: bool  # autocast in bfloat16: the section's setting, `auto` resolved by models.precision.native_bf16
    channels_last: bool
    fused_optimizer: bool  # fused Adam / SGD kernels exist on CUDA only

    def as_dict(self) -> dict:
        return asdict(self)


def device_choice(use_gpu: bool, bf16: bool, channels_last: bool | None = None) -> DeviceChoice:
    """channels_last helps convolutions on CUDA tensor cores and did not on the CPUs measured here
    (benchmarks/bench_train.py), so `None` picks it per device; fused optimisers are CUDA-only."""
    return DeviceChoice(use_gpu=use_gpu, bf16=bf16, channels_last=use_gpu if channels_last is None else channels_last,
                        fused_optimizer=use_gpu)


def conv_channels_last(device, bf16: bool) -> bool:
    """NHWC weights (and classifier inputs) for sampling and the classify stage: on CUDA, and on a CPU
    computing in fp32. Measured on a 2-core AVX2-only AMD EPYC, 2 threads: Euler ancestral 15 steps +
    CFG at batch 100 made 1.40x the images per second with images equal to 2e-7
    (benchmarks/bench_sample_layout.py); a ResNet-32 training step 1.19x (242 -> 288 img/s, batch 128,
    28x28; benchmarks/bench_classify.py). Off under CPU bf16 autocast: not measured for sampling, no
    gain for the classifier on the AVX-512 machines. Diffusion training keeps device_choice's rule: on
    the same CPU an NHWC training step was slower (71 vs 83 img/s)."""
    return torch.device(device).type == "cuda" or not bf16


COMPILE_SETTINGS = (True, False, "auto")
# `sample.compile` (default false) wraps the sampling network in torch.compile (inductor). Measured on a
# 2-core AVX2-only AMD EPYC, fp32, 2 threads, the study's DDPM, Euler-a 15 + CFG at batch 100
# (benchmarks/bench_sample_compile.py, 2026-12-07): the network alone 1.37x the images per second (5.79 ->
# 7.75 img/s, 3 interleaved repeats; 1.15-1.17x in a second process), compiling 40 s with an empty inductor
# cache and 2.5 s with a warm one (the on-disk cache is shared by a machine's actors and keyed by the graph,
# not the weights), images equal to 9e-5 (0.017% of uint8 pixels off by one level). Through the sampling
# stage (one Ray Data actor, 1,000 images, one run each) the wall time was 173.5 -> 177.8 s with the cold
# compile and 165.9 -> 152.6 s (1.09x) with a warm one: inside this machine's run-to-run noise, so it is
# not on by default. `auto` compiles an fp32 CPU actor whose share needs at least this many network
# evaluations of one image: the cold compile's break-even measured above (917 images of Euler-a 15 + CFG).
COMPILE_MIN_EVALUATIONS = 30_000


def resolve_compile(setting, device, bf16: bool, evaluations: int) -> bool:
    """`sample.compile` for one sampling actor: `evaluations` = its images x network evaluations per image.
    auto -> on a CPU in fp32 when the actor's share is large enough to repay a cold compile; off on CUDA
    and under CPU bf16 autocast (not measured there: no GPU lent, no bf16 CPU in this session); true /
    false as given."""
    if setting not in COMPILE_SETTINGS:
        raise ValueError(f"compile={setting!r}: use auto, true or false")
    if setting != "auto":
        return bool(setting)
    return torch.device(device).type == "cpu" and not bf16 and evaluations >= COMPILE_MIN_EVALUATIONS


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def resolve_devices(cfg) -> dict:
    """Every section's resolved device choice, for config.json and the report."""
    gpus = cluster_gpus()
    out = {}
    for section in ("train", "sample", "evaluate", "classify"):
        sec = getattr(cfg, section)
        gpu = resolve_use_gpu(sec.use_gpu, gpus, section)
        bf16 = resolve_bf16(getattr(sec, "bf16", False), "cuda" if gpu and torch.cuda.is_available() else "cpu")
        if gpu and not torch.cuda.is_available() and getattr(sec, "bf16", False) == "auto":
            bf16 = True  # the driver has no GPU to ask; the workers resolve auto on theirs (Ampere+: bf16)
        channels = getattr(sec, "channels_last", None) if section in ("train", "classify") else None
        if section == "sample" or (section == "classify" and channels is None):
            channels = conv_channels_last("cuda" if gpu else "cpu", bf16)
        out[section] = device_choice(gpu, bf16, channels).as_dict()
    out["cluster_gpus"] = gpus
    return out
