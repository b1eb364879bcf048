"""Sample stage: the evaluation set of every trained method, generated on a Ray Data actor pool
(pipeline/common/generation.py; one pool for all the stage's sets) with the sample section's sampler,
steps and guidance.

`sample.plan`: `balanced` (`per_class` of every class: what FID against the balanced reference
needs), `fill` (every class up to the head count) or `counts` (explicit). Every method's image k of class c starts from the same noise (seed tag
"eval"), so two methods' sets are paired. Output:
samples/<method>/images/*.parquet (image, label, k, seed), grid.png, manifest.json.

Companion grids (`sample.grid_per_class` images per class, the same noise as the first images of
the evaluation set, shown in the report beside the method's own grid): for a method trained from a
source model (DiffRC) `samples/<method>-source/`, the frozen source; for a method with a
sampling-time guidance (DiffRC, pcg) `samples/<method>-unguided/`, the same model with s = 0.
They are not evaluated.
"""
from __future__ import annotations

import dataclasses
import json

from pipeline.common.artifacts import DatasetArtifact, ModelArtifact, SampleArtifact
from pipeline.common.devices import cluster_gpus, resolve_use_gpu
from pipeline.common.generation import SetRequest, generate_sets
from pipeline.config import Config
from pipeline.errors import ConfigError


def plan_counts(cfg: Config, manifest: dict) -> list[int]:
    """Images to generate per class (label order) for the configured plan."""
    s, counts = cfg.sample, manifest["class_counts"]
    if s.plan == "balanced":
        return [s.per_class] * len(counts)
    if s.plan == "fill":  # what augmentation needs: every class up to the head count
        return [max(counts) - n for n in counts]
    if len(s.counts) != len(counts):
        raise ConfigError(f"sample.counts has {len(s.counts)} entries but the dataset has {len(counts)} classes")
    return [int(c) for c in s.counts]


def run_sample(cfg: Config, data: DatasetArtifact, models: dict[str, ModelArtifact]) -> dict[str, SampleArtifact]:
    """Every method's evaluation set and the companion grids, in one pipeline on one actor pool."""
    use_gpu = resolve_use_gpu(cfg.sample.use_gpu, cluster_gpus(), "sample")
    counts = plan_counts(cfg, data.manifest)
    evaluation = [SetRequest(cfg, art, counts, folder=method, seed_tag="eval") for method, art in models.items()]
    sets = generate_sets(data, evaluation + companion_requests(cfg, data, models), use_gpu)
    return {method: sets[method] for method in models}


def companion_requests(cfg: Config, data: DatasetArtifact, models: dict[str, ModelArtifact]) -> list[SetRequest]:
    """The source model's and the unguided model's grids of the methods that have them (above)."""
    from models.methods.registry import method_needs

    per_class = [cfg.sample.grid_per_class] * len(data.manifest["class_counts"])
    out = []
    if cfg.sample.grid_per_class < 1:
        return out
    for method, art in models.items():
        needs = method_needs(method, cfg.method_options())
        source = cfg.run_dir / "train" / f"{method}-source"
        if needs.source_model and (source / "manifest.json").is_file() and (source / "model.pt").is_file():
            metrics = json.loads((source / "manifest.json").read_text()).get("metrics", {})
            out.append(SetRequest(cfg, ModelArtifact(f"{method}-source", source, metrics, True), per_class,
                                  folder=f"{method}-source", seed_tag="eval"))
        if needs.guidance and (cfg.sample.guidance_scale is None or cfg.sample.guidance_scale > 0):
            plain = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, guidance_scale=0.0))
            out.append(SetRequest(plain, art, per_class, folder=f"{method}-unguided", seed_tag="eval"))
    return out
