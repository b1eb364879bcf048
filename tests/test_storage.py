"""Shared storage (`storage`: a pyarrow filesystem URI): the mirror's copy rules on a
SubTreeFileSystem standing in for a bucket, and a tiny run whose checkpoints and artifacts go to
a file:// URI, resumed by a second "node" (another, empty output_dir) that reuses everything."""
from __future__ import annotations

import hashlib
import os
import time

import pytest

from conftest import REPO


def _bucket(tmp_path):
    import pyarrow.fs as pafs

    root = tmp_path / "bucket"
    root.mkdir()
    return root, pafs.SubTreeFileSystem(str(root), pafs.LocalFileSystem())


def test_push_and_pull_copy_what_changed_and_skip_what_must_not_travel(tmp_path):
    from pipeline.common.storage import Storage, ensure_local

    root, fs = _bucket(tmp_path)
    store = Storage(fs, "taildiff")
    local = tmp_path / "node_a" / "runs" / "r"
    (local / "train" / "ddpm").mkdir(parents=True)
    (local / "train" / "ddpm" / "model.pt").write_bytes(b"weights-v1")
    (local / "train" / "ray" / "run-1").mkdir(parents=True)  # Ray's own storage: never mirrored by hand
    (local / "train" / "ray" / "run-1" / "checkpoint.pt").write_bytes(b"x")
    (local / ".tmp-ddpm-1234").mkdir()  # a half-written stage folder
    (local / ".tmp-ddpm-1234" / "part.parquet").write_bytes(b"half")
    (local / ".lock").write_text("123")
    (local / "config.json").write_text("{}")

    assert store.push(local, "runs/r", skip_dirs=("ray",)) == 2
    on_bucket = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert on_bucket == ["taildiff/runs/r/config.json", "taildiff/runs/r/train/ddpm/model.pt"]
    assert store.push(local, "runs/r", skip_dirs=("ray",)) == 0  # nothing changed: nothing copied

    other = tmp_path / "node_b" / "runs" / "r"
    assert store.pull("runs/r", other) == 2
    assert (other / "train" / "ddpm" / "model.pt").read_bytes() == b"weights-v1"
    assert store.pull("runs/r", other) == 0

    time.sleep(0.05)  # same size, newer content: a rewritten manifest of the same length travels
    (local / "config.json").write_text("[]")
    os.utime(local / "config.json", (time.time() + 5, time.time() + 5))
    assert store.push(local, "runs/r", skip_dirs=("ray",)) == 1
    assert store.pull("runs/r", other) == 1 and (other / "config.json").read_text() == "[]"

    missing = tmp_path / "node_c" / "runs" / "r" / "train" / "ddpm" / "model.pt"
    assert ensure_local(missing, store, tmp_path / "node_c").read_bytes() == b"weights-v1"
    assert not list((tmp_path / "node_c").rglob("*.tmp"))  # written under a temp name, then moved


def test_a_storage_that_is_not_a_uri_is_one_line(make_config):
    from pipeline.common.storage import Storage
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="not a filesystem URI"):
        make_config("digits_lt", "storage=/shared/taildiff")
    with pytest.raises(ConfigError, match="not a filesystem URI pyarrow can open"):
        Storage.from_uri("nosuchscheme://bucket/x")


TINY = ["model.image_size=8", "train.steps=6", "train.batch_size=16", "train.log_every=3", "train.checkpoint_every=3",
        "train.bf16=false", "sample.per_class=2", "sample.steps=2", "sample.batch_size=20", "sample.bf16=false",
        "tracking.grid_per_class=0", "tracking.tensorboard=false", "stages=[data,train,sample]"]


def test_a_run_on_shared_storage_resumes_on_another_node(ray_session, tmp_path):
    """Node A runs data, train and sample with storage=file://…; Ray Train's checkpoints land in
    storage, not on A's disk. Node B (an empty output_dir, same storage) runs the same config:
    every stage is reused from storage, and its model is byte-identical to A's."""
    from pipeline.config import load_config
    from pipeline.run import run

    store = tmp_path / "store"
    uri = f"file://{store}"

    def on(node: str):
        return load_config(REPO / "configs" / "digits_lt.yaml", [f"output_dir={tmp_path / node}", f"storage={uri}", *TINY])

    started = time.perf_counter()
    a = run(on("node_a"))
    assert not a["data"].skipped and not a["train"]["ddpm"].skipped
    ckpts = list((store / "runs" / "digits_lt" / "train" / "ray").glob("*/checkpoint_*/state.pt"))
    assert ckpts, "Ray Train checkpoints are not in storage"
    assert not (tmp_path / "node_a" / "runs" / "digits_lt" / "train" / "ray").exists()
    stored = store / "runs" / "digits_lt" / "train" / "ddpm" / "model.pt"
    assert stored.is_file() and any((store / "datasets").iterdir())
    assert (store / "runs" / "digits_lt" / "samples" / "ddpm" / "manifest.json").is_file()

    b = run(on("node_b"))
    assert b["data"].skipped and b["train"]["ddpm"].skipped and b["sample"]["ddpm"].skipped
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    model_b = tmp_path / "node_b" / "runs" / "digits_lt" / "train" / "ddpm" / "model.pt"
    assert digest(model_b) == digest(tmp_path / "node_a" / "runs" / "digits_lt" / "train" / "ddpm" / "model.pt")
    print(f"shared-storage run + reuse on a second node: {time.perf_counter() - started:.1f} s")
