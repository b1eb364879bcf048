"""Feature extraction for every metric the pipeline reports (evaluate stage, proxy FID, sweeps).

`Extractor` wraps a torch-fidelity feature extractor: `domain` (a classifier trained here once per
dataset on the balanced reference split, cached with its test accuracy) or `inception`
(inception-v3-compat from `evaluate.weights_path`, or its download when online). Real-data
features (reference, LT train, test) are cached per (dataset, extractor, weights) under
`<output_dir>/extractors/`, so reruns reuse them and two extractors never mix.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from models.precision import resolve_bf16
from models.seeding import derive_seed
from pipeline.common.artifacts import DatasetArtifact
from pipeline.common.files import content_stamp
from pipeline.common.shards import read_split
from pipeline.config import Config, stable_hash
from pipeline.errors import TaildiffError

log = logging.getLogger("taildiff.evaluate")


class Extractor:
    """A torch-fidelity feature extractor with the layer names our metrics use."""

    def __init__(self, cfg: Config, data: DatasetArtifact):
        import torch_fidelity.utils as tfu

        e = cfg.evaluate
        self.info: dict = {"extractor": e.extractor}
        if e.extractor == "domain":
            from models.evaluation.features import register_domain_extractor

            weights = domain_weights(cfg, data)
            name, layer, self.channels = register_domain_extractor(), "128", data.image_shape[2]
            self.info.update(weights=str(weights), **json.loads((weights.parent / "domain.json").read_text()))
        else:
            weights = Path(e.weights_path) if e.weights_path else None
            if weights is not None and not weights.is_file():
                raise TaildiffError(f"evaluate.weights_path={weights} does not exist: give the inception weights file")
            if weights is not None:
                check_plain_weights(weights)  # torch-fidelity itself loads with weights_only=False
            name, layer, self.channels = "inception-v3-compat", "2048", 3
            self.info["weights"] = str(weights) if weights else "torch-fidelity download"
        self.layer = layer
        kwargs = {"feature_extractor_weights_path": str(weights)} if weights else {}
        try:
            self.net = tfu.create_feature_extractor(name, [layer, "logits_unbiased"], cuda=False, verbose=False,
                                                    **kwargs)
        except Exception as exc:  # a damaged or foreign weights file, or no network for the download
            raise TaildiffError(f"cannot load the {e.extractor} feature extractor ({type(exc).__name__}: {exc}); "
                                "check evaluate.weights_path") from None
        stamp = content_stamp(weights) if weights else "download"  # by content: the same key on any node
        self.key = f"{e.extractor}-{stable_hash(stamp)}"

    @torch.no_grad()
    def __call__(self, images: np.ndarray, batch: int = 1000) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, H, W, C) -> features (N, D) float64 and logits (N, K)."""
        feats, logits = [], []
        for start in range(0, len(images), batch):
            x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch])).permute(0, 3, 1, 2)
            if self.channels == 3 and x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            f, lg = self.net(x.contiguous())
            feats.append(f.double().numpy())
            logits.append(lg.double().numpy())
        if not feats:
            return np.zeros((0, 1)), np.zeros((0, 1))
        return np.concatenate(feats), np.concatenate(logits)


def check_plain_weights(path: Path) -> None:
    """Refuse a weights file that holds anything but tensors and plain containers: loaded with
    weights_only=True first, so a pickled object that would run code is never unpickled."""
    import pickle

    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise TaildiffError(f"refusing evaluate.weights_path={path}: it is not a plain tensor state dict ({first}); "
                            "give the pt_inception-2015-12-05 weights file torch-fidelity downloads") from None


def domain_weights(cfg: Config, data: DatasetArtifact) -> Path:
    """Train the domain classifier on the balanced reference split once per dataset; cached. Its seed is
    the dataset's (data.seed), not the run's: runs of several training seeds share one extractor, so
    their FIDs are comparable whichever of them trained it."""
    from models.evaluation.features import save_domain_classifier, train_domain_classifier

    e = cfg.evaluate
    bf16 = resolve_bf16(e.domain_bf16, "cpu")  # trained on the driver's CPU; the folder names the precision
    folder = (Path(cfg.output_dir) / "extractors" / data.path.name /
              f"domain-e{e.domain_epochs}{'-bf16' if bf16 else ''}")
    weights = folder / "domain.pt"
    if weights.is_file() and (folder / "domain.json").is_file():
        return weights
    ref = read_split(data.split_dir("reference"), data.image_shape, data.num_classes)
    test = read_split(data.split_dir("test"), data.image_shape, data.num_classes)
    to_t = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    log.info("evaluate: training the domain feature extractor on %d balanced images", len(ref["label"]))
    net, acc, per_class = train_domain_classifier(to_t(ref["image"]), torch.from_numpy(ref["label"]),
                                                  to_t(test["image"]), torch.from_numpy(test["label"]),
                                                  epochs=e.domain_epochs, seed=cfg.data.seed, bf16=bf16)
    folder.mkdir(parents=True, exist_ok=True)
    save_domain_classifier(net, folder / "domain.pt.tmp", test_accuracy=acc)
    os.replace(folder / "domain.pt.tmp", weights)
    (folder / "domain.json").write_text(json.dumps({"test_accuracy": acc, "per_class_accuracy": per_class}))
    log.info("evaluate: domain extractor test accuracy %.4f", acc)
    return weights


