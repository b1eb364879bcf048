"""Fashion-MNIST (Xiao et al. 2017) from IDX files: Debian's dataset-fashion-mnist, a given
folder, or torchvision's download."""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

from pipeline.errors import DataError
from pipeline.sources import SourceData

CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped or not): big-endian header, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("not a uint8 IDX file")
        dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
        data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
        return data.reshape(dims)
    except (OSError, ValueError, EOFError, struct.error) as exc:
        raise DataError(f"cannot read IDX file {path} ({exc}): re-download it or reinstall dataset-fashion-mnist") from None


def _find(folder: Path) -> dict[str, Path] | None:
    for sub in (folder, folder / "FashionMNIST" / "raw"):
        found = {}
        for key, stem in FILES.items():
            for candidate in (sub / f"{stem}.gz", sub / stem):
                if candidate.is_file():
                    found[key] = candidate
                    break
        if len(found) == len(FILES):
            return found
    return None


def _cache_dir() -> Path:
    return Path(os.environ.get("TAILDIFF_CACHE", Path.home() / ".cache" / "taildiff")) / "fashion-mnist"


def load_fashion_mnist(cfg) -> SourceData:
    folders = [Path(cfg.data_root)] if cfg.data_root else [DEBIAN_DIR, _cache_dir()]
    files = next((f for f in map(_find, folders) if f), None)
    if files is None and cfg.download:
        target = folders[0] if cfg.data_root else _cache_dir()
        try:
            from torchvision.datasets import FashionMNIST

            FashionMNIST(str(target), train=True, download=True)
            FashionMNIST(str(target), train=False, download=True)
        except Exception:  # offline, proxy, disk: all end in the same advice below
            pass
        files = _find(target)
    if files is None:
        where = ", ".join(str(f) for f in folders)
        raise DataError(
            f"Fashion-MNIST files not found in {where}: install the Debian package "
            "(apt-get install dataset-fashion-mnist), pass data.data_root=<folder with the "
            "*-idx?-ubyte.gz files>, or go online so torchvision can download them"
        )
    arrays = {key: read_idx(path) for key, path in files.items()}
    for split in ("train", "test"):
        n_img, n_lab = len(arrays[f"{split}_images"]), len(arrays[f"{split}_labels"])
        if n_img != n_lab:
            raise DataError(f"Fashion-MNIST {split} has {n_img} images but {n_lab} labels: the files are mismatched")
    return SourceData(
        class_names=list(CLASS_NAMES),
        train_images=arrays["train_images"][..., None],  # (N, 28, 28, 1)
        train_labels=arrays["train_labels"].astype(np.int64),
        test_images=arrays["test_images"][..., None],
        test_labels=arrays["test_labels"].astype(np.int64),
        origin=str(files["train_images"].parent),
    )
