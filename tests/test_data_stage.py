"""The data stage on Ray Data: shards, manifest, idempotence, atomic builds, bad input."""
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline.stages.s1_data as data_stage
from pipeline.stages.s1_data import dataset_folder_name, run_data
from pipeline.common.artifacts import load_dataset
from pipeline.errors import DataError
from pipeline.common.shards import read_split
from fakes import requires_fmnist, write_fake_cifar, write_imagefolder

MANIFEST_KEYS = {"dataset", "profile", "imb_factor", "class_counts", "class_names", "num_train",
                 "image_shape", "seed"}


def test_digits_build_writes_shards_and_manifest(ray_session, make_config, capsys):
    cfg = make_config("digits_lt")
    art = run_data(cfg)
    m = art.manifest
    assert MANIFEST_KEYS <= set(m) and not art.skipped
    assert m["class_counts"] == m["target_counts"] and m["num_train"] == sum(m["class_counts"])
    assert m["class_counts"][0] > m["class_counts"][-1] and m["image_shape"] == [8, 8, 1]
    for name in ("class_counts.png", "class_counts.csv", "config.json"):
        assert (art.path / name).stat().st_size > 0
    # Ray Data reads the shards back as tensors; plain pyarrow reads them as lists
    ray_ds = ray_session.data.read_parquet(str(art.split_dir("train")))
    batch = ray_ds.take_batch(5)
    assert batch["image"].shape == (5, 8, 8, 1) and batch["image"].dtype == np.uint8
    arrays = read_split(art.split_dir("train"), art.image_shape, art.num_classes)
    assert np.bincount(arrays["label"], minlength=10).tolist() == m["class_counts"]
    assert np.array_equal(arrays["row"], np.arange(m["num_train"]))
    ref = read_split(art.split_dir("reference"), art.image_shape)
    assert len(ref["label"]) == m["num_reference"] and np.array_equal(ref["index"], np.arange(len(ref["index"])))
    # the LT rows are the source images they claim to be
    assert np.array_equal(arrays["image"], ref["image"][arrays["index"]])
    table = capsys.readouterr().out
    assert "label" in table and str(m["class_counts"][0]) in table


def test_rerun_skips_and_changed_config_gets_a_new_folder(ray_session, make_config, monkeypatch):
    first = run_data(make_config("digits_lt"))
    mtime = (first.path / "manifest.json").stat().st_mtime_ns
    monkeypatch.setattr(data_stage, "get_source", lambda name: pytest.fail("a finished stage was rebuilt"))
    again = run_data(make_config("digits_lt"))
    assert again.skipped and again.path == first.path
    assert (again.path / "manifest.json").stat().st_mtime_ns == mtime
    monkeypatch.undo()
    other = run_data(make_config("digits_lt", "data.imb_factor=0.2"))
    assert other.path != first.path and not other.skipped
    assert other.manifest["class_counts"][-1] > first.manifest["class_counts"][-1]


def test_interrupted_build_leaves_nothing_that_looks_complete(ray_session, make_config, monkeypatch):
    cfg = make_config("digits_lt")
    real_write = data_stage.write_split
    calls = []

    def failing_write(path, *args, **kw):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-build
        return real_write(path, *args, **kw)

    monkeypatch.setattr(data_stage, "write_split", failing_write)
    with pytest.raises(KeyboardInterrupt):
        run_data(cfg)
    root = cfg.output_dir and os.path.join(cfg.output_dir, "datasets")
    assert os.listdir(root) == []  # neither the final folder nor the temp one
    monkeypatch.undo()
    assert not run_data(cfg).skipped


def test_killed_build_temp_folder_is_ignored_and_cleaned(ray_session, make_config):
    cfg = make_config("digits_lt")
    root = os.path.join(cfg.output_dir, "datasets")
    stale = os.path.join(root, f".tmp-{dataset_folder_name(cfg.data)}.999999999.deadbeef")
    os.makedirs(os.path.join(stale, "train"))
    with open(os.path.join(stale, "manifest.json"), "w") as f:
        f.write("{}")
    art = run_data(cfg)
    assert not art.skipped and not os.path.exists(stale)


def test_labels_out_of_range_in_existing_shards(ray_session, make_config):
    art = run_data(make_config("digits_lt"))
    shard = sorted((art.path / "train").glob("*.parquet"))[0]
    table = pq.read_table(shard)
    labels = table.column("label").to_numpy().copy()
    labels[0] = 42
    pq.write_table(table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels)), shard)
    with pytest.raises(DataError, match=r"labels outside \[0, 10\) \(e.g. 42\).*delete it and rerun"):
        run_data(make_config("digits_lt"))
    with pytest.raises(DataError, match="labels outside"):
        read_split(art.split_dir("train"), art.image_shape, num_classes=10)


def test_output_folder_not_writable(ray_session, tmp_path, make_config):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(DataError, match="is not writable .* --set output_dir="):
        run_data(make_config("digits_lt", f"output_dir={blocker / 'sub'}"))


def test_cifar10_lt_from_local_files(ray_session, tmp_path, make_config):
    write_fake_cifar(tmp_path / "cifar", "cifar10", per_batch=40)  # 20 images per class
    cfg = make_config("cifar10_lt", f"data.data_root={tmp_path / 'cifar'}", "data.download=false",
                      "data.imb_factor=0.1", "data.class_order=reverse")
    m = run_data(cfg).manifest
    assert m["n_max"] == 20 and m["class_counts"][9] == 20 and m["class_counts"][0] == 2
    assert m["image_shape"] == [32, 32, 3] and m["class_order"][0] == 9


def test_imagefolder_keeps_natural_counts_and_records_skips(ray_session, tmp_path, make_config):
    write_imagefolder(tmp_path / "imgs", {"a": 12, "b": 6, "c": 3})
    (tmp_path / "imgs" / "c" / "zz.png").write_bytes(b"broken")
    cfg = make_config("digits_lt", "data.dataset=imagefolder", f"data.data_root={tmp_path / 'imgs'}",
                      "data.imb_factor=null", "data.on_corrupt=skip")
    m = run_data(cfg).manifest
    assert m["skipped_images"]["count"] == 1 and m["class_names"] == ["a", "b", "c"]
    assert m["class_counts"] == m["reference_counts"] == [10, 5, 2]


@requires_fmnist
def test_fashion_mnist_lt_counts(ray_session, make_config):
    m = run_data(make_config("fmnist_lt")).manifest
    assert m["class_counts"] == [6000, 3596, 2156, 1292, 774, 464, 278, 166, 100, 60]
    assert (m["num_train"], m["num_reference"], m["num_test"]) == (14886, 60000, 10000)
    assert load_dataset(run_data(make_config("fmnist_lt")).path).manifest == m
