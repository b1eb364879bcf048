"""A folder per class of the user's own images (torchvision ImageFolder layout).

`root/<class>/*.png|jpg|...`, classes in sorted order. If `root/train/` and `root/test/` both
exist they are the splits; otherwise a stratified `test_fraction` of each class is held out
(seeded). The natural counts are kept unless the config asks for an imbalance profile.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pipeline.errors import DataError
from pipeline.sources import SourceData

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def _list_classes(root: Path) -> tuple[list[str], list[list[Path]]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"imagefolder {root} has no class folders: lay images out as {root}/<class>/<image>.png")
    files = []
    for name in classes:
        found = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
        if not found:
            raise DataError(
                f"imagefolder class {name!r} ({root / name}) has no images: add images or remove the folder"
            )
        files.append(found)
    return classes, files


def _decode(path: Path, mode: str, size: int | None) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert(mode)
        if size is not None:
            # resize the short side to `size`, then centre-crop (torchvision's Resize + CenterCrop)
            w, h = im.size
            scale = size / min(w, h)
            im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
            w, h = im.size
            left, top = (w - size) // 2, (h - size) // 2
            im = im.crop((left, top, left + size, top + size))
        arr = np.asarray(im, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr  # (H, W, C)


def _decode_all(paths: list[Path], cfg) -> tuple[list[np.ndarray | None], list[str]]:
    mode = "L" if cfg.channels == 1 else "RGB"

    def one(path):
        try:
            return _decode(path, mode, cfg.image_size), None
        except Exception as exc:  # PIL raises many types for a broken file
            return None, (str(path), f"{type(exc).__name__}: {exc}")

    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        results = list(pool.map(one, paths))
    errors = [err for _, err in results if err]
    if errors and cfg.on_corrupt == "fail":
        path, why = errors[0]
        raise DataError(
            f"cannot read image {path} ({why}; {len(errors)} unreadable in all): fix or delete it, "
            "or set data.on_corrupt=skip to leave unreadable images out"
        )
    return [img for img, _ in results], [path for path, _ in errors]


def _stack(images: list[np.ndarray], labels: list[int], root: Path):
    shapes = {img.shape for img in images}
    if len(shapes) > 1:
        a, b = sorted(shapes)[:2]
        raise DataError(
            f"imagefolder {root} has images of different sizes ({a[1]}x{a[0]} and {b[1]}x{b[0]}): "
            "set data.image_size=<pixels> to resize them to one square size"
        )
    if not images:
        return np.zeros((0, 1, 1, 1), np.uint8), np.zeros(0, np.int64)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def _read_split(root: Path, classes: list[str], cfg, skipped: list[str]):
    names, files = _list_classes(root)
    if names != classes:
        raise DataError(f"{root} has classes {names} but the training split has {classes}: make them match")
    paths = [p for group in files for p in group]
    labels = [c for c, group in enumerate(files) for _ in group]
    decoded, bad = _decode_all(paths, cfg)
    skipped.extend(bad)
    keep = [i for i, img in enumerate(decoded) if img is not None]
    for c, name in enumerate(classes):
        if not any(labels[i] == c for i in keep):
            raise DataError(f"imagefolder class {name!r} in {root} has no readable images: add valid images")
    return _stack([decoded[i] for i in keep], [labels[i] for i in keep], root)


def fingerprint(cfg) -> str:
    """What the images are, not only what the config says: every image file's relative path, size
    and modification time, hashed. A fixed, added or removed image gives a new dataset folder."""
    import hashlib

    root = Path(cfg.data_root)
    digest = hashlib.sha256()
    if root.is_dir():
        for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS):
            st = path.stat()
            digest.update(f"{path.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:10]


def check_root(cfg) -> Path:
    """data.data_root is given and is a folder (also checked before Ray starts: pipeline/common/preflight.py)."""
    if not cfg.data_root:
        raise DataError("dataset imagefolder needs data.data_root=<folder with one subfolder per class>")
    root = Path(cfg.data_root)
    if not root.is_dir():
        raise DataError(f"imagefolder root {root} does not exist: pass data.data_root=<an existing folder>")
    return root


def load_imagefolder(cfg) -> SourceData:
    root = check_root(cfg)
    skipped: list[str] = []
    top = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    split_root = root / "train" if (root / "train").is_dir() and (root / "test").is_dir() else root
    if len([p for p in split_root.iterdir() if p.is_dir() and not p.name.startswith(".")]) < 2 and top:
        raise DataError(f"imagefolder {split_root} has one class folder: a long-tailed dataset needs at least two "
                        "classes (one folder each)")
    if (root / "train").is_dir() and (root / "test").is_dir():
        classes, _ = _list_classes(root / "train")
        train_x, train_y = _read_split(root / "train", classes, cfg, skipped)
        test_x, test_y = _read_split(root / "test", classes, cfg, skipped)
    else:
        classes, _ = _list_classes(root)
        images, labels = _read_split(root, classes, cfg, skipped)
        rng = np.random.RandomState(cfg.seed)
        test_mask = np.zeros(len(labels), dtype=bool)
        for c in range(len(classes)):
            idx = np.flatnonzero(labels == c)
            # every class keeps >= 1 training image and, when it can spare one, >= 1 test image
            n_test = int(round(len(idx) * cfg.test_fraction))
            if cfg.test_fraction > 0 and len(idx) >= 2:
                n_test = max(n_test, 1)
            n_test = min(n_test, len(idx) - 1)
            test_mask[rng.permutation(idx)[:n_test]] = True
        train_x, train_y = images[~test_mask], labels[~test_mask]
        test_x, test_y = images[test_mask], labels[test_mask]
        if len(test_y) == 0:
            test_x = np.zeros((0,) + images.shape[1:], np.uint8)
    return SourceData(
        class_names=classes,
        train_images=train_x, train_labels=train_y,
        test_images=test_x, test_labels=test_y,
        origin=str(root), skipped=skipped,
    )
