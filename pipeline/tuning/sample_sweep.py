"""Sampling-time sweeps: guidance ω and DDIM steps on fixed trained checkpoints, no retraining.

Each `GuidanceWorker` actor loads one checkpoint and the domain extractor once, then turns
points (ω, steps, ...) into features of a class-balanced sample set; every point uses the same
per-image seeds, so the FID-vs-ω curve compares like with like. The driver computes FID (and
the many / medium / few group FIDs) against the reference features.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from models.evaluation.artefacts import class_fidelity
from models.evaluation.metrics import frechet_distance
from models.evaluation.summary import group_fids
from pipeline.tuning.space import SearchSpace, point_config, sample_points

log = logging.getLogger("taildiff.tune")


class GuidanceWorker:
    """Holds one model and the extractor; `run(point)` -> (features, labels, the extractor's predicted
    classes, seconds)."""

    def __init__(self, weights: str, extractor_weights: str, images: int, threads: int):
        import torch

        from pipeline.common.artifacts import load_model, make_schedule
        from pipeline.common.features import balanced_plan, load_extractor

        torch.set_num_threads(max(1, threads))
        self.weights = Path(weights)
        self.net, self.cfg, self.manifest = load_model(self.weights)
        self.schedule = make_schedule(self.cfg)
        self.extractor = load_extractor(extractor_weights)
        self.labels, self.seeds = balanced_plan(len(self.manifest["class_names"]), images, self.cfg.seed, "guidance")

    def run(self, sample: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        from pipeline.common.features import extract, generate_images
        from pipeline.common.generation import build_denoiser

        started = time.perf_counter()
        denoiser = build_denoiser(self.net, self.weights, sample["omega"], sample["bf16"], self.schedule, "cpu",
                                  sample.get("guidance_scale"), sample.get("guidance_norm", "rms"))
        images = generate_images(self.net, self.schedule, self.manifest, self.cfg.model.image_size, self.labels,
                                 self.seeds, sampler=sample["sampler"], steps=sample["steps"], eta=sample["eta"],
                                 batch_size=sample["batch_size"], denoiser=denoiser)
        feats, predicted = extract(self.extractor, images, predictions=True)
        return feats, self.labels, predicted, time.perf_counter() - started


def run_sample_sweep(checkpoints: dict[str, tuple], space: SearchSpace, images: int, num_actors: int | None = None,
                     seed: int = 0) -> list[dict]:
    """`checkpoints`: label -> (weights path, checkpoint Config, reference dict from prepare_reference).
    Returns one row per (checkpoint, point) with FID, group FIDs and the sampling time."""
    import ray

    from pipeline.common.artifacts import model_extras

    points = sample_points(space, seed=seed)
    rows = []
    for label, (weights, ckpt_cfg, ref) in checkpoints.items():
        cfgs = [point_config(ckpt_cfg, space, p) for p in points]  # validates every point first
        free = int(ray.available_resources().get("CPU", 1))
        n = max(1, min(len(points), num_actors or free))
        worker = ray.remote(num_cpus=1 if free >= n else 0)(GuidanceWorker)
        actors = [worker.remote(weights, ref["extractor_weights"], images, max(1, free // n)) for _ in range(n)]
        method = model_extras(Path(weights))["method"] or ""  # its own ω unless the space sweeps ω
        futures = [actors[i % n].run.remote(_sample_dict(c.sample.for_method(method))) for i, c in enumerate(cfgs)]
        with np.load(ref["reference"]) as blob:
            ref_feats, ref_labels = blob["feats"], blob["labels"]
        counts = ref.get("class_counts")
        started = time.perf_counter()
        for point, cfg, future in zip(points, cfgs, futures):
            feats, labels, predicted, seconds = ray.get(future)
            feats, labels = np.array(feats), np.array(labels)  # writable copies out of the object store
            fidelity = class_fidelity(np.array(predicted), labels, int(labels.max()) + 1)
            row = {"checkpoint": label, "params": point, "fid": frechet_distance(feats, ref_feats),
                   "class_fidelity": fidelity["all"]["rate"],
                   "class_fidelity_per_class": [c and c["rate"] for c in fidelity["per_class"]],
                   "images": len(feats), "seconds": round(seconds, 2), "weights": weights}
            if counts:
                fids = group_fids(feats, labels, ref_feats, ref_labels, counts, "thirds")
                row.update({f"fid_{group}": value for group, value in fids.items()})
            log.info("tune[%s] %s %s: FID %.3f, class fidelity %.1f%% (%.1f s)", space.name, label, point, row["fid"],
                     100 * row["class_fidelity"], seconds)
            rows.append(row)
        log.info("tune[%s] %s: %d points in %.1f s on %d actor(s)", space.name, label, len(points),
                 time.perf_counter() - started, n)
        for actor in actors:
            ray.kill(actor)
    return rows


def _sample_dict(s) -> dict:
    return {"sampler": s.sampler, "steps": s.steps, "omega": s.omega, "eta": s.eta, "batch_size": s.batch_size,
            "bf16": s.bf16, "guidance_scale": s.guidance_scale, "guidance_norm": s.guidance_norm}
