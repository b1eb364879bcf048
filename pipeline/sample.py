"""Sample stage: class-conditional generation on a Ray Data actor pool from the EMA weights.

Each actor loads the model once (one actor per GPU, or per CPU slot). The plan is a table of
(label, k, seed) rows; every image's noise comes from its own seed, so a sample does not depend
on batch size, actor count or device. Output under the run folder:
  samples/<method>/images/part-NNNNN.parquet   image (H, W, C) uint8, label, k, seed
  samples/<method>/grid.png                    a row per class
  samples/<method>/manifest.json
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.seeding import derive_seed
from pipeline.config import Config, stable_hash
from pipeline.data import DatasetArtifact
from pipeline.errors import ConfigError
from pipeline.train import ModelArtifact

log = logging.getLogger("taildiff.sample")


@dataclass(frozen=True)
class SampleArtifact:
    method: str
    path: Path
    num_images: int
    skipped: bool

    @property
    def images_dir(self) -> Path:
        return self.path / "images"


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


def plan_rows(counts: list[int], seed: int, method: str) -> dict[str, np.ndarray]:
    """(label, k, seed) of every image: image k of class c has seed f(run seed, method, c, k)."""
    labels = np.repeat(np.arange(len(counts)), counts).astype(np.int64)
    ks = np.concatenate([np.arange(n) for n in counts]).astype(np.int64) if counts else np.zeros(0, np.int64)
    seeds = np.array([derive_seed(seed, "sample", method, int(c), int(k)) for c, k in zip(labels, ks)],
                     dtype=np.int64)
    return {"label": labels, "k": ks, "seed": seeds}


class SamplerActor:
    """Holds one model; turns batches of plan rows into uint8 images."""

    def __init__(self, weights: str, sample_cfg: dict, threads: int | None):
        import torch

        from models.sampling import CFGDenoiser
        from pipeline.config import SampleConfig
        from pipeline.train import load_model, make_schedule

        if threads:
            torch.set_num_threads(threads)
        self.cfg = SampleConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in sample_cfg.items()})
        self.device = torch.device("cuda" if self.cfg.use_gpu and torch.cuda.is_available() else "cpu")
        net, run_cfg, manifest = load_model(Path(weights), self.device)
        self.schedule = make_schedule(run_cfg)
        self.size = run_cfg.model.image_size
        self.height, self.width, self.channels = manifest["image_shape"]
        dtype = torch.bfloat16 if self.cfg.bf16 else None
        self.denoiser = CFGDenoiser(net, self.cfg.omega, net.null_label, autocast_dtype=dtype)

    def __call__(self, batch: dict) -> dict:
        import torch

        from models.images import to_uint8_images
        from models.sampling import SAMPLERS, ImageNoise

        noise = ImageNoise(batch["seed"].tolist(), (self.channels, self.size, self.size), self.device)
        y = torch.as_tensor(batch["label"], device=self.device)
        options = {} if self.cfg.clip_x0 is None else {"clip_x0": self.cfg.clip_x0}
        if self.cfg.sampler == "ddim":
            options.update(steps=self.cfg.steps, eta=self.cfg.eta)
        x = SAMPLERS[self.cfg.sampler](self.denoiser, self.schedule, noise, y, **options)
        images = to_uint8_images(x.float(), self.height, self.width).cpu().numpy()  # (b, H, W, C)
        return {"image": images, "label": batch["label"], "k": batch["k"], "seed": batch["seed"]}


def run_sample(cfg: Config, data: DatasetArtifact, models: dict[str, ModelArtifact]) -> dict[str, SampleArtifact]:
    return {method: sample_method(cfg, data, art) for method, art in models.items()}


def sample_key(cfg: Config, model: ModelArtifact, counts: list[int]) -> str:
    return stable_hash({"sample": dataclasses.asdict(cfg.sample), "counts": counts, "seed": cfg.seed,
                        "model_step": model.metrics.get("step"), "model": str(model.weights),
                        "model_mtime": os.path.getmtime(model.weights)})


def sample_method(cfg: Config, data: DatasetArtifact, model: ModelArtifact, *, counts: list[int] | None = None,
                  folder: str | None = None) -> SampleArtifact:
    """Generate `counts` images per class (default: the sample plan) into samples/<folder>/
    (default: the method's name). Per-image seeds depend on the folder, so the augmentation
    set (classify stage) and the evaluation set of one model are different images."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from pipeline.shards import tensor_array

    s = cfg.sample
    counts = plan_counts(cfg, data.manifest) if counts is None else [int(c) for c in counts]
    folder = folder or model.method
    out = (cfg.run_dir / "samples" / folder).resolve()
    key = sample_key(cfg, model, counts)
    manifest_path = out / "manifest.json"
    if manifest_path.is_file() and json.loads(manifest_path.read_text()).get("key") == key:
        log.info("sample[%s]: reusing %s", folder, out)
        return SampleArtifact(model.method, out, sum(counts), skipped=True)

    rows = plan_rows(counts, cfg.seed, folder)
    total = len(rows["label"])
    tmp = out.parent / f".tmp-{folder}-{uuid.uuid4().hex[:8]}"
    (tmp / "images").mkdir(parents=True)
    started = time.perf_counter()
    try:
        if total:
            ds = _plan_dataset(rows, s.batch_size)
            threads = None if s.use_gpu else max(1, int(ray.available_resources().get("CPU", 1)) // s.num_actors)
            images = ds.map_batches(
                SamplerActor,
                fn_constructor_kwargs={"weights": str(model.weights), "sample_cfg": dataclasses.asdict(s),
                                       "threads": threads},
                compute=ray.data.ActorPoolStrategy(size=s.num_actors),
                batch_size=s.batch_size,
                num_gpus=1 if s.use_gpu else 0,
                num_cpus=0 if s.use_gpu else 1,
                batch_format="numpy",
            )
            done, shard = 0, 0
            for batch in images.iter_batches(batch_size=None, batch_format="numpy"):
                table = pa.table({"image": tensor_array(batch["image"]), "label": pa.array(batch["label"]),
                                  "k": pa.array(batch["k"]), "seed": pa.array(batch["seed"])})
                pq.write_table(table, tmp / "images" / f"part-{shard:05d}.parquet")
                shard, done = shard + 1, done + len(batch["label"])
                rate = done / (time.perf_counter() - started)
                log.info("sample[%s]: %d/%d images (%.2f img/s)", folder, done, total, rate)
        grid = write_grid(tmp / "images", data.manifest, tmp / "grid.png", s.grid_per_class,
                          title=f"{cfg.name}: {model.method}, {s.sampler} ω={s.omega}")
        manifest = {"method": model.method, "key": key, "counts": counts, "num_images": total,
                    "sample": dataclasses.asdict(s), "model": str(model.weights), "grid": grid,
                    "seconds": round(time.perf_counter() - started, 2), "image_shape": data.manifest["image_shape"],
                    "class_names": data.manifest["class_names"]}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("sample[%s]: %d images in %.1f s -> %s", folder, total, time.perf_counter() - started, out)
    return SampleArtifact(model.method, out, total, skipped=False)


def _plan_dataset(rows: dict[str, np.ndarray], batch_size: int):
    """The plan as a Ray Dataset, one block per sampling batch so work spreads over the pool."""
    import pyarrow as pa
    import ray

    n = len(rows["label"])
    tables = [pa.table({k: v[i:i + batch_size] for k, v in rows.items()}) for i in range(0, n, batch_size)]
    return ray.data.from_arrow(tables)


def write_grid(images_dir: Path, manifest: dict, out: Path, per_class: int, title: str) -> str | None:
    """A PNG with one row per class (its first `per_class` samples by k), labelled with class names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.shards import column_to_numpy

    files = sorted(images_dir.glob("*.parquet"))
    if not files or per_class <= 0:
        return None
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.concat_tables([pq.read_table(f) for f in files])
    images = column_to_numpy(table.column("image"), tuple(manifest["image_shape"]))
    labels, ks = table.column("label").to_numpy(), table.column("k").to_numpy()
    names = manifest["class_names"]
    H, W, C = manifest["image_shape"]
    per_class = min(per_class, int(np.bincount(labels).max()))
    canvas = np.full((len(names) * (H + 2), per_class * (W + 2), C), 255, np.uint8)
    for c in range(len(names)):
        idx = np.flatnonzero(labels == c)
        idx = idx[np.argsort(ks[idx])][:per_class]
        for j, i in enumerate(idx):
            canvas[c * (H + 2) + 1:c * (H + 2) + 1 + H, j * (W + 2) + 1:j * (W + 2) + 1 + W] = images[i]
    scale = max(1.0, 48.0 / H) * 0.5
    fig, ax = plt.subplots(figsize=(per_class * (W + 2) * scale / 40 + 1.8, len(names) * (H + 2) * scale / 40 + 0.6))
    ax.imshow(canvas.squeeze(-1) if C == 1 else canvas, cmap="gray" if C == 1 else None, interpolation="nearest")
    ax.set_yticks([c * (H + 2) + H / 2 for c in range(len(names))], [f"{n} ({manifest['class_counts'][i]})"
                                                                     for i, n in enumerate(names)], fontsize=7)
    ax.set_xticks([])
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out.name
