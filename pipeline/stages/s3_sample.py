"""Sample stage: the evaluation set of every trained method, generated on a Ray Data actor pool
(pipeline/common/generation.py) with the sample section's sampler, steps and guidance.

`sample.plan`: `balanced` (`per_class` of every class: what FID against the balanced reference
needs), `fill` (every class up to the head count) or `counts` (explicit). Every method's image k of class c starts from the same noise (seed tag
"eval"), so two methods' sets are paired. Output:
samples/<method>/images/*.parquet (image, label, k, seed), grid.png, manifest.json.
"""
from __future__ import annotations

from pipeline.common.artifacts import DatasetArtifact, ModelArtifact, SampleArtifact
from pipeline.common.devices import cluster_gpus, resolve_use_gpu
from pipeline.common.generation import generate_set
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
    use_gpu = resolve_use_gpu(cfg.sample.use_gpu, cluster_gpus(), "sample")
    counts = plan_counts(cfg, data.manifest)
    return {method: generate_set(cfg, data, art, counts, folder=method, seed_tag="eval", use_gpu=use_gpu)
            for method, art in models.items()}
