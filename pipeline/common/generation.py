"""Class-conditional generation on a Ray Data actor pool from a model's EMA weights: the sample
stage's evaluation sets and the classify stage's augmentation sets both come from here.

Each actor loads the model once (one actor per GPU, or per CPU slot). The plan is a table of
(label, k, seed) rows; every image's noise comes from its own seed, so a sample does not depend
on batch size, actor count or device. A set lands in `samples/<folder>/`:
  images/part-NNNNN.parquet   image (H, W, C) uint8, label, k, seed
  grid.png                    a row per class
  manifest.json               what produced it (its key), counts, sampler, seconds
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np

from models.precision import resolve_bf16
from models.seeding import derive_seed
from pipeline.common.artifacts import DatasetArtifact, ModelArtifact, SampleArtifact
from pipeline.common.files import content_stamp, write_json
from pipeline.config import Config, stable_hash

log = logging.getLogger("taildiff.sample")


def plan_rows(counts: list[int], seed: int, tag: str) -> dict[str, np.ndarray]:
    """(label, k, seed) of every image: image k of class c has seed f(run seed, tag, c, k)."""
    labels = np.repeat(np.arange(len(counts)), counts).astype(np.int64)
    ks = np.concatenate([np.arange(n) for n in counts]).astype(np.int64) if counts else np.zeros(0, np.int64)
    seeds = np.array([derive_seed(seed, "sample", tag, int(c), int(k)) for c, k in zip(labels, ks)], dtype=np.int64)
    return {"label": labels, "k": ks, "seed": seeds}


def build_denoiser(net, weights: Path, omega: float, bf16: bool, schedule, device, guidance_scale=None,
                   guidance_norm: str = "rms", compile_net: bool = False):
    """The sampling denoiser of a trained model: CFG (or the null label for an unconditional
    backbone), wrapped in the model's sampling-time guidance when it has one (`guidance_scale`
    overrides the scale it was trained with; `guidance_norm` normalises its gradient). The network's
    weights are made NHWC where that is faster (pipeline.common.devices.conv_channels_last);
    `compile_net` wraps it in torch.compile (inductor; compiled at its first call, for that batch shape)."""
    import torch

    from models.diffusion.guidance import CFGDenoiser, ClassifierGuidance, NullLabelDenoiser
    from models.methods.registry import GUIDANCES
    from pipeline.common.artifacts import model_extras
    from pipeline.common.devices import conv_channels_last

    extras = model_extras(weights)
    dtype = torch.bfloat16 if resolve_bf16(bf16, device) else None
    if conv_channels_last(device, dtype is not None):
        net = net.to(memory_format=torch.channels_last)  # the same images, faster (conv_channels_last)
    if compile_net:
        net = torch.compile(net)  # keeps .null_label etc. reachable: OptimizedModule forwards attributes
    if extras["conditional"]:
        den = CFGDenoiser(net, omega, net.null_label, autocast_dtype=dtype)
    else:
        den = NullLabelDenoiser(net, net.null_label, autocast_dtype=dtype)
    guidance = extras.get("guidance")
    if guidance:
        scale = guidance["scale"] if guidance_scale is None else guidance_scale
        grad_fn = GUIDANCES[guidance["kind"]](guidance["weights"], device)
        den = ClassifierGuidance(den, grad_fn, scale, schedule.alpha_bar, normalise=guidance_norm)
    return den


class SamplerActor:
    """Holds one model; turns batches of plan rows into uint8 images."""

    def __init__(self, weights: str, sample_cfg: dict, threads: int | None, use_gpu: bool,
                 storage: str | None = None, output_dir: str | None = None, compile_net: bool = False):
        import torch

        from pipeline.common.artifacts import load_model, make_schedule, model_extras
        from pipeline.common.storage import Storage, ensure_local

        shared = Storage.from_uri(storage) if storage else None  # an actor on a node without the files
        weights = str(ensure_local(weights, shared, output_dir))
        guidance = model_extras(Path(weights)).get("guidance") if shared else None
        if guidance:
            ensure_local(guidance["weights"], shared, output_dir)
        if threads:
            torch.set_num_threads(threads)
        self.cfg = dict(sample_cfg)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        net, run_cfg, manifest = load_model(Path(weights), self.device)
        self.schedule = make_schedule(run_cfg)
        self.size = run_cfg.model.image_size
        self.height, self.width, self.channels = manifest["image_shape"]
        args = (Path(weights), self.cfg["omega"], self.cfg["bf16"], self.schedule, self.device,
                self.cfg.get("guidance_scale"), self.cfg.get("guidance_norm", "rms"))
        self.denoiser = build_denoiser(net, *args, compile_net=compile_net)
        # compiled: every batch is padded to batch_size (one shape, one compile; the padding rows' images
        # are dropped and, with one generator per image, change nothing in the others); if the compile
        # itself fails (no C++ compiler on the node) under `auto`, the actor goes on eagerly
        self.compiled, self.batch_size = compile_net, int(self.cfg["batch_size"])
        self._eager = (lambda: build_denoiser(net, *args)) if compile_net and self.cfg.get("compile") == "auto" else None
        self.key = self.cfg.get("progress_key")
        self.done = 0

    def __call__(self, batch: dict) -> dict:
        import torch

        from models.data.images import to_uint8_images
        from models.diffusion.guidance import ImageNoise
        from models.diffusion.samplers import generate

        seeds, labels = batch["seed"].tolist(), batch["label"].tolist()
        n = len(seeds)
        pad = max(0, self.batch_size - n) if self.compiled else 0
        seeds, labels = seeds + seeds[-1:] * pad, labels + labels[-1:] * pad

        def run():
            noise = ImageNoise(seeds, (self.channels, self.size, self.size), self.device)
            y = torch.as_tensor(labels, device=self.device)
            return generate(self.denoiser, self.schedule, noise, y, sampler=self.cfg["sampler"],
                            steps=self.cfg["steps"], eta=self.cfg["eta"], clip_x0=self.cfg["clip_x0"])[:n]

        try:
            x = run()
        except Exception as exc:  # noqa: BLE001 - inductor raises its own types (no compiler, a failed build)
            if self._eager is None:
                raise
            log.warning("sample: torch.compile failed on this node (%s); sampling eagerly",
                        str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__)
            self.denoiser, self._eager, self.compiled = self._eager(), None, False
            x = run()
        images = to_uint8_images(x.float(), self.height, self.width).cpu().numpy()  # (b, H, W, C)
        return {"image": images, "label": batch["label"], "k": batch["k"], "seed": batch["seed"]}


def actor_threads(num_actors: int) -> int:
    """torch threads per CPU sampling actor: a node's cores shared by the actors it will hold. From
    the cluster's node sizes, not from the CPUs free at the moment (those depend on whether the
    previous stage's workers have let go yet: a race that gave one thread instead of two)."""
    import ray

    sizes = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU")]
    if not sizes:
        return 1
    per_node = -(-num_actors // len(sizes))  # actors spread over the nodes
    return max(1, max(sizes) // per_node)


def sample_key(sample_cfg, model: ModelArtifact, counts: list[int], seed: int) -> str:
    """What shapes a set: the sample section (minus placement), the counts, the model's weights."""
    s = dataclasses.asdict(sample_cfg)
    for name in ("batch_size", "num_actors", "use_gpu", "grid_per_class", "compile"):  # placement and speed only
        s.pop(name, None)
    return stable_hash({"sample": s, "counts": counts, "seed": seed, "model_step": model.metrics.get("step"),
                        "model": content_stamp(model.weights)})  # by content: the same key on any node


def generate_set(cfg: Config, data: DatasetArtifact, model: ModelArtifact, counts: list[int], folder: str,
                 seed_tag: str, use_gpu: bool = False) -> SampleArtifact:
    """`counts` images per class from `model` with `cfg.sample` into samples/<folder>/ (reused when its
    key matches). Image k of class c starts from the noise of seed f(run seed, seed_tag, c, k): the
    same for every method of a run (paired comparisons), different between tags (the evaluation set
    and the augmentation set of one model are different images)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from pipeline.common.progress import LocalProgress
    from pipeline.common.shards import tensor_array
    from pipeline.common.streams import plan_dataset

    s = cfg.sample.for_method(model.method)  # the method's own ω (sample.omega_by_method) resolved here
    counts = [int(c) for c in counts]
    out = (cfg.run_dir / "samples" / folder).resolve()
    key = sample_key(s, model, counts, cfg.seed) + f"-{seed_tag}"
    manifest_path = out / "manifest.json"
    if manifest_path.is_file() and json.loads(manifest_path.read_text()).get("key") == key:
        log.info("sample[%s]: reusing %s", folder, out)
        return SampleArtifact(model.method, out, sum(counts), skipped=True)

    rows = plan_rows(counts, cfg.seed, seed_tag)
    total = len(rows["label"])
    tmp = out.parent / f".tmp-{folder}-{uuid.uuid4().hex[:8]}"
    (tmp / "images").mkdir(parents=True)
    started = time.perf_counter()
    compile_net = False
    try:
        if total:
            ds = plan_dataset(rows, s.batch_size)
            threads = None if use_gpu else actor_threads(s.num_actors)
            compile_net = sample_compile(cfg, s, total, use_gpu)
            images = ds.map_batches(
                SamplerActor,
                fn_constructor_kwargs={"weights": str(model.weights), "sample_cfg": dataclasses.asdict(s),
                                       "threads": threads, "use_gpu": use_gpu, "storage": cfg.storage,
                                       "output_dir": str(Path(cfg.output_dir).resolve()),
                                       "compile_net": compile_net},
                compute=ray.data.ActorPoolStrategy(size=s.num_actors),
                batch_size=s.batch_size,
                num_gpus=1 if use_gpu else 0,
                num_cpus=0 if use_gpu else 1,
                batch_format="numpy",
            )
            progress = LocalProgress(f"sample/{folder}", total, "img")
            done, shard = 0, 0
            for batch in images.iter_batches(batch_size=None, batch_format="numpy"):
                table = pa.table({"image": tensor_array(batch["image"]), "label": pa.array(batch["label"]),
                                  "k": pa.array(batch["k"]), "seed": pa.array(batch["seed"])})
                pq.write_table(table, tmp / "images" / f"part-{shard:05d}.parquet")
                shard, done = shard + 1, done + len(batch["label"])
                progress.update(len(batch["label"]))
            progress.close()
        grid = write_grid(tmp / "images", data.manifest, tmp / "grid.png", s.grid_per_class,
                          title=f"{cfg.name}: {model.method}, {s.sampler}-{s.steps} ω={s.omega}")
        manifest = {"method": model.method, "key": key, "seed_tag": seed_tag, "counts": counts, "num_images": total,
                    "sample": dataclasses.asdict(s), "use_gpu": use_gpu,
                    "compile_net": bool(total and compile_net),  # asked of the actors (a fallback is in their log)
                    "model": str(model.weights), "grid": grid,
                    "seconds": round(time.perf_counter() - started, 2), "image_shape": data.manifest["image_shape"],
                    "class_names": data.manifest["class_names"]}
        write_json(tmp / "manifest.json", manifest)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("sample[%s]: %d images in %.1f s%s -> %s", folder, total, time.perf_counter() - started,
             " (network compiled)" if compile_net else "", out)
    return SampleArtifact(model.method, out, total, skipped=False)


def sample_compile(cfg: Config, s, images: int, use_gpu: bool) -> bool:
    """`sample.compile` resolved for this set's actors (pipeline.common.devices.resolve_compile): each actor's
    share of the images times the network evaluations per image of the sampler, steps and ω."""
    from models.diffusion.samplers import network_evaluations
    from pipeline.common.devices import resolve_compile

    device = "cuda" if use_gpu else "cpu"
    per_actor = -(-images // max(1, s.num_actors))
    evaluations = per_actor * network_evaluations(s.sampler, cfg.model.timesteps, s.steps, s.omega)
    return resolve_compile(s.compile, device, resolve_bf16(s.bf16, device), evaluations)


def write_grid(images_dir: Path, manifest: dict, out: Path, per_class: int, title: str,
               classes: list[int] | None = None) -> str | None:
    """A PNG with one row per class (its first `per_class` samples by k), labelled with class names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.common.shards import column_to_numpy

    files = sorted(images_dir.glob("*.parquet"))
    if not files or per_class <= 0:
        return None
    table = pa.concat_tables([pq.read_table(f) for f in files])
    images = column_to_numpy(table.column("image"), tuple(manifest["image_shape"]))
    labels, ks = table.column("label").to_numpy(), table.column("k").to_numpy()
    names = manifest["class_names"]
    rows = list(range(len(names))) if classes is None else list(classes)
    H, W, C = manifest["image_shape"]
    per_class = min(per_class, int(np.bincount(labels).max()))
    canvas = np.full((len(rows) * (H + 2), per_class * (W + 2), C), 255, np.uint8)
    for r, c in enumerate(rows):
        idx = np.flatnonzero(labels == c)
        idx = idx[np.argsort(ks[idx])][:per_class]
        for j, i in enumerate(idx):
            canvas[r * (H + 2) + 1:r * (H + 2) + 1 + H, j * (W + 2) + 1:j * (W + 2) + 1 + W] = images[i]
    scale = max(1.0, 48.0 / H) * 0.5
    fig, ax = plt.subplots(figsize=(per_class * (W + 2) * scale / 40 + 1.8, len(rows) * (H + 2) * scale / 40 + 0.6))
    ax.imshow(canvas.squeeze(-1) if C == 1 else canvas, cmap="gray" if C == 1 else None, interpolation="nearest")
    ax.set_yticks([r * (H + 2) + H / 2 for r in range(len(rows))],
                  [f"{names[c]} ({manifest['class_counts'][c]})" for c in rows], fontsize=7)
    ax.set_xticks([])
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out.name
