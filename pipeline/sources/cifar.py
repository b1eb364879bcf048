"""CIFAR-10 / CIFAR-100 (Krizhevsky 2009) from the python-pickle batches torchvision uses.

Looks in `data_root` (or ~/.cache/taildiff) for `cifar-10-batches-py/` / `cifar-100-python/`;
downloads through torchvision when missing and online. The batches are read here rather than
through torchvision's dataset class so that any files in the official format load (torchvision
also insists on the official checksums).
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np

from pipeline.errors import DataError
from pipeline.sources import SourceData

LAYOUT = {
    "cifar10": dict(folder="cifar-10-batches-py", train=[f"data_batch_{i}" for i in range(1, 6)],
                    test=["test_batch"], meta="batches.meta", names="label_names", labels="labels"),
    "cifar100": dict(folder="cifar-100-python", train=["train"], test=["test"], meta="meta",
                     names="fine_label_names", labels="fine_labels"),
}


# What an official batch pickles: numpy arrays (and their dtypes) inside plain containers.
ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
           ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
           ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}


class _BatchUnpickler(pickle.Unpickler):
    """Refuses every global but the numpy array reconstruction a CIFAR batch needs, so a crafted
    batch cannot run code (plain pickle.load would call anything it names)."""

    def find_class(self, module, name):
        if (module, name) in ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR batch holds only numpy arrays")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            out = _BatchUnpickler(f, encoding="latin1").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, AttributeError) as exc:
        raise DataError(f"cannot read CIFAR batch {path} ({exc}): re-download the dataset") from None
    if not isinstance(out, dict):
        raise DataError(f"CIFAR batch {path} is not a dict of arrays: re-download the dataset")
    return out


def _find(root: Path, layout: dict) -> Path | None:
    for folder in (root / layout["folder"], root):
        if all((folder / name).is_file() for name in layout["train"] + layout["test"] + [layout["meta"]]):
            return folder
    return None


def _read_split(folder: Path, names: list[str], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for name in names:
        entry = _unpickle(folder / name)
        data = np.asarray(entry["data"], dtype=np.uint8)
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # (n, 32, 32, 3)
        labels.append(np.asarray(entry[label_key], dtype=np.int64))
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def _load(cfg, which: str) -> SourceData:
    layout = LAYOUT[which]
    cache = Path(os.environ.get("TAILDIFF_CACHE", Path.home() / ".cache" / "taildiff")) / which
    root = Path(cfg.data_root) if cfg.data_root else cache
    folder = _find(root, layout)
    if folder is None and cfg.download:
        try:
            from torchvision.datasets import CIFAR10, CIFAR100

            (CIFAR10 if which == "cifar10" else CIFAR100)(str(root), train=True, download=True)
        except Exception:  # offline, proxy, disk: all end in the same advice below
            pass
        folder = _find(root, layout)
    if folder is None:
        raise DataError(
            f"{which} files not found under {root}: pass data.data_root=<folder containing "
            f"{layout['folder']}/>, or go online so torchvision can download them"
        )
    meta = _unpickle(folder / layout["meta"])
    train_x, train_y = _read_split(folder, layout["train"], layout["labels"])
    test_x, test_y = _read_split(folder, layout["test"], layout["labels"])
    return SourceData(
        class_names=list(meta[layout["names"]]),
        train_images=train_x, train_labels=train_y,
        test_images=test_x, test_labels=test_y,
        origin=str(folder),
    )


def load_cifar10(cfg) -> SourceData:
    return _load(cfg, "cifar10")


def load_cifar100(cfg) -> SourceData:
    return _load(cfg, "cifar100")