def real_features(extractor: Extractor, cfg: Config, data: DatasetArtifact) -> dict:
    """Features of the reference, LT-train and test splits, cached per (dataset, extractor)."""
    cache = Path(cfg.output_dir) / "extractors" / data.path.name / f"features-{extractor.key}.npz"
    if cache.is_file():
        with np.load(cache) as blob:
            return {k: blob[k] for k in blob.files}
    out = {}
    for split in ("reference", "train", "test"):
        arrays = read_split(data.split_dir(split), data.image_shape, data.num_classes)
        out[f"{split}_feats"], out[f"{split}_logits"] = extractor(arrays["image"])
        out[f"{split}_labels"] = arrays["label"]
        if split == "train":
            out["train_images"] = arrays["image"]
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, **out)
    os.replace(tmp, cache)
    return out


def prepare_reference(cfg: Config, data: DatasetArtifact, folder: Path) -> dict:
    """Domain extractor weights + reference features (npz) for workers that compute FIDs (the proxy
    FID of a training sweep, the sampling sweep's actors), prepared once on the driver."""
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

    from models.evaluation.features import register_domain_extractor

    return tfu.create_feature_extractor(register_domain_extractor(), ["128", "logits_unbiased"], cuda=False,
                                        verbose=False, feature_extractor_weights_path=weights)


@torch.no_grad()
def extract(net, images: np.ndarray, batch: int = 1000, *, predictions: bool = False):
    """uint8 (N, H, W, C) -> (N, 128) float64 features; with `predictions`, also the domain
    classifier's predicted class per image (N,) int64 (for class fidelity)."""
    feats, preds = [], []
    for start in range(0, len(images), batch):
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch])).permute(0, 3, 1, 2)  # (b, C, H, W)
        f, logits = net(x.contiguous())
        feats.append(f.double().numpy())
        preds.append(logits.argmax(1).numpy())
    if predictions:
        return np.concatenate(feats), np.concatenate(preds).astype(np.int64)
    return np.concatenate(feats)


def balanced_plan(num_classes: int, images: int, seed: int, tag: str) -> tuple[np.ndarray, np.ndarray]:
    """Labels and per-image seeds of a class-balanced set of `images` images (fixed across calls)."""
    labels = np.arange(images, dtype=np.int64) % num_classes
    seeds = np.array([derive_seed(seed, tag, int(i)) for i in range(images)], dtype=np.int64)
    return labels, seeds


@torch.no_grad()
def generate_images(net, schedule, manifest: dict, size: int, labels, seeds, *, sampler: str = "ddim",
                    steps: int = 10, omega: float = 1.0, eta: float = 0.0, batch_size: int = 100, bf16: bool = False,
                    device="cpu", denoiser=None) -> np.ndarray:
    """uint8 (N, H, W, C) samples of the given labels, each from its own seed (in-process); the
    denoiser is CFG at ω unless one is given (pipeline.common.generation.build_denoiser)."""
    from models.data.images import to_uint8_images
    from models.diffusion.guidance import CFGDenoiser, ImageNoise
    from models.diffusion.samplers import generate

    H, W, C = manifest["image_shape"]
    if denoiser is None:
        denoiser = CFGDenoiser(net, omega, net.null_label,
                               autocast_dtype=torch.bfloat16 if resolve_bf16(bf16, device) else None)
    out = []
    for start in range(0, len(labels), batch_size):
        noise = ImageNoise([int(s) for s in seeds[start:start + batch_size]], (C, size, size), device)
        y = torch.as_tensor(labels[start:start + batch_size], device=device)
        x = generate(denoiser, schedule, noise, y, sampler=sampler, steps=steps, eta=eta)  # (b, C, S, S)
        out.append(to_uint8_images(x.float(), H, W).cpu().numpy())
    return np.concatenate(out)
