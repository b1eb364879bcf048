"""Classify stage: does synthetic tail data make a better long-tailed classifier than the cheap fixes?

Arms, each one ResNet-32 trained on Ray Train and scored on the balanced test split:
  ce, rs, la, ldam_drw     classifier-only baselines on the real LT split (models/classify/lt_losses.py)
  syn-<method>             real LT + synthetic images from a trained diffusion method, with
                           each recipe of `classify.synthetic_recipes` (default ce; a recipe
                           other than ce is in the name: syn-<method>-rs)

Synthetic images are generated for this stage (samples/<method>-augment/, own per-image seeds)
by the plan `classify.synthetic`: `fill` every class up to `fill_to` (default n_max) or
`per_class` +N each; optionally only those the real-data CE classifier gives p(y|x) >= 
`filter_min_confidence`. The training set of a synthetic arm is written as Parquet shards
(classify/sets/<method>/shards/, columns image, label, index, row, synthetic, seed) with
classify/sets/<method>/composition.json (real vs synthetic counts per class), shared by that
method's arms, and streamed like the LT split.

All pending arms of a wave train as jobs of one TorchTrainer run (pipeline/common/launcher.py):
one worker group, one start-up. Per arm: classify/<arm>/model.pt, metrics.json, history.csv,
confusion.png, manifest.json; and classify/table.md comparing the arms. A finished arm is
skipped on rerun; an interrupted one resumes from its last epoch checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch

from models.classify.lt_losses import get_recipe
from models.evaluation.metrics import class_groups
from models.seeding import derive_seed
from pipeline.common.artifacts import (Arm, ClassifierArtifact, DatasetArtifact, ModelArtifact, load_classifier,
                                       load_samples)
from pipeline.common.devices import cluster_gpus, resolve_use_gpu
from pipeline.common.files import write_json
from pipeline.common.storage import pull_path, storage_of
from pipeline.common.launcher import MAX_JOBS_PER_FIT, Job, Scaling, chunked, run_jobs
from pipeline.config import Config, ResampleConfig, stable_hash
from pipeline.errors import ConfigError, TaildiffError

log = logging.getLogger("taildiff.classify")
LOOP = "pipeline.stages.s5_classify_loop:train_arm_job"
SYNTHETIC_KEYS = ("baselines", "methods", "synthetic", "fill_to", "per_class", "synthetic_recipes",
                  "filter_min_confidence", "sampler", "steps", "omega", "keep_checkpoints", "eval_every", "seeds",
                  "use_gpu", "torch_threads", "cpus_per_worker")


def arm_name(base: str, seed: int) -> str:
    return base if seed == 0 else f"{base}-s{seed}"


def plan_arms(cfg: Config) -> list[Arm]:
    """Baselines first (the CE one first of all when it filters synthetic images), then the
    real + synthetic arms: one per (diffusion method, synthetic recipe); each for every seed."""
    c = cfg.classify
    names = list(dict.fromkeys(c.baselines))
    if c.filter_min_confidence > 0 and "ce" not in names:
        names.insert(0, "ce")
    base = [Arm(name, name) for name in sorted(names, key=lambda n: n != "ce")]
    if c.synthetic != "none":
        for m in c.methods or cfg.train.methods:
            for recipe in c.synthetic_recipes:
                name = f"syn-{m.replace('+', '-')}" + ("" if recipe == "ce" else f"-{recipe}")
                base.append(Arm(name, recipe, m))
    return [dataclasses.replace(a, name=arm_name(a.name, s), seed=s) for s in range(c.seeds) for a in base]


def synthetic_counts(cfg: Config, class_counts: list[int]) -> list[int]:
    """Synthetic images per class (label order) for the configured plan."""
    c = cfg.classify
    if c.synthetic == "per_class":
        return [c.per_class] * len(class_counts)
    if c.synthetic == "fill":
        target = c.fill_to or max(class_counts)
        return [max(0, target - n) for n in class_counts]
    return [0] * len(class_counts)


def augmentation_config(cfg: Config, omega: float | None = None) -> Config:
    """The sample section used to generate training images (classify's sampler/steps/omega; `omega`,
    a method's own ω chosen by a study, wins over both). Without either, each method samples at its
    evaluation ω (sample.omega_by_method, else sample.omega)."""
    c, s = cfg.classify, cfg.sample
    chosen = omega if omega is not None else c.omega
    sample = dataclasses.replace(s, sampler=c.sampler or s.sampler, steps=c.steps or s.steps)
    if chosen is not None:
        sample = dataclasses.replace(sample, omega=chosen, omega_by_method=())
    return dataclasses.replace(cfg, sample=sample)


def run_classify(cfg: Config, data: DatasetArtifact, models: dict[str, ModelArtifact],
                 omegas: dict | None = None) -> dict[str, ClassifierArtifact]:
    """Every arm of the run: the baselines, then (after the augmentation sets) the synthetic arms.
    `omegas`: method -> its own guidance ω for the augmentation images (a study's choice)."""
    from pipeline.common.generation import SetRequest, generate_sets
    from pipeline.stages.s5_classify_report import write_classify_table

    arms = plan_arms(cfg)
    height, width = data.image_shape[:2]
    if max(height, width) > cfg.classify.input_size:
        raise ConfigError(f"classify.input_size={cfg.classify.input_size} is smaller than the images ({height}x{width}): "
                          f"set classify.input_size to {max(height, width)} or more")
    counts = list(data.manifest["class_counts"])
    real = {"key": data.manifest["config_hash"], "real": counts, "synthetic": [0] * len(counts),
            "filtered_out": [0] * len(counts)}
    sets: dict[str | None, tuple] = {None: (data.split_dir("train"), data.manifest["config_hash"], real)}
    results: dict[str, ClassifierArtifact] = {}
    filtering = cfg.classify.filter_min_confidence > 0
    baselines = [a for a in arms if a.method is None]
    synthetic = [a for a in arms if a.method is not None]
    if filtering:  # the CE judge must exist before the synthetic sets are filtered
        results.update(train_arms(cfg, data, baselines, sets))
    sample_gpu = resolve_use_gpu(cfg.sample.use_gpu, cluster_gpus(), "sample")
    methods = list(dict.fromkeys(a.method for a in synthetic))
    for method in methods:
        if method not in models:
            raise TaildiffError(f"classify arms of {method} need its trained model: add {method} to train.methods "
                                "or drop it from classify.methods")
    augment = generate_sets(data, [SetRequest(augmentation_config(cfg, (omegas or {}).get(m)), models[m],
                                              synthetic_counts(cfg, counts), folder=f"{m}-augment", seed_tag="augment")
                                   for m in methods], use_gpu=sample_gpu)  # every method's set on one actor pool
    for method in methods:
        judge = results.get("ce") if filtering else None
        sets[method] = build_training_set(cfg, data, method, augment[f"{method}-augment"], judge)
    results.update(train_arms(cfg, data, synthetic if filtering else arms, sets))
    results = {a.name: results[a.name] for a in arms}
    write_classify_table(cfg, data, results, cfg.run_dir / "classify" / "table.md")
    return results


def build_training_set(cfg: Config, data: DatasetArtifact, method: str, samples, judge: ClassifierArtifact | None):
    """Real LT rows + (filtered) synthetic rows as Parquet shards; returns (dir, key, composition)."""
    from pipeline.common.shards import read_split, write_split

    c = cfg.classify
    judge_stamp = None
    if judge is not None:
        judge_stamp = [str(judge.path / "model.pt"), (judge.path / "model.pt").stat().st_mtime]
    key = stable_hash({"data": data.manifest["config_hash"], "samples": samples.key, "judge": judge_stamp,
                       "threshold": c.filter_min_confidence})
    out = (cfg.run_dir / "classify" / "sets" / method.replace("+", "-") / "shards").resolve()
    comp_path = out.parent / "composition.json"  # beside the shards, so shards/ is pure Parquet
    if comp_path.is_file():
        composition = json.loads(comp_path.read_text())
        if composition.get("key") == key:
            return out, key, composition
    real = read_split(data.split_dir("train"), data.image_shape, data.num_classes)
    syn = load_samples(samples, data.image_shape, allow_empty=True)
    k = data.num_classes
    kept = np.ones(len(syn["label"]), dtype=bool)
    if judge is not None and len(kept):
        kept = confidence_filter(judge.path / "model.pt", syn["image"], syn["label"], c.filter_min_confidence)
    images = np.concatenate([real["image"], syn["image"][kept]])
    labels = np.concatenate([real["label"], syn["label"][kept]])
    index = np.concatenate([real["index"], np.full(int(kept.sum()), -1, dtype=np.int64)])
    extra = {"synthetic": np.concatenate([np.zeros(len(real["label"]), bool), np.ones(int(kept.sum()), bool)]),
             "seed": np.concatenate([np.full(len(real["label"]), -1, np.int64), syn["seed"][kept]])}
    composition = {
        "key": key, "method": method, "samples": str(samples.path),
        "plan": c.synthetic, "fill_to": c.fill_to, "per_class": c.per_class,
        "filter_min_confidence": c.filter_min_confidence,
        "real": np.bincount(real["label"], minlength=k).tolist(),
        "synthetic": np.bincount(syn["label"][kept], minlength=k).tolist(),
        "filtered_out": np.bincount(syn["label"][~kept], minlength=k).tolist(),
        "class_names": data.manifest["class_names"],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-shards-{uuid.uuid4().hex[:8]}"
    try:
        write_split(tmp, images, labels, index, cfg.data.shard_rows, extra=extra)
        comp_path.unlink(missing_ok=True)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_json(comp_path, composition)  # last: marks the set finished
    log.info("classify[%s]: training set %d real + %d synthetic (%d filtered out)", method, len(real["label"]),
             int(kept.sum()), int((~kept).sum()))
    return out, key, composition


def confidence_filter(weights: Path, images: np.ndarray, labels: np.ndarray, threshold: float) -> np.ndarray:
    """Keep-mask: the real-data classifier's p(label | image) >= threshold. Shape (N,)."""
    from models.classify.training import predict

    net, size = load_classifier(weights)
    _, probs = predict(net, torch.from_numpy(images), size=size)
    return (probs[torch.arange(len(labels)), torch.from_numpy(labels)] >= threshold).numpy()


def arm_key(cfg: Config, arm: Arm, set_key: str) -> str:
    """Everything that shapes the arm's weights: recipe, training set, optimiser, schedule, seed."""
    c = dataclasses.asdict(cfg.classify)
    for name in SYNTHETIC_KEYS:
        c.pop(name)
    if c["lr_schedule"] == "step":  # the default before the option existed: earlier runs' arms keep their keys
        c.pop("lr_schedule")
    return stable_hash({"recipe": arm.recipe, "set": set_key, "classify": c, "seed": cfg.seed, "arm_seed": arm.seed})


def _reuse(cfg: Config, arm: Arm, key: str, composition: dict) -> ClassifierArtifact | None:
    out = (cfg.run_dir / "classify" / arm.name).resolve()
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if manifest.get("key") == key and (out / "model.pt").is_file():
        return ClassifierArtifact(arm, out, manifest["metrics"], composition, skipped=True)
    return None


def train_arms(cfg: Config, data: DatasetArtifact, arms: list[Arm], sets: dict) -> dict[str, ClassifierArtifact]:
    """Every arm not finished before, as jobs of TorchTrainer runs of at most MAX_JOBS_PER_FIT arms
    (each job has its own dataset and so its own split coordinator process)."""
    results: dict[str, ClassifierArtifact] = {}
    for chunk in chunked(arms, MAX_JOBS_PER_FIT):
        results.update(_train_arm_chunk(cfg, data, chunk, sets))
    return results


def _train_arm_chunk(cfg: Config, data: DatasetArtifact, arms: list[Arm], sets: dict) -> dict[str, ClassifierArtifact]:
    from pipeline.common.progress import stage_progress

    c = cfg.classify
    keys = {a.name: arm_key(cfg, a, sets[a.method][1]) for a in arms}
    results = {a.name: art for a in arms if (art := _reuse(cfg, a, keys[a.name], sets[a.method][2])) is not None}
    for name, art in results.items():
        log.info("classify[%s]: reusing %s", name, art.path)
    todo = [a for a in arms if a.name not in results]
    if not todo:
        return results
    use_gpu = resolve_use_gpu(c.use_gpu, cluster_gpus(), "classify")
    storage = (cfg.run_dir / "classify" / "ray").resolve()
    name = f"arms-{stable_hash(keys)}"  # the whole wave (finished arms included): a rerun resumes it
    jobs = [_job(cfg, data, a, keys[a.name], sets[a.method], use_gpu) for a in todo]
    pending = [j for j in jobs if not _exported(j.config)]  # an arm that ended but was not published is not redone
    with stage_progress("classify"):
        run_jobs(LOOP, pending, name=name, storage=storage, scaling=Scaling(c.num_workers, use_gpu, c.cpus_per_worker),
                 shared=storage_of(cfg), output_dir=cfg.output_dir,
                 keep=c.keep_checkpoints, max_failures=cfg.train.max_failures, what="classifier arms",
                 pending=lambda js: [j for j in js if not _exported(j.config)])
    for arm in todo:
        results[arm.name] = _finish(cfg, data, arm, keys[arm.name], sets[arm.method], use_gpu, storage / name)
    return results


def _exported(job_config: dict) -> bool:
    """final.json + model.pt of an arm (pulled from shared storage when rank 0 ran elsewhere)."""
    out = pull_path(job_config["out_dir"], storage_of(job_config["config"]), job_config["output_dir"])
    return (out / "final.json").is_file() and (out / "model.pt").is_file()


def work_dir(cfg: Config, arm: Arm, key: str) -> Path:
    """Where an arm writes while it trains; moved to classify/<arm>/ when it ends."""
    return (cfg.run_dir / "classify" / ".work" / f"{arm.name}-{key}").resolve()


def _job(cfg: Config, data: DatasetArtifact, arm: Arm, key: str, training_set: tuple, use_gpu: bool) -> Job:
    from pipeline.common.streams import resampled_stream

    c = cfg.classify
    set_dir, _, composition = training_set
    out = work_dir(cfg, arm, key)
    out.mkdir(parents=True, exist_ok=True)
    train_counts = [r + s for r, s in zip(composition["real"], composition["synthetic"])]
    per_worker = c.batch_size // c.num_workers
    rcfg = ResampleConfig(mode=get_recipe(arm.recipe).resample, batch_size=per_worker)
    seed = derive_seed(cfg.seed, "classify-seed", arm.seed) if arm.seed else cfg.seed
    config = {"config": cfg.to_dict(), "run_dir": str(cfg.run_dir.resolve()),
              "output_dir": str(Path(cfg.output_dir).resolve()), "arm": arm.name, "recipe": arm.recipe,
              "seed": seed,
              "num_classes": data.num_classes, "image_shape": list(data.image_shape), "train_counts": train_counts,
              "test_dir": str(data.split_dir("test").resolve()), "out_dir": str(out), "use_gpu": use_gpu,
              "groups": class_groups(data.manifest["class_counts"], "thirds")}
    stream_seed = derive_seed(seed, "classify-stream", arm.name)

    def stream(start_epoch: int):
        return resampled_stream(set_dir, data.image_shape, rcfg, seed=stream_seed, start_epoch=start_epoch,
                                num_classes=data.num_classes)

    return Job(name=arm.name, config=config, stream=stream)


def _finish(cfg: Config, data: DatasetArtifact, arm: Arm, key: str, training_set: tuple, use_gpu: bool,
            ray_run: Path) -> ClassifierArtifact:
    from pipeline.common.files import publish_dir
    from pipeline.stages.s5_classify_report import plot_confusion, write_history

    set_dir, _, composition = training_set
    work, out = work_dir(cfg, arm, key), (cfg.run_dir / "classify" / arm.name).resolve()
    from pipeline.common.storage import pull_path, storage_of

    pull_path(work, storage_of(cfg), cfg.output_dir)  # rank 0 may have run on another node
    try:
        metrics = json.loads((work / "final.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise TaildiffError(f"classifier {arm.name} ended without its export; see the Ray logs under {ray_run}") from None
    history = metrics.pop("history")
    write_history(history, work / "history.csv")
    plot_confusion(np.array(metrics["last"]["confusion"]), data.manifest["class_names"], work / "confusion.png",
                   title=f"{cfg.name}: {arm.name} (last epoch, top-1 {metrics['last']['accuracy']:.3f})")
    metrics["use_gpu"] = use_gpu
    write_json(work / "metrics.json", metrics)
    manifest = {"arm": arm.name, "recipe": arm.recipe, "method": arm.method, "seed": arm.seed, "key": key,
                "training_set": str(set_dir), "metrics": metrics, "composition": composition, "config": cfg.to_dict()}
    write_json(work / "manifest.json", manifest)  # marks the arm finished ...
    publish_dir(work, out)  # ... and only now replaces classify/<arm>/
    log.info("classify[%s]: top-1 %.4f (last), few %.4f", arm.name, metrics["last"]["accuracy"],
             metrics["last"]["few_accuracy"])
    return ClassifierArtifact(arm, out, metrics, composition, skipped=False)
