"""Small files written in each source's real on-disk format, for tests that cannot download."""
import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.sources.fashion_mnist import DEBIAN_DIR

requires_fmnist = pytest.mark.skipif(
    not (DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="apt-get install dataset-fashion-mnist (scripts/setup.sh does it)",
)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fake_fmnist(root: Path, n_train=40, n_test=20) -> None:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    write_idx(root / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (n_train, 28, 28)))
    write_idx(root / "train-labels-idx1-ubyte.gz", np.arange(n_train) % 10)
    write_idx(root / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (n_test, 28, 28)))
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.arange(n_test) % 10)


def write_fake_cifar(root: Path, which: str, per_batch=20) -> np.ndarray:
    """Files in the python-pickle format of the official archives; returns the first train batch."""
    rng = np.random.default_rng(1)
    if which == "cifar10":
        folder = root / "cifar-10-batches-py"
        names, key, classes = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "labels", 10
        meta = ("batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    else:
        folder = root / "cifar-100-python"
        names, key, classes = ["train", "test"], "fine_labels", 100
        meta = ("meta", {"fine_label_names": [f"f{i}" for i in range(100)]})
        per_batch = 200
    folder.mkdir(parents=True)
    first = None
    for name in names:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        first = data if first is None else first
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, key: [i % classes for i in range(per_batch)]}, f, protocol=2)
    with open(folder / meta[0], "wb") as f:
        pickle.dump(meta[1], f, protocol=2)
    return first


def write_imagefolder(root: Path, counts: dict, size=(8, 8), mode="RGB") -> None:
    rng = np.random.default_rng(2)
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / name / f"{i}.png")


DIGIT_NAMES = [f"digit{i}" for i in range(10)]
DIGIT_COUNTS = [131, 101, 78, 60, 46, 35, 27, 21, 16, 13]


def write_tiny_checkpoint(path: Path, scale: float = 0.02, seed: int = 0) -> Path:
    """A digits model.pt as the train stage writes it: 8x8 images, the digits preset's network with
    random offsets of `scale` on every weight (no layer left at zero or at its 1e-5 output gain)."""
    import json

    import torch

    from pipeline.common.artifacts import build_net
    from pipeline.config import load_config

    repo = Path(__file__).resolve().parent.parent
    cfg = load_config(repo / "configs" / "digits_lt.yaml", ["model.image_size=8"])
    manifest = {"dataset": "digits", "profile": "exp", "imb_factor": 0.1, "image_shape": [8, 8, 1],
                "class_names": DIGIT_NAMES, "class_counts": DIGIT_COUNTS,
                "imbalance_ratio": DIGIT_COUNTS[0] / DIGIT_COUNTS[-1], "num_train": sum(DIGIT_COUNTS)}
    torch.manual_seed(seed)
    net = build_net(cfg, manifest)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"ema": net.state_dict(), "step": 300,
                "config": json.dumps({"run": cfg.to_dict(), "manifest": manifest, "method": "ddpm"})}, path)
    return path
