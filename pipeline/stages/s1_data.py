"""Data stage: a long-tailed dataset as Parquet shards, written through Ray Data.

Output folder `<output_dir>/datasets/<dataset>-<profile>-imb<f>-<hash>/`:
  train/      the long-tailed training split (models train on this)
  reference/  the full balanced training set (what FID and friends compare against)
  test/       the source's test split
  manifest.json, config.json, class_counts.png, class_counts.csv

The folder name carries a hash of the data config: the same config finds the finished folder
and skips the work; a changed config gets a new folder. The build happens in a hidden temp
folder that is renamed into place only when complete, so an interrupted build never leaves a
folder that looks finished.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np

from models.data.longtail import (
    counts_by_label,
    imbalance_ratio,
    long_tailed_counts,
    resolve_class_order,
    select_long_tailed,
)
from pipeline.common.artifacts import MANIFEST, DatasetArtifact, load_dataset
from pipeline.common.files import writable_dir, write_json
from pipeline.common.shards import check_labels, write_split
from pipeline.config import Config, DataConfig, config_hash, stable_hash
from pipeline.sources import SourceData, get_source, source_fingerprint

log = logging.getLogger("taildiff.data")


def dataset_folder_name(d: DataConfig, fingerprint: str | None = None) -> str:
    """<dataset>-<profile>-imb<f>-<hash of the data config (and of the source's files, if they can change)>."""
    imb = "natural" if d.imb_factor is None else f"imb{d.imb_factor:g}"
    key = config_hash(d, exclude=("download",))
    if fingerprint:
        key = stable_hash([key, fingerprint])
    return f"{d.dataset}-{d.profile}-{imb}-{key}"


def run_data(cfg: Config) -> DatasetArtifact:
    """Build (or reuse) the long-tailed dataset of `cfg.data`."""
    d = cfg.data
    root = writable_dir(Path(cfg.output_dir) / "datasets", "output folder")
    fingerprint = source_fingerprint(d)
    final = root / dataset_folder_name(d, fingerprint)
    existing = load_dataset(final, check=True) if (final / MANIFEST).is_file() else None
    if existing is not None:
        log.info("data: reusing %s", final)
        print_counts(existing.manifest)
        return dataclasses.replace(existing, skipped=True)
    if fingerprint:  # the same config built before from other files: say so
        stale = [p.name for p in root.glob(f"{d.dataset}-{d.profile}-*") if (p / MANIFEST).is_file()
                 and json.loads((p / MANIFEST).read_text()).get("data_config_hash") == config_hash(d, exclude=("download",))]
        if stale:
            log.warning("data: the files under %s changed since %s was built; building a new dataset folder",
                        d.data_root, stale[-1])

    started = time.perf_counter()
    source = get_source(d.dataset)(d)
    manifest_core, splits = build_long_tailed(source, d)
    _remove_stale_builds(root, final.name)
    tmp = root / f".tmp-{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        files = {}
        for split, (images, labels, index) in splits.items():
            files[split] = write_split(tmp / split, images, labels, index, d.shard_rows)
        manifest = {
            **manifest_core,
            # the dataset's identity for everything downstream (run keys): config + source files
            "config_hash": final.name.rsplit("-", 1)[-1],
            "data_config_hash": config_hash(d, exclude=("download",)),
            "source_fingerprint": fingerprint,
            "config": dataclasses.asdict(d),
            "files": files,
            "build_seconds": round(time.perf_counter() - started, 3),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json(tmp / "config.json", dataclasses.asdict(d))
        plot_class_counts(manifest, tmp / "class_counts.png")
        _write_counts_csv(manifest, tmp / "class_counts.csv")
        write_json(tmp / MANIFEST, manifest)  # last: its presence marks the folder complete
        try:
            os.rename(tmp, final)
        except OSError:
            if load_dataset(final, check=False) is None:  # a stale, damaged folder: replace it
                shutil.rmtree(final, ignore_errors=True)
                os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("data: built %s in %.1f s", final, time.perf_counter() - started)
    print_counts(manifest)
    return DatasetArtifact(final, manifest, skipped=False)


def _remove_stale_builds(root: Path, name: str) -> None:
    """Delete temp folders of builds of this config whose process is gone (killed mid-build)."""
    for tmp in root.glob(f".tmp-{name}.*"):
        try:
            pid = int(tmp.name.rsplit(".", 2)[-2])
            os.kill(pid, 0)  # raises if no such process: the build died
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue


def build_long_tailed(source: SourceData, d: DataConfig):
    """Select the LT subset; returns the manifest's data fields and the three splits' arrays."""
    num_classes = source.num_classes
    check_labels(source.train_labels, num_classes, f"{d.dataset} training labels")
    check_labels(source.test_labels, num_classes, f"{d.dataset} test labels")
    available = np.bincount(source.train_labels, minlength=num_classes)
    order = resolve_class_order(d.class_order, source.class_names, seed=d.seed)
    if d.imb_factor is None:  # imagefolder: keep its own counts
        target = available.tolist()
        n_max = int(available.max())
    else:
        n_max = d.n_max if d.n_max is not None else int(available.min())
        target = counts_by_label(long_tailed_counts(n_max, num_classes, d.profile, d.imb_factor), order)
    selected = select_long_tailed(source.train_labels, target, seed=d.seed)
    train_labels = source.train_labels[selected]
    counts = np.bincount(train_labels, minlength=num_classes).tolist()
    short = [source.class_names[c] for c in range(num_classes) if counts[c] < target[c]]
    if short:
        log.warning("data: classes %s have fewer images than the profile asks for; all of theirs are used", short)
    meta = {
        "dataset": d.dataset,
        "profile": d.profile,
        "imb_factor": d.imb_factor,
        "n_max": n_max,
        "seed": d.seed,
        "class_names": source.class_names,
        "class_order": order,
        "class_counts": counts,
        "target_counts": [int(t) for t in target],
        "imbalance_ratio": imbalance_ratio(counts),
        "num_train": int(len(selected)),
        "num_reference": int(len(source.train_labels)),
        "num_test": int(len(source.test_labels)),
        "reference_counts": available.tolist(),
        "test_counts": np.bincount(source.test_labels, minlength=num_classes).tolist(),
        "image_shape": list(source.image_shape),
        "source": source.origin,
        "skipped_images": {"count": len(source.skipped), "files": source.skipped[:100]},
        "columns": {"image": "uint8 (H, W, C)", "label": "int64", "index": "position in the source split",
                    "row": "position in this split"},
    }
    splits = {
        "train": (source.train_images[selected], train_labels, selected),
        "reference": (source.train_images, source.train_labels, np.arange(len(source.train_labels))),
        "test": (source.test_images, source.test_labels, np.arange(len(source.test_labels))),
    }
    return meta, splits


def print_counts(manifest: dict) -> None:
    """Per-class count table, head-first as the profile orders them."""
    names, counts = manifest["class_names"], manifest["class_counts"]
    ref = manifest["reference_counts"]
    width = max(10, max(len(n) for n in names))
    lines = [
        f"{manifest['dataset']} {manifest['profile']} imb={manifest['imb_factor']} "
        f"train={manifest['num_train']} reference={manifest['num_reference']} test={manifest['num_test']} "
        f"ratio={manifest['imbalance_ratio']:.1f}",
        f"{'label':>5}  {'class':<{width}} {'train':>7} {'share':>7} {'reference':>9}",
    ]
    total = max(1, sum(counts))
    for label in manifest["class_order"]:
        lines.append(
            f"{label:>5}  {names[label]:<{width}} {counts[label]:>7} {counts[label] / total:>7.2%} {ref[label]:>9}"
        )
    print("\n".join(lines), flush=True)


def plot_class_counts(manifest: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = manifest["class_order"]
    names = [manifest["class_names"][c] for c in order]
    counts = [manifest["class_counts"][c] for c in order]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(order)), 4.0))
    bars = ax.bar(range(len(order)), counts, color="#3b6ea8")
    ax.set_yscale("log")
    ax.set_ylabel("training images (log scale)")
    ax.set_title(
        f"{manifest['dataset']}: {manifest['profile']} profile, imb={manifest['imb_factor']}, "
        f"{manifest['num_train']} images, ratio {manifest['imbalance_ratio']:.0f}:1"
    )
    if len(order) <= 40:
        ax.set_xticks(range(len(order)), names, rotation=45, ha="right")
        for bar, n in zip(bars, counts):
            ax.annotate(str(n), (bar.get_x() + bar.get_width() / 2, n), ha="center", va="bottom", fontsize=7)
    else:
        ax.set_xlabel("classes, most to least frequent")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _write_counts_csv(manifest: dict, out: Path) -> None:
    rows = ["label,class,train,reference,test"]
    for c, name in enumerate(manifest["class_names"]):
        rows.append(f"{c},\"{name}\",{manifest['class_counts'][c]},{manifest['reference_counts'][c]},"
                    f"{manifest['test_counts'][c]}")
    out.write_text("\n".join(rows) + "\n")
