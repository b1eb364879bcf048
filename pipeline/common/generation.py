"""Class-conditional generation on a Ray Data actor pool from a model's EMA weights: the sample
stage's evaluation sets and the classify stage's augmentation sets both come from here.

The sets a stage needs (every method's evaluation set and companion grids, every method's
augmentation set) run in one Ray Data pipeline on one actor pool (generate_sets): the pool's actors
start once, not once per set, and each loads a set's model when that set's first batch reaches it
(one actor per GPU, or per CPU slot). The plan is a table of (set, label, k, seed) rows; every image's
noise comes from its own seed, so a sample does not depend on batch size, actor count, device or
the other sets of the pool. A set lands in `samples/<folder>/`:
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
    """Turns batches of plan rows into uint8 images. `sets` maps a set id (the rows' `set` column) to
    its model and sample section: the sets of one call of generate_sets share the pool. A set's model
    is loaded when its first batch arrives; the two most recent are kept (the plan runs set after set)."""

    KEEP = 2

    def __init__(self, sets: dict, threads: int | None, use_gpu: bool, storage: str | None = None,
                 output_dir: str | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.sets = {int(k): v for k, v in sets.items()}
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.storage, self.output_dir = storage, output_dir
        self.loaded: dict[int, dict] = {}  # set id -> its denoiser and shapes, most recent last

    def _state(self, set_id: int) -> dict:
        if set_id in self.loaded:
            self.loaded[set_id] = self.loaded.pop(set_id)
            return self.loaded[set_id]
        from pipeline.common.artifacts import load_model, make_schedule, model_extras
        from pipeline.common.storage import Storage, ensure_local

        spec = self.sets[set_id]
        shared = Storage.from_uri(self.storage) if self.storage else None  # an actor on a node without the files
        weights = str(ensure_local(spec["weights"], shared, self.output_dir))
        guidance = model_extras(Path(weights)).get("guidance") if shared else None
        if guidance:
            ensure_local(guidance["weights"], shared, self.output_dir)
        cfg, compile_net = dict(spec["sample_cfg"]), bool(spec["compile_net"])
        net, run_cfg, manifest = load_model(Path(weights), self.device)
        schedule = make_schedule(run_cfg)
        args = (Path(weights), cfg["omega"], cfg["bf16"], schedule, self.device, cfg.get("guidance_scale"),
                cfg.get("guidance_norm", "rms"))
        state = {"cfg": cfg, "schedule": schedule, "size": run_cfg.model.image_size, "shape": manifest["image_shape"],
                 "denoiser": build_denoiser(net, *args, compile_net=compile_net),
                 # compiled: every batch is padded to batch_size (one shape, one compile; the padding rows'
                 # images are dropped and, with one generator per image, change nothing in the others); if
                 # the compile itself fails (no C++ compiler on the node) under `auto`, it goes on eagerly
                 "compiled": compile_net, "batch_size": int(cfg["batch_size"]),
                 "eager": (lambda: build_denoiser(net, *args)) if compile_net and cfg.get("compile") == "auto" else None}
        while len(self.loaded) >= self.KEEP:
            self.loaded.pop(next(iter(self.loaded)))
        self.loaded[set_id] = state
        return state

    def __call__(self, batch: dict) -> dict:
        sets = np.asarray(batch["set"])
        if (sets == sets[0]).all():
            return self._generate(int(sets[0]), batch)
        parts = [self._generate(int(i), {k: np.asarray(v)[sets == i] for k, v in batch.items()})
                 for i in dict.fromkeys(sets.tolist())]  # (blocks never mix sets; a bundle of blocks might)
        return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}

    def _generate(self, set_id: int, batch: dict) -> dict:
        import torch

        from models.data.images import to_uint8_images
        from models.diffusion.guidance import ImageNoise
        from models.diffusion.samplers import generate

        st = self._state(set_id)
        cfg = st["cfg"]
        height, width, channels = st["shape"]
        seeds, labels = np.asarray(batch["seed"]).tolist(), np.asarray(batch["label"]).tolist()
        n = len(seeds)
        pad = max(0, st["batch_size"] - n) if st["compiled"] else 0
        seeds, labels = seeds + seeds[-1:] * pad, labels + labels[-1:] * pad

        def run():
            noise = ImageNoise(seeds, (channels, st["size"], st["size"]), self.device)
            y = torch.as_tensor(labels, device=self.device)
            return generate(st["denoiser"], st["schedule"], noise, y, sampler=cfg["sampler"],
                            steps=cfg["steps"], eta=cfg["eta"], clip_x0=cfg["clip_x0"])[:n]

        try:
            x = run()
        except Exception as exc:  # noqa: BLE001 - inductor raises its own types (no compiler, a failed build)
            if st["eager"] is None:
                raise
            log.warning("sample: torch.compile failed on this node (%s); sampling eagerly",
                        str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__)
            st["denoiser"], st["eager"], st["compiled"] = st["eager"](), None, False
            x = run()
        images = to_uint8_images(x.float(), height, width).cpu().numpy()  # (b, H, W, C)
        return {"image": images, "label": batch["label"], "k": batch["k"], "seed": batch["seed"], "set": batch["set"]}


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


@dataclasses.dataclass(frozen=True)
class SetRequest:
    """One image set: `counts` images per class from `model` with `cfg.sample` (the method's own ω
    resolved) into samples/<folder>/, from the noises of `seed_tag`."""

    cfg: Config
    model: ModelArtifact
    counts: list
    folder: str
    seed_tag: str


def generate_set(cfg: Config, data: DatasetArtifact, model: ModelArtifact, counts: list[int], folder: str,
                 seed_tag: str, use_gpu: bool = False) -> SampleArtifact:
    """`counts` images per class from `model` with `cfg.sample` into samples/<folder>/ (reused when its
    key matches). Image k of class c starts from the noise of seed f(run seed, seed_tag, c, k): the
    same for every method of a run (paired comparisons), different between tags (the evaluation set
    and the augmentation set of one model are different images)."""
    return generate_sets(data, [SetRequest(cfg, model, counts, folder, seed_tag)], use_gpu)[folder]


@dataclasses.dataclass
class _Pending:
    request: SetRequest
    sample: object  # the resolved sample section
    counts: list
    out: Path
    key: str
    tmp: Path
    compile_net: bool = False
    done: int = 0
    shards: int = 0
    progress: object = None

    @property
    def total(self) -> int:
        return sum(self.counts)


def generate_sets(data: DatasetArtifact, requests: list[SetRequest], use_gpu: bool = False) -> dict[str, SampleArtifact]:
    """generate_set for several sets: the ones not reused run in one Ray Data pipeline on one actor pool
    (its actors start once, not once per set: 4-6 s a set on 2 cores), each set in blocks of its own
    batch size. A set is published (grid, manifest, then the rename of its folder) as soon as its last
    image arrives, so an interruption keeps the sets that finished. Returns {folder: artifact}."""
    if len({r.folder for r in requests}) != len(requests):
        raise ValueError(f"generate_sets: a folder twice in {[r.folder for r in requests]}")
    results: dict[str, SampleArtifact] = {}
    pending: list[_Pending] = []
    try:
        for req in requests:
            s = req.cfg.sample.for_method(req.model.method)  # the method's own ω (sample.omega_by_method)
            counts = [int(c) for c in req.counts]
            out = (req.cfg.run_dir / "samples" / req.folder).resolve()
            key = sample_key(s, req.model, counts, req.cfg.seed) + f"-{req.seed_tag}"
            manifest_path = out / "manifest.json"
            if manifest_path.is_file() and json.loads(manifest_path.read_text()).get("key") == key:
                log.info("sample[%s]: reusing %s", req.folder, out)
                results[req.folder] = SampleArtifact(req.model.method, out, sum(counts), skipped=True)
                continue
            tmp = out.parent / f".tmp-{req.folder}-{uuid.uuid4().hex[:8]}"
            (tmp / "images").mkdir(parents=True)
            pending.append(_Pending(req, s, counts, out, key, tmp))
        started = time.perf_counter()
        live = [p for p in pending if p.total]
        for p in pending:
            if not p.total:
                results[p.request.folder] = _publish(p, data, started, use_gpu)
        if live:
            _sample_on_pool(data, live, use_gpu, started, results)
    finally:
        for p in pending:
            shutil.rmtree(p.tmp, ignore_errors=True)
    return {req.folder: results[req.folder] for req in requests}


def _sample_on_pool(data: DatasetArtifact, live: list[_Pending], use_gpu: bool, started: float, results: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from pipeline.common.progress import LocalProgress
    from pipeline.common.shards import tensor_array
    from pipeline.common.streams import plan_bounds, plan_dataset

    plans = [plan_rows(p.counts, p.request.cfg.seed, p.request.seed_tag) for p in live]
    rows = {k: np.concatenate([plan[k] for plan in plans]) for k in ("label", "k", "seed")}
    rows["set"] = np.repeat(np.arange(len(live), dtype=np.int64), [p.total for p in live])
    num_actors = max(p.sample.num_actors for p in live)
    threads = None if use_gpu else actor_threads(num_actors)
    specs = {}
    for i, p in enumerate(live):
        p.compile_net = sample_compile(p.request.cfg, p.sample, p.total, use_gpu)
        specs[i] = {"weights": str(p.request.model.weights), "sample_cfg": dataclasses.asdict(p.sample),
                    "compile_net": p.compile_net}
    first = live[0].request.cfg
    images = plan_dataset(rows, plan_bounds([p.total for p in live], [p.sample.batch_size for p in live])).map_batches(
        SamplerActor,
        fn_constructor_kwargs={"sets": specs, "threads": threads, "use_gpu": use_gpu, "storage": first.storage,
                               "output_dir": str(Path(first.output_dir).resolve())},
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        batch_size=None,  # a block is one set's sampling batch (plan_bounds)
        num_gpus=1 if use_gpu else 0,
        num_cpus=0 if use_gpu else 1,
        batch_format="numpy",
    )
    for batch in images.iter_batches(batch_size=None, batch_format="numpy"):
        for i in dict.fromkeys(np.asarray(batch["set"]).tolist()):
            p, mine = live[i], np.asarray(batch["set"]) == i
            if p.progress is None:
                p.progress = LocalProgress(f"sample/{p.request.folder}", p.total, "img")
            table = pa.table({"image": tensor_array(batch["image"][mine]), "label": pa.array(batch["label"][mine]),
                              "k": pa.array(batch["k"][mine]), "seed": pa.array(batch["seed"][mine])})
            pq.write_table(table, p.tmp / "images" / f"part-{p.shards:05d}.parquet")
            p.shards, p.done = p.shards + 1, p.done + int(mine.sum())
            p.progress.update(int(mine.sum()))
            if p.done == p.total:
                p.progress.close()
                results[p.request.folder] = _publish(p, data, started, use_gpu)
    missing = [p.request.folder for p in live if p.request.folder not in results]
    if missing:
        raise RuntimeError(f"sample: the pool ended before every image of {missing} arrived")


def _publish(p: _Pending, data: DatasetArtifact, started: float, use_gpu: bool) -> SampleArtifact:
    """A finished set: its grid and manifest, then its temp folder renamed into place."""
    req, s = p.request, p.sample
    grid = write_grid(p.tmp / "images", data.manifest, p.tmp / "grid.png", s.grid_per_class,
                      title=f"{req.cfg.name}: {req.model.method}, {s.sampler}-{s.steps} ω={s.omega}")
    seconds = time.perf_counter() - started
    manifest = {"method": req.model.method, "key": p.key, "seed_tag": req.seed_tag, "counts": p.counts,
                "num_images": p.total, "sample": dataclasses.asdict(s), "use_gpu": use_gpu,
                "compile_net": bool(p.total and p.compile_net),  # asked of the actors (a fallback is in their log)
                "model": str(req.model.weights), "grid": grid,
                "seconds": round(seconds, 2),  # from the start of the pool its set shared
                "image_shape": data.manifest["image_shape"], "class_names": data.manifest["class_names"]}
    write_json(p.tmp / "manifest.json", manifest)
    if p.out.exists():
        shutil.rmtree(p.out)
    os.rename(p.tmp, p.out)
    log.info("sample[%s]: %d images in %.1f s%s -> %s", req.folder, p.total, seconds,
             " (network compiled)" if p.compile_net else "", p.out)
    return SampleArtifact(req.model.method, p.out, p.total, skipped=False)


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
