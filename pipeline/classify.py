"""Classify stage: does synthetic tail data make a better long-tailed classifier than the cheap fixes?

Arms, each one ResNet-32 trained on Ray Train and scored on the balanced test split:
  ce, rs, la, ldam_drw     classifier-only baselines on the real LT split (models/lt_losses.py)
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

Per arm: classify/<arm>/model.pt, metrics.json, history.csv, confusion.png, manifest.json;
and classify/table.md comparing the arms. A finished arm is skipped on rerun; an interrupted
one resumes from its last epoch checkpoint.
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
import torch

from models.lt_losses import get_recipe
from models.metrics import class_groups
from models.seeding import derive_seed
from pipeline.config import Config, ResampleConfig, stable_hash
from pipeline.data import DatasetArtifact
from pipeline.errors import TaildiffError
from pipeline.train import ModelArtifact, latest_progress

log = logging.getLogger("taildiff.classify")
SYNTHETIC_KEYS = ("baselines", "methods", "synthetic", "fill_to", "per_class", "synthetic_recipes",
                  "filter_min_confidence", "sampler", "steps", "omega", "keep_checkpoints", "eval_every")


@dataclass(frozen=True)
class Arm:
    name: str
    recipe: str
    method: str | None = None  # the diffusion method whose samples augment; None = real only


@dataclass(frozen=True)
class ClassifierArtifact:
    arm: Arm
    path: Path
    metrics: dict
    composition: dict
    skipped: bool


def plan_arms(cfg: Config) -> list[Arm]:
    """Baselines first (the CE one first of all when it filters synthetic images), then the
    real + synthetic arms: one per (diffusion method, synthetic recipe)."""
    c = cfg.classify
    names = list(dict.fromkeys(c.baselines))
    if c.filter_min_confidence > 0 and "ce" not in names:
        names.insert(0, "ce")
    arms = [Arm(name, name) for name in sorted(names, key=lambda n: n != "ce")]
    if c.synthetic != "none":
        for m in c.methods or cfg.train.methods:
            for recipe in c.synthetic_recipes:
                name = f"syn-{m.replace('+', '-')}" + ("" if recipe == "ce" else f"-{recipe}")
                arms.append(Arm(name, recipe, m))
    return arms


def synthetic_counts(cfg: Config, class_counts: list[int]) -> list[int]:
    """Synthetic images per class (label order) for the configured plan."""
    c = cfg.classify
    if c.synthetic == "per_class":
        return [c.per_class] * len(class_counts)
    if c.synthetic == "fill":
        target = c.fill_to or max(class_counts)
        return [max(0, target - n) for n in class_counts]
    return [0] * len(class_counts)


def augmentation_config(cfg: Config) -> Config:
    """The sample section used to generate training images (classify's sampler/steps/omega)."""
    c, s = cfg.classify, cfg.sample
    sample = dataclasses.replace(s, sampler=c.sampler or s.sampler, steps=c.steps or s.steps,
                                 omega=s.omega if c.omega is None else c.omega)
    return dataclasses.replace(cfg, sample=sample)


def run_classify(cfg: Config, data: DatasetArtifact, models: dict[str, ModelArtifact]) -> dict[str, ClassifierArtifact]:
    from pipeline.sample import sample_method

    results: dict[str, ClassifierArtifact] = {}
    counts = list(data.manifest["class_counts"])
    real_composition = {"real": counts, "synthetic": [0] * len(counts), "filtered_out": [0] * len(counts)}
    for arm in plan_arms(cfg):
        if arm.method is None:
            results[arm.name] = train_arm(cfg, data, arm, data.split_dir("train"), data.manifest["config_hash"],
                                          real_composition)
            continue
        if arm.method not in models:
            raise TaildiffError(f"classify arm {arm.name} needs the trained {arm.method} model: add {arm.method} "
                                "to train.methods or drop it from classify.methods")
        samples = sample_method(augmentation_config(cfg), data, models[arm.method],
                                counts=synthetic_counts(cfg, counts), folder=f"{arm.method}-augment")
        judge = results.get("ce") if cfg.classify.filter_min_confidence > 0 else None
        set_dir, set_key, composition = build_training_set(cfg, data, arm, samples, judge)
        results[arm.name] = train_arm(cfg, data, arm, set_dir, set_key, composition)
    from pipeline.classify_report import write_classify_table

    write_classify_table(cfg, data, results, cfg.run_dir / "classify" / "table.md")
    return results


def build_training_set(cfg: Config, data: DatasetArtifact, arm: Arm, samples, judge: ClassifierArtifact | None):
    """Real LT rows + (filtered) synthetic rows as Parquet shards; returns (dir, key, composition)."""
    from pipeline.shards import read_split, write_split

    c = cfg.classify
    sample_key = json.loads((samples.path / "manifest.json").read_text())["key"]
    judge_stamp = None
    if judge is not None:
        judge_stamp = [str(judge.path / "model.pt"), os.path.getmtime(judge.path / "model.pt")]
    key = stable_hash({"data": data.manifest["config_hash"], "samples": sample_key, "judge": judge_stamp,
                       "threshold": c.filter_min_confidence})
    out = (cfg.run_dir / "classify" / "sets" / arm.method.replace("+", "-") / "shards").resolve()
    comp_path = out.parent / "composition.json"  # beside the shards, so shards/ is pure Parquet
    if comp_path.is_file():
        composition = json.loads(comp_path.read_text())
        if composition.get("key") == key:
            return out, key, composition
    real = read_split(data.split_dir("train"), data.image_shape, data.num_classes)
    from pipeline.evaluate import load_samples

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
        "key": key, "method": arm.method, "samples": str(samples.path),
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
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _write_json(comp_path, composition)  # last: marks the set finished
    log.info("classify[%s]: training set %d real + %d synthetic (%d filtered out)", arm.method, len(real["label"]),
             int(kept.sum()), int((~kept).sum()))
    return out, key, composition


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def confidence_filter(weights: Path, images: np.ndarray, labels: np.ndarray, threshold: float) -> np.ndarray:
    """Keep-mask: the real-data classifier's p(label | image) >= threshold. Shape (N,)."""
    from models.classifier_training import predict

    net = load_classifier(weights)
    _, probs = predict(net, torch.from_numpy(images))
    return (probs[torch.arange(len(labels)), torch.from_numpy(labels)] >= threshold).numpy()


def load_classifier(weights: Path) -> torch.nn.Module:
    from pipeline.classify_loop import build_classifier

    blob = torch.load(weights, map_location="cpu", weights_only=True)
    net = build_classifier(blob["recipe"], blob["num_classes"], blob["in_channels"])
    net.load_state_dict(blob["net"])
    return net.eval()


def arm_key(cfg: Config, arm: Arm, set_key: str) -> str:
    """Everything that shapes the arm's weights: recipe, training set, optimiser and schedule."""
    c = dataclasses.asdict(cfg.classify)
    for name in SYNTHETIC_KEYS:
        c.pop(name)
    return stable_hash({"recipe": arm.recipe, "set": set_key, "classify": c, "seed": cfg.seed})


def train_arm(cfg: Config, data: DatasetArtifact, arm: Arm, set_dir: Path, set_key: str,
              composition: dict) -> ClassifierArtifact:
    out = (cfg.run_dir / "classify" / arm.name).resolve()
    key = arm_key(cfg, arm, set_key)
    manifest_path = out / "manifest.json"
    if manifest_path.is_file() and (out / "model.pt").is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("key") == key:
            log.info("classify[%s]: reusing %s", arm.name, out)
            return ClassifierArtifact(arm, out, manifest["metrics"], composition, skipped=True)
    out.mkdir(parents=True, exist_ok=True)
    train_counts = [r + s for r, s in zip(composition["real"], composition["synthetic"])]
    started = time.perf_counter()
    for attempt in range(cfg.train.max_failures + 1):  # each attempt rebuilds the stream at the checkpoint's epoch
        try:
            result = _fit(cfg, data, arm, set_dir, key, train_counts)
            break
        except TaildiffError as exc:
            if attempt == cfg.train.max_failures:
                raise
            log.warning("classify[%s]: attempt %d failed (%s); resuming from the last checkpoint", arm.name,
                        attempt + 1, exc)
    metrics = dict(result.return_value or {})
    if not metrics:
        raise TaildiffError(f"classifier {arm.name} returned no metrics; see the Ray logs under {out.parent / 'ray'}")
    metrics["fit_seconds"] = round(time.perf_counter() - started, 2)
    _export(result.checkpoint, out, arm, data)
    from pipeline.classify_report import plot_confusion, write_history

    history = metrics.pop("history")
    write_history(history, out / "history.csv")
    plot_confusion(np.array(metrics["last"]["confusion"]), data.manifest["class_names"], out / "confusion.png",
                   title=f"{cfg.name}: {arm.name} (last epoch, top-1 {metrics['last']['accuracy']:.3f})")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    manifest = {"arm": arm.name, "recipe": arm.recipe, "method": arm.method, "key": key, "training_set": str(set_dir),
                "metrics": metrics, "composition": composition, "config": cfg.to_dict()}
    _write_json(manifest_path, manifest)  # last: marks the arm finished
    log.info("classify[%s]: top-1 %.4f (last), few %.4f, %.0f s", arm.name, metrics["last"]["accuracy"],
             metrics["last"]["few_accuracy"], metrics["fit_seconds"])
    return ClassifierArtifact(arm, out, metrics, composition, skipped=False)


def _fit(cfg: Config, data: DatasetArtifact, arm: Arm, set_dir: Path, key: str, train_counts: list[int]):
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.classify_loop import classify_loop_per_worker
    from pipeline.resample import resampled_stream

    c = cfg.classify
    storage = (cfg.run_dir / "classify" / "ray").resolve()
    name = f"{arm.name}-{key}"
    progress = latest_progress(storage / name)
    start_epoch = progress["epoch"] if progress else 0
    if progress:
        log.info("classify[%s]: resuming after epoch %d", arm.name, start_epoch)
    per_worker = c.batch_size // c.num_workers
    rcfg = ResampleConfig(mode=get_recipe(arm.recipe).resample, batch_size=per_worker)
    stream = resampled_stream(set_dir, data.image_shape, rcfg, seed=derive_seed(cfg.seed, "classify-stream", arm.name),
                              start_epoch=start_epoch, num_classes=data.num_classes)
    groups = class_groups(data.manifest["class_counts"], "thirds")
    ingest = ray.train.DataConfig.default_ingest_options()
    ingest.preserve_order = True
    trainer = TorchTrainer(
        classify_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "arm": arm.name, "recipe": arm.recipe,
                           "num_classes": data.num_classes, "image_shape": list(data.image_shape),
                           "train_counts": train_counts, "test_dir": str(data.split_dir("test").resolve()), "groups": groups},
        scaling_config=ray.train.ScalingConfig(num_workers=c.num_workers, use_gpu=c.use_gpu,
                                               resources_per_worker={"CPU": c.cpus_per_worker}),
        run_config=ray.train.RunConfig(name=name, storage_path=str(storage),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=c.keep_checkpoints),
                                       failure_config=ray.train.FailureConfig(max_failures=0)),
        datasets={"train": stream},
        dataset_config=ray.train.DataConfig(execution_options=ingest),
    )
    try:
        result = trainer.fit()
        if result.error is None:
            return result
        exc = result.error
    except ray.train.TrainingFailedError as failure:
        exc = failure
    text = str(exc).strip()
    raise TaildiffError(f"classifier {arm.name} failed ({text.splitlines()[-1] if text else type(exc).__name__}); "
                        f"the Ray logs and last checkpoint are in {storage / name}") from None


def _export(checkpoint, out: Path, arm: Arm, data: DatasetArtifact) -> None:
    with checkpoint.as_directory() as ckpt_dir:
        state = torch.load(Path(ckpt_dir) / "state.pt", map_location="cpu", weights_only=True)
    blob = {"net": state["net"], "recipe": arm.recipe, "num_classes": data.num_classes,
            "in_channels": data.image_shape[2], "epoch": state["epoch"]}
    tmp = out / "model.pt.tmp"
    torch.save(blob, tmp)
    os.replace(tmp, out / "model.pt")
