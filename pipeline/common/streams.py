"""Ray Data streams: class-rebalanced training streams, and the plans the sampling actors consume.

The long-tailed split is small by construction (a few head classes plus many small tail
classes), so it is read from its Parquet shards once and held in the object store, shared
zero-copy by every worker on a node. What streams is the epoch *plan*: a Ray Data pipeline
over blocks of plan positions whose map step draws the epoch's plan (models/resampling.py)
and gathers the rows. Re-iterating the dataset — one execution per epoch, including through
Ray Train's `get_dataset_shard` — draws the next epoch: the epoch number is `start_epoch` plus
Ray Data's execution index, read through a `RandomSeedConfig` with `reseed_after_execution`,
so epochs differ, are reproducible, and a resumed run can continue at its epoch.

Blocks hold a whole number of batches, so in `balanced_batch` mode each batch that
`iter_torch_batches(batch_size=resample.batch_size)` yields is exactly class-balanced.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import ray
from ray.data import RandomSeedConfig

from models.data.resampling import class_probabilities, epoch_plan
from pipeline.common.shards import read_split

if TYPE_CHECKING:  # pipeline.config imports torch (the method registry): the stream's processes
    from pipeline.config import ResampleConfig  # (split coordinator, map tasks) would pay 2-3 s each

TARGET_BLOCK_ROWS = 4096


def plan_length(num_rows: int, rcfg: ResampleConfig) -> int:
    """Rows one epoch yields: epoch_size (default: the split's size), whole batches in balanced_batch."""
    size = rcfg.epoch_size or num_rows
    if rcfg.mode == "balanced_batch":
        return (size // rcfg.batch_size) * rcfg.batch_size
    return size


def expected_frequencies(labels: np.ndarray, rcfg: ResampleConfig) -> np.ndarray:
    """The class frequencies a stream targets. Shape (C,)."""
    counts = np.bincount(labels)
    return class_probabilities(counts, rcfg.mode, rcfg.power)


def plan_kwargs(rcfg: ResampleConfig) -> dict:
    """The ResampleConfig fields the map step reads, as a plain dict (what it is pickled with)."""
    return {"plan_args": {k: getattr(rcfg, k) for k in ("mode", "power", "epoch_size", "batch_size")}}


def _gather_block(batch: dict, *, arrays_ref, plan_args: dict, seed: int, start_epoch: int,
                  block_rows: int, seed_config: RandomSeedConfig, data_context) -> dict:
    """Map step: a block of plan positions -> the rows the plan puts there. `plan_args`: the
    ResampleConfig's fields as a plain dict, so that unpickling this step imports no torch."""
    arrays = ray.get(arrays_ref)  # zero-copy views of the object-store copy
    epoch = start_epoch + seed_config.get_seed_tuple(data_context=data_context).execution_idx
    plan = epoch_plan(arrays["label"], plan_args["mode"], seed=seed, epoch=epoch, power=plan_args["power"],
                      epoch_size=plan_args["epoch_size"] or len(arrays["label"]), batch_size=plan_args["batch_size"])
    parts = [plan[b * block_rows:(b + 1) * block_rows] for b in batch["id"]]
    rows = np.concatenate(parts) if parts else np.zeros(0, np.int64)  # (R,)
    return {
        "image": arrays["image"][rows],  # (R, H, W, C) uint8
        "label": arrays["label"][rows],
        "index": arrays["index"][rows],
        "row": rows,
        "epoch": np.full(len(rows), epoch, dtype=np.int64),
    }


def resampled_stream(split_dir: Path | str, image_shape, rcfg: ResampleConfig, *, seed: int,
                     start_epoch: int = 0, num_classes: int | None = None, preserve_order: bool = True,
                     classes: tuple | None = None):
    """A Ray Dataset that yields one rebalanced epoch of the split per iteration.

    Columns: image (H, W, C) uint8, label, index (source position), row (split position), epoch.
    `classes` restricts the stream to those labels (the epoch is their rows, resampled alike).
    `preserve_order` keeps the plan's order (reproducible batches); turn it off for a little
    more throughput when order does not matter.
    """
    arrays = read_split(Path(split_dir), tuple(image_shape), num_classes)
    arrays.pop("row")
    if classes is not None:  # a class subset (DiffRC's head-class source model), labels unchanged
        keep = np.isin(arrays["label"], list(classes))
        arrays = {k: v[keep] for k, v in arrays.items()}
    length = plan_length(len(arrays["label"]), rcfg)
    block_rows = max(1, TARGET_BLOCK_ROWS // rcfg.batch_size) * rcfg.batch_size
    num_blocks = -(-length // block_rows)
    arrays_ref = ray.put(arrays)
    blocks = ray.data.range(num_blocks, override_num_blocks=num_blocks)
    blocks.context.execution_options.preserve_order = preserve_order
    return blocks.map_batches(
        _gather_block,
        batch_size=None,
        batch_format="numpy",
        fn_kwargs=dict(
            arrays_ref=arrays_ref, **plan_kwargs(rcfg), seed=seed, start_epoch=start_epoch, block_rows=block_rows,
            seed_config=RandomSeedConfig(seed=seed, reseed_after_execution=True),
            data_context=blocks.context,
        ),
    )


def _plan_slice(batch: dict, *, rows_ref, bounds: list[int]) -> dict:
    """Map step: block ids -> those blocks of a generation plan's rows (label, k, seed, ...): block b
    is rows[bounds[b]:bounds[b + 1]]."""
    rows = ray.get(rows_ref)
    ids = [int(b) for b in batch["id"]]
    return {k: np.concatenate([v[bounds[b]:bounds[b + 1]] for b in ids]) for k, v in rows.items()}


def plan_bounds(set_sizes: list[int], batch_sizes: list[int]) -> list[int]:
    """Block boundaries of plans laid end to end: each set in blocks of its own batch size, so that no
    block holds rows of two sets. [0, ..., total]."""
    bounds, offset = [], 0
    for n, b in zip(set_sizes, batch_sizes):
        bounds.extend(range(offset, offset + n, max(1, int(b))))
        offset += n
    return bounds + [offset]


def plan_dataset(rows: dict[str, np.ndarray], bounds: list[int]):
    """A generation plan (the sample stage's, the augmentation sets') as a Ray Dataset of one block
    per sampling batch (rows[bounds[b]:bounds[b + 1]], see plan_bounds), so work spreads over an actor
    pool. Built lazily from a range, so nothing runs before the pool starts: `ray.data.from_arrow`
    computes each block's metadata in remote tasks the driver waits for, in fresh worker processes
    after a fit (50 digits images right after a fit: 10.0-10.2 s with it, 8.9-9.3 s without, on 2 cores)."""
    blocks = max(1, len(bounds) - 1)
    bounds = list(bounds) if len(bounds) > 1 else [0, 0]
    return ray.data.range(blocks, override_num_blocks=blocks).map_batches(
        _plan_slice, batch_size=None, batch_format="numpy",
        fn_kwargs=dict(rows_ref=ray.put({k: np.asarray(v) for k, v in rows.items()}), bounds=bounds))
