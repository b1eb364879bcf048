"""Dataset sources: small adapters that turn files on disk into uint8 HWC arrays.

Each adapter returns a `SourceData` with the full (usually balanced) training split, the test
split and the class names; the data stage makes the long-tailed subset from it. None of them
imports ray, so they also run on a machine without the orchestration stack.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np


@dataclass
class SourceData:
    """A dataset as arrays. Images are uint8 (N, H, W, C); labels int64 in [0, C)."""

    class_names: list[str]
    train_images: np.ndarray  # (N, H, W, C) uint8
    train_labels: np.ndarray  # (N,) int64
    test_images: np.ndarray  # (M, H, W, C) uint8
    test_labels: np.ndarray  # (M,) int64
    origin: str  # where the files were read from, for the manifest
    skipped: list[str] = field(default_factory=list)  # unreadable files skipped by policy

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.train_images.shape[1:])


# name -> "module:function"; imported on use so that torchvision/PIL load only when needed.
SOURCES: dict[str, str] = {
    "fashion-mnist": "pipeline.sources.fashion_mnist:load_fashion_mnist",
    "digits": "pipeline.sources.digits:load_digits",
    "cifar10": "pipeline.sources.cifar:load_cifar10",
    "cifar100": "pipeline.sources.cifar:load_cifar100",
    "imagefolder": "pipeline.sources.imagefolder:load_imagefolder",
}


def get_source(name: str) -> Callable[..., SourceData]:
    """The loader for a dataset name; every loader takes the `DataConfig`."""
    module, func = SOURCES[name].split(":")
    return getattr(importlib.import_module(module), func)


def source_fingerprint(cfg) -> str | None:
    """A hash of the source's files for sources whose content can change under one config
    (imagefolder); None for the fixed public datasets."""
    module, _ = SOURCES[cfg.dataset].split(":")
    fn = getattr(importlib.import_module(module), "fingerprint", None)
    return fn(cfg) if fn else None
