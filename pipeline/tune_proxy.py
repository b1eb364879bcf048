"""The intermediate quality proxy of a training sweep: FID of a few hundred quick samples.

At every checkpoint of a trial, rank 0 samples `images` images (balanced over the classes, DDIM
with few steps, guidance ω) from the EMA weights with fixed per-image seeds, extracts features
with the domain extractor and computes the FID against the reference split's features. The
extractor weights and reference features are prepared once on the driver
(`prepare_reference`) and reach the workers by path. Off unless the train loop is given a
`proxy` entry, so normal training is unchanged.
"""
from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import torch

from models.images import to_uint8_images
from models.metrics import frechet_distance
from models.sampling import SAMPLERS, CFGDenoiser, ImageNoise
from models.seeding import derive_seed


def prepare_reference(cfg, data, folder: Path) -> dict:
    """Domain extractor weights + reference features (npz) for the proxy and the sample sweep."""
    from pipeline.evaluate import Extractor, real_features

    extractor = Extractor(cfg, data)
    real = real_features(extractor, cfg, data)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "reference_features.npz"
    np.savez(path, feats=real["reference_feats"], labels=real["reference_labels"])
    return {"extractor_weights": extractor.info["weights"], "reference": str(path.resolve()),
            "extractor": extractor.info}


def load_extractor(weights: str):
    """The domain extractor as torch-fidelity builds it (the evaluate stage's features)."""
    import torch_fidelity.utils as tfu

    from models.features import register_domain_extractor

    return tfu.create_feature_extractor(register_domain_extractor(), ["128"], cuda=False, verbose=False,
                                        feature_extractor_weights_path=weights)


@torch.no_grad()
def extract(net, images: np.ndarray, batch: int = 1000) -> np.ndarray:
    """uint8 (N, H, W, C) -> (N, 128) float64 features."""
    out = []
    for start in range(0, len(images), batch):
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch])).permute(0, 3, 1, 2)  # (b, C, H, W)
        out.append(net(x.contiguous())[0].double().numpy())
    return np.concatenate(out)


def balanced_plan(num_classes: int, images: int, seed: int, tag: str) -> tuple[np.ndarray, np.ndarray]:
    """Labels and per-image seeds of a class-balanced set of `images` images (fixed across calls)."""
    labels = np.arange(images, dtype=np.int64) % num_classes
    seeds = np.array([derive_seed(seed, tag, int(i)) for i in range(images)], dtype=np.int64)
    return labels, seeds


@torch.no_grad()
def generate(net, schedule, manifest: dict, size: int, labels, seeds, *, sampler: str = "ddim", steps: int = 10,
             omega: float = 1.0, eta: float = 0.0, batch_size: int = 100, bf16: bool = False,
             device="cpu") -> np.ndarray:
    """uint8 (N, H, W, C) samples of the given labels, each from its own seed."""
    H, W, C = manifest["image_shape"]
    denoiser = CFGDenoiser(net, omega, net.null_label, autocast_dtype=torch.bfloat16 if bf16 else None)
    options = {"steps": steps, "eta": eta} if sampler == "ddim" else {}
    out = []
    for start in range(0, len(labels), batch_size):
        noise = ImageNoise([int(s) for s in seeds[start:start + batch_size]], (C, size, size), device)
        y = torch.as_tensor(labels[start:start + batch_size], device=device)
        x = SAMPLERS[sampler](denoiser, schedule, noise, y, **options)  # (b, C, S, S)
        out.append(to_uint8_images(x.float(), H, W).cpu().numpy())
    return np.concatenate(out)


class ProxyFID:
    """Callable `(ema_net, step) -> fid`; appends every value to proxy_fid.csv in the trial folder."""

    def __init__(self, proxy: dict, cfg, manifest: dict, out_dir: Path):
        from pipeline.train import make_schedule

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
        images = generate(ema_net, self.schedule, self.manifest, self.size, self.labels, self.seeds,
                          steps=int(self.proxy["steps"]), omega=float(self.proxy["omega"]),
                          batch_size=int(self.proxy["batch_size"]), bf16=bool(self.proxy.get("bf16", False)),
                          device=device)
        ema_net.train(was_training)
        fid = frechet_distance(extract(self.extractor, images), self.reference)
        new = not self.csv.is_file()
        with self.csv.open("a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["step", "fid", "seconds", "time"])
            writer.writerow([step, f"{fid:.6g}", f"{time.perf_counter() - started:.3f}", f"{time.time():.3f}"])
        return fid
