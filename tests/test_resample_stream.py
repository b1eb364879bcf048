"""The class-rebalanced Ray Data stream: frequencies, per-epoch redraws, reproducibility, batches."""
import numpy as np
import pytest

from models.data.resampling import class_probabilities, epoch_plan
from pipeline.config import ResampleConfig
from pipeline.stages.s1_data import run_data
from pipeline.common.streams import resampled_stream
from pipeline.common.shards import read_split


@pytest.fixture(scope="module")
def digits_lt(ray_session, tmp_path_factory):
    from pipeline.config import load_config
    from conftest import REPO

    out = tmp_path_factory.mktemp("stream")
    return run_data(load_config(REPO / "configs" / "digits_lt.yaml", [f"output_dir={out}"]))


def _epoch(ds, batch_size):
    batches = list(ds.iter_torch_batches(batch_size=batch_size))
    return {k: np.concatenate([b[k].numpy() for b in batches]) for k in batches[0]}, batches


@pytest.mark.parametrize("mode, power", [("none", 1.0), ("balanced", 1.0), ("sqrt", 1.0), ("power", 0.25)])
def test_stream_frequencies_match_the_target(digits_lt, mode, power):
    rcfg = ResampleConfig(mode=mode, power=power, epoch_size=5000, batch_size=50)
    ds = resampled_stream(digits_lt.split_dir("train"), digits_lt.image_shape, rcfg, seed=0)
    rows, batches = _epoch(ds, 50)
    assert len(rows["label"]) == 5000
    assert batches[0]["image"].shape == (50, 8, 8, 1) and str(batches[0]["image"].dtype) == "torch.uint8"
    freq = np.bincount(rows["label"], minlength=10) / 5000
    target = class_probabilities(digits_lt.manifest["class_counts"], mode, power)
    assert np.abs(freq - target).max() <= 1 / 5000 + 1e-12
    # every row carries the image it names
    train = read_split(digits_lt.split_dir("train"), digits_lt.image_shape)
    assert np.array_equal(rows["image"], train["image"][rows["row"]])
    assert np.array_equal(rows["label"], train["label"][rows["row"]])


def test_each_iteration_is_a_new_reproducible_epoch(digits_lt):
    rcfg = ResampleConfig(mode="balanced", epoch_size=2000, batch_size=100)
    split = digits_lt.split_dir("train")
    ds = resampled_stream(split, digits_lt.image_shape, rcfg, seed=3)
    e0, _ = _epoch(ds, 100)
    e1, _ = _epoch(ds, 100)
    assert set(e0["epoch"]) == {0} and set(e1["epoch"]) == {1}
    assert not np.array_equal(e0["row"], e1["row"])
    labels = read_split(split, digits_lt.image_shape)["label"]
    expected = epoch_plan(labels, "balanced", seed=3, epoch=1, epoch_size=2000, batch_size=100)
    assert np.array_equal(e1["row"], expected)  # the stream is exactly the plan, in order
    fresh = resampled_stream(split, digits_lt.image_shape, rcfg, seed=3)
    assert np.array_equal(_epoch(fresh, 100)[0]["row"], e0["row"])  # same seed, same epoch 0
    resumed = resampled_stream(split, digits_lt.image_shape, rcfg, seed=3, start_epoch=1)
    assert np.array_equal(_epoch(resumed, 100)[0]["row"], e1["row"])  # a resumed run continues


def test_epochs_advance_through_streaming_split(digits_lt):
    """Ray Train hands workers `streaming_split` iterators; each pass must be a new epoch."""
    rcfg = ResampleConfig(mode="sqrt", epoch_size=1000, batch_size=100)
    ds = resampled_stream(digits_lt.split_dir("train"), digits_lt.image_shape, rcfg, seed=0)
    (it,) = ds.streaming_split(1)
    epochs = [{int(e) for b in it.iter_batches(batch_size=100) for e in b["epoch"]} for _ in range(3)]
    assert epochs == [{0}, {1}, {2}]


def test_balanced_batch_mode_yields_balanced_batches(digits_lt):
    rcfg = ResampleConfig(mode="balanced_batch", epoch_size=3000, batch_size=40)
    ds = resampled_stream(digits_lt.split_dir("train"), digits_lt.image_shape, rcfg, seed=0)
    rows, batches = _epoch(ds, 40)
    assert len(rows["label"]) == 3000
    for b in batches:
        assert np.bincount(b["label"].numpy(), minlength=10).tolist() == [4] * 10


def test_a_generation_plan_keeps_each_set_in_blocks_of_its_own_batch_size(ray_session):
    """generate_sets lays the sets' plans end to end: no block holds rows of two sets, and every row
    is in exactly one block."""
    from pipeline.common.streams import plan_bounds, plan_dataset

    bounds = plan_bounds([5, 0, 3], [2, 4, 4])
    assert bounds == [0, 2, 4, 5, 8]
    rows = {"set": np.repeat([0, 2], [5, 3]), "seed": np.arange(8)}
    blocks = [{k: np.asarray(v) for k, v in b.items()}
              for b in plan_dataset(rows, bounds).iter_batches(batch_size=None, batch_format="numpy")]
    assert sorted(len(b["seed"]) for b in blocks) == [1, 2, 2, 3]
    assert all(len(set(b["set"].tolist())) == 1 for b in blocks)
    assert sorted(np.concatenate([b["seed"] for b in blocks]).tolist()) == list(range(8))
