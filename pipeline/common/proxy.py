"""The intermediate quality proxy of a training sweep: FID of a few hundred quick samples.

At every checkpoint of a trial, rank 0 samples `images` images (balanced over the classes, a
few-step sampler, guidance ω) from the EMA weights with fixed per-image seeds, extracts features
with the domain extractor and computes the FID against the reference split's features. The
extractor weights and reference features are prepared once on the driver
(`pipeline.common.features.prepare_reference`) and reach the workers by path. Off unless the
train loop is given a `proxy` entry, so normal training is unchanged.
"""
from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import torch

from models.evaluation.metrics import frechet_distance
from pipeline.common.artifacts import make_schedule
from pipeline.common.features import balanced_plan, extract, generate_images, load_extractor


class ProxyFID:
    """Callable `(ema_net, step) -> fid`; appends every value to proxy_fid.csv in the trial folder."""

    def __init__(self, proxy: dict, cfg, manifest: dict, out_dir: Path):
        self.proxy, self.manifest, self.size = proxy, manifest, cfg.model.image_size
        self.schedule = make_schedule(cfg)
        self.extractor = load_extractor(proxy["extractor_weights"])
        with np.load(proxy["reference"]) as blob:
            self.reference = blob["feats"]
        self.labels, self.seeds = balanced_plan(len(manifest["class_names"]), int(proxy["images"]), cfg.seed, "proxy")
        self.csv = out_dir / "proxy_fid.csv"

    def __call__(self, ema_net: torch.nn.Module, step: int) -> float:
        started = time.perf_counter()
        was_training = ema_net.training
        ema_net.eval()
        device = next(ema_net.parameters()).device
        images = generate_images(ema_net, self.schedule, self.manifest, self.size, self.labels, self.seeds,
                                 sampler=str(self.proxy.get("sampler", "ddim")), steps=int(self.proxy["steps"]),
                                 omega=float(self.proxy["omega"]), batch_size=int(self.proxy["batch_size"]),
                                 bf16=self.proxy.get("bf16", False), device=device)
        ema_net.train(was_training)
        fid = frechet_distance(extract(self.extractor, images), self.reference)
        new = not self.csv.is_file()
        with self.csv.open("a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["step", "fid", "seconds", "time"])
            writer.writerow([step, f"{fid:.6g}", f"{time.perf_counter() - started:.3f}", f"{time.time():.3f}"])
        return fid
