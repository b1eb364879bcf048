"""What the stages hand each other: artifact types and their loaders, in one place, so that no
stage imports another stage.

  DatasetArtifact     s1_data     the long-tailed dataset folder (Parquet splits + manifest)
  ModelArtifact       s2_train    train/<method>/model.pt (EMA weights) + metrics
  SampleArtifact      s3_sample   samples/<set>/images/*.parquet (image, label, k, seed)
  EvalArtifact        s4_evaluate evaluation/<method>/metrics.json
  ClassifierArtifact  s5_classify classify/<arm>/model.pt + metrics

Loaders (`load_dataset`, `load_model`, `load_samples`, `load_classifier`) read only what a
finished stage wrote, with `torch.load(weights_only=True)`: no file the pipeline reads can run code.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.common.shards import column_to_numpy, validate_split_labels
from pipeline.errors import DataError, TaildiffError

SPLITS = ("train", "reference", "test")
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class DatasetArtifact:
    """A finished data-stage folder and its manifest."""

    path: Path
    manifest: dict
    skipped: bool  # True when an existing folder was reused

    def split_dir(self, split: str) -> Path:
        return self.path / split

    @property
    def num_classes(self) -> int:
        return len(self.manifest["class_names"])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest["image_shape"])


def load_dataset(path: Path, check: bool = True) -> DatasetArtifact | None:
    """Open a finished data folder; with `check`, verify shards exist and labels are in range."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    art = DatasetArtifact(path, manifest, skipped=True)
    if check:
        for split in SPLITS:
            expected = {"train": "num_train", "reference": "num_reference", "test": "num_test"}[split]
            rows = validate_split_labels(path / split, art.num_classes)
            if rows != manifest[expected]:
                raise DataError(
                    f"{path / split} has {rows} rows but the manifest says {manifest[expected]}: "
                    "delete the folder and rerun the data stage"
                )
    return art


@dataclass(frozen=True)
class ModelArtifact:
    method: str
    path: Path  # train/<method>/
    metrics: dict
    skipped: bool

    @property
    def weights(self) -> Path:
        return self.path / "model.pt"


def build_net(cfg, manifest: dict) -> torch.nn.Module:
    """The denoiser of `cfg.model` for a dataset manifest (channels, classes)."""
    from models.diffusion.unet import build_unet

    extra = {} if cfg.model.dropout is None else {"dropout": cfg.model.dropout}
    return build_unet(cfg.model.preset, in_channels=manifest["image_shape"][2],
                      num_classes=len(manifest["class_names"]), cond_drop=cfg.model.cond_drop, **extra)


def make_schedule(cfg):
    from models.diffusion.schedule import NoiseSchedule

    return NoiseSchedule(cfg.model.schedule, cfg.model.timesteps)


def model_extras(path: Path) -> dict:
    """What a model.pt says about sampling from it: method, conditional backbone, guidance."""
    saved = json.loads(torch.load(Path(path), map_location="cpu", weights_only=True)["config"])
    return {"method": saved.get("method"), "conditional": saved.get("conditional", True),
            "guidance": saved.get("guidance")}


def load_model(path: Path, device: str | torch.device = "cpu"):
    """EMA denoiser from a model.pt, with the Config and data manifest it was trained with."""
    from pipeline.config import config_from_dict

    import pickle

    try:
        blob = torch.load(Path(path), map_location="cpu", weights_only=True)
        saved = json.loads(blob["config"])
        cfg = config_from_dict(saved["run"])
    except pickle.UnpicklingError as exc:
        raise TaildiffError(f"refusing model weights {path}: they hold pickled objects that weights_only loading "
                            f"will not run ({str(exc).strip().splitlines()[0][:160]}); give a model.pt written by the "
                            "train stage") from None
    except Exception as exc:  # noqa: BLE001 - truncated, foreign or from another version: one answer
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TaildiffError(f"cannot load model weights {path} ({first[:200]}): give a model.pt written by the "
                            "train stage, or rerun it") from None
    net = build_net(cfg, saved["manifest"])
    net.load_state_dict(blob["ema"])
    return net.to(device).eval().requires_grad_(False), cfg, saved["manifest"]


@dataclass(frozen=True)
class SampleArtifact:
    method: str
    path: Path
    num_images: int
    skipped: bool

    @property
    def images_dir(self) -> Path:
        return self.path / "images"

    @property
    def key(self) -> str:
        return json.loads((self.path / "manifest.json").read_text())["key"]


def load_samples(sample: SampleArtifact, image_shape, allow_empty: bool = False) -> dict:
    """A sample set's image (N, H, W, C) uint8, label and per-image seed, shape-checked."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(sample.images_dir.glob("*.parquet"))
    if not files and allow_empty:  # a plan with nothing to generate
        return {"image": np.zeros((0, *image_shape), np.uint8), "label": np.zeros(0, np.int64),
                "seed": np.zeros(0, np.int64), "k": np.zeros(0, np.int64)}
    if not files:
        raise DataError(f"no samples in {sample.images_dir}: rerun the sample stage")
    images, labels, seeds, ks = [], [], [], []
    for f in files:
        table = pq.read_table(f)
        flat = table.column("image").combine_chunks()
        storage = flat.storage if isinstance(flat, pa.ExtensionArray) else flat
        per_image = len(storage.flatten()) // max(1, len(table))
        if per_image != int(np.prod(image_shape)):
            raise DataError(f"samples in {f} hold {per_image} values per image but the reference images are "
                            f"{tuple(image_shape)} (H, W, C): sample and evaluate the same dataset")
        images.append(column_to_numpy(table.column("image"), tuple(image_shape)))
        labels.append(table.column("label").to_numpy().astype(np.int64))
        seeds.append(table.column("seed").to_numpy().astype(np.int64))
        ks.append(table.column("k").to_numpy().astype(np.int64))
    return {"image": np.concatenate(images), "label": np.concatenate(labels), "seed": np.concatenate(seeds),
            "k": np.concatenate(ks)}


@dataclass(frozen=True)
class EvalArtifact:
    method: str
    path: Path
    metrics: dict
    skipped: bool


@dataclass(frozen=True)
class Arm:
    """One classifier: a recipe on the real LT split, or on real + one method's synthetic images."""

    name: str
    recipe: str
    method: str | None = None  # the diffusion method whose samples augment; None = real only
    seed: int = 0  # the arm's training seed index (classify.seeds)


@dataclass(frozen=True)
class ClassifierArtifact:
    arm: Arm
    path: Path
    metrics: dict
    composition: dict
    skipped: bool


def build_classifier(recipe_name: str, num_classes: int, in_channels: int) -> torch.nn.Module:
    from models.classify.lt_losses import get_recipe
    from models.classify.resnet import resnet32

    return resnet32(num_classes, in_channels, normed=get_recipe(recipe_name).normed_head)


def load_classifier(weights: Path) -> tuple[torch.nn.Module, int]:
    """(the classifier in eval mode, the input canvas size it was trained on)."""
    blob = torch.load(weights, map_location="cpu", weights_only=True)
    net = build_classifier(blob["recipe"], blob["num_classes"], blob["in_channels"])
    net.load_state_dict(blob["net"])
    return net.eval(), int(blob.get("input_size", 32))
