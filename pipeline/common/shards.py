"""Parquet shards of images: written through Ray Data, readable with or without Ray.

A split is a folder of `part-NNNNN.parquet` files with columns
  image  uint8 tensor (H, W, C) — Ray's tensor extension; plain pyarrow sees large_list<uint8>
  label  int64 class label in [0, C)
  index  int64 position of the image in the source split it came from
  row    int64 position of the row in this split (stable order for readers)
"""
from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import DataError


def tensor_array(images: np.ndarray) -> pa.Array:
    from ray.data.extensions import ArrowTensorArray

    return ArrowTensorArray.from_numpy(np.ascontiguousarray(images))


def write_split(path: Path, images: np.ndarray, labels: np.ndarray, index: np.ndarray, shard_rows: int,
                extra: dict[str, np.ndarray] | None = None) -> list[str]:
    """Write one split as Parquet shards with Ray Data; returns the file names written.
    `extra` adds plain columns (one value per row), e.g. the classify stage's `synthetic` flag."""
    import ray
    from ray.data.datasource import FilenameProvider

    class ShardNames(FilenameProvider):
        def get_filename_for_task(self, write_uuid, task_index):
            return f"part-{task_index:05d}.parquet"

        def get_filename_for_block(self, block, write_uuid, task_index, block_index):
            return f"part-{task_index:05d}-{block_index:03d}.parquet"

    n = len(labels)
    tables = []
    for start in range(0, max(n, 1), shard_rows):
        stop = min(start + shard_rows, n)
        tables.append(pa.table({
            "image": tensor_array(images[start:stop]),
            "label": pa.array(labels[start:stop], pa.int64()),
            "index": pa.array(index[start:stop], pa.int64()),
            "row": pa.array(np.arange(start, stop), pa.int64()),
            **{name: pa.array(values[start:stop]) for name, values in (extra or {}).items()},
        }))
    # The folder is a fresh temp folder of the data stage, so OVERWRITE (which lets the file
    # names carry no write UUID) cannot clobber anything.
    ray.data.from_arrow(tables).write_parquet(
        str(path), filename_provider=ShardNames(), mode=ray.data.SaveMode.OVERWRITE
    )
    return sorted(os.path.basename(f) for f in glob.glob(str(path / "*.parquet")))


def column_to_numpy(column: pa.ChunkedArray, image_shape: tuple[int, ...]) -> np.ndarray:
    chunks = []
    for chunk in column.chunks:
        if isinstance(chunk, pa.ExtensionArray):
            chunk = chunk.storage
        chunks.append(np.asarray(chunk.flatten().to_numpy(zero_copy_only=False), dtype=np.uint8))
    flat = np.concatenate(chunks) if chunks else np.zeros(0, np.uint8)
    return flat.reshape((-1,) + tuple(image_shape))


def read_split(path: Path, image_shape: tuple[int, ...], num_classes: int | None = None) -> dict[str, np.ndarray]:
    """Load a whole split as arrays ordered by `row`; checks labels when num_classes is given."""
    files = sorted(glob.glob(str(Path(path) / "*.parquet")))
    if not files:
        raise DataError(f"no Parquet shards in {path}: rerun the data stage (delete the folder if it is damaged)")
    try:
        table = pa.concat_tables([pq.read_table(f) for f in files])
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"cannot read shards in {path} ({exc}): delete the folder and rerun the data stage") from None
    out = {
        "image": column_to_numpy(table.column("image"), image_shape),  # (N, H, W, C)
        "label": table.column("label").to_numpy().astype(np.int64),
        "index": table.column("index").to_numpy().astype(np.int64),
        "row": table.column("row").to_numpy().astype(np.int64),
    }
    order = np.argsort(out["row"], kind="stable")
    out = {k: v[order] for k, v in out.items()}
    if num_classes is not None:
        check_labels(out["label"], num_classes, path)
    return out


def check_labels(labels: np.ndarray, num_classes: int, where) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)]
        raise DataError(
            f"shards in {where} hold labels outside [0, {num_classes}) (e.g. {int(bad[0])}): the dataset "
            "folder is damaged or from another config; delete it and rerun the data stage"
        )


def validate_split_labels(path: Path, num_classes: int) -> int:
    """Read only the label column of every shard and check its range; returns the row count."""
    files = sorted(glob.glob(str(Path(path) / "*.parquet")))
    if not files:
        raise DataError(f"no Parquet shards in {path}: delete the folder and rerun the data stage")
    total = 0
    for f in files:
        try:
            labels = pq.read_table(f, columns=["label"]).column("label").to_numpy()
        except (OSError, pa.ArrowException, KeyError) as exc:
            raise DataError(f"cannot read shard {f} ({exc}): delete the folder and rerun the data stage") from None
        check_labels(labels, num_classes, f)
        total += len(labels)
    return total
