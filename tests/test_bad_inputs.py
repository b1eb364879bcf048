"""The bad-input catalogue: every case stops with one line naming the fix (exit 2 from the CLI),
before Ray starts where it can, and leaves nothing a later run would reuse. A file that holds a
pickled object which would run code is refused unpickled (a marker file proves nothing ran)."""
import gzip
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO
from fakes import write_fake_fmnist, write_imagefolder
from pipeline.config import load_config
from pipeline.errors import ConfigError, DataError, TaildiffError


class RunsCode:
    """Unpickling this calls os.system: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("overrides, message", [
    (["tarin.steps=5"], "unknown config key tarin"),
    (["train.stpes=5"], "did you mean train.steps?"),
    (["train.steps=abc"], "train.steps must be an integer"),
    (["train.steps=0"], "train.steps=0 must be positive"),
    (["train.batch_size=0"], "train.batch_size=0 must be positive"),
    (["data.imb_factor=0"], "outside (0, 1]"),
    (["data.imb_factor=1.5"], "outside (0, 1]"),
    (["train.methods=[ddpm,magic]"], "unknown method 'magic'"),
    (["train.methods=[t2h+h2t]"], "use one OC mode"),
    (["train.lr=-1"], "train.lr positive"),
    (["sample.sampler=heun"], "unknown sample.sampler"),
    (["sample.eta=0.5", "sample.sampler=unipc"], "sample.eta=0.5 is DDIM's noise level"),
    (["diffrop.form=squared"], "diffrop.form"),
    (["classify.seeds=0"], "classify.seeds=0 must be positive"),
])
def test_config_errors_name_the_fix(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(REPO / "configs" / "digits_lt.yaml", overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(ConfigError, match="not found: pass --config"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [steps\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(bad)


def _imagefolder(root, **kw):
    from pipeline.config import DataConfig
    from pipeline.sources.imagefolder import load_imagefolder

    return load_imagefolder(DataConfig(dataset="imagefolder", data_root=str(root), imb_factor=None, **kw))


def test_imagefolder_corrupt_empty_non_image_and_single_class(tmp_path):
    write_imagefolder(tmp_path / "ok", {"a": 4, "b": 3})
    (tmp_path / "ok" / "a" / "notes.txt").write_text("not an image")  # ignored: not an image suffix
    assert len(_imagefolder(tmp_path / "ok").train_labels) >= 5
    (tmp_path / "ok" / "b" / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match="cannot read image .*broken.png.*data.on_corrupt=skip"):
        _imagefolder(tmp_path / "ok")
    skipped = _imagefolder(tmp_path / "ok", on_corrupt="skip")
    assert any("broken.png" in s for s in skipped.skipped)
    (tmp_path / "ok" / "empty").mkdir()
    with pytest.raises(DataError, match="class 'empty' .* has no images: add images or remove the folder"):
        _imagefolder(tmp_path / "ok", on_corrupt="skip")
    write_imagefolder(tmp_path / "one", {"only": 5})
    with pytest.raises(DataError, match="one class folder: a long-tailed dataset needs at least two"):
        _imagefolder(tmp_path / "one")


def test_imagefolder_key_covers_the_files_not_only_the_config(tmp_path):
    from pipeline.config import DataConfig
    from pipeline.sources import source_fingerprint
    from pipeline.stages.s1_data import dataset_folder_name

    write_imagefolder(tmp_path / "imgs", {"a": 3, "b": 3})
    d = DataConfig(dataset="imagefolder", data_root=str(tmp_path / "imgs"), imb_factor=None)
    before = dataset_folder_name(d, source_fingerprint(d))
    write_imagefolder(tmp_path / "more", {"x": 1})
    os.replace(tmp_path / "more" / "x" / "0.png", tmp_path / "imgs" / "a" / "new.png")  # an added image
    assert dataset_folder_name(d, source_fingerprint(d)) != before
    assert source_fingerprint(DataConfig(dataset="digits")) is None


def test_truncated_fashion_mnist_and_cifar_without_batches(tmp_path):
    from pipeline.config import DataConfig
    from pipeline.sources import get_source

    write_fake_fmnist(tmp_path / "fm")
    raw = (tmp_path / "fm" / "train-images-idx3-ubyte.gz").read_bytes()
    (tmp_path / "fm" / "train-images-idx3-ubyte.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="cannot read IDX file .*re-download it or reinstall"):
        get_source("fashion-mnist")(DataConfig(dataset="fashion-mnist", data_root=str(tmp_path / "fm"), download=False))
    (tmp_path / "cifar" / "cifar-10-batches-py").mkdir(parents=True)
    with pytest.raises(DataError, match="cifar10 files not found under .*pass data.data_root=<folder containing cifar-10-batches-py"):
        get_source("cifar10")(DataConfig(dataset="cifar10", data_root=str(tmp_path / "cifar"), download=False))


def test_crafted_cifar_batch_is_refused_unpickled(tmp_path):
    import pickle

    from fakes import write_fake_cifar
    from pipeline.config import DataConfig
    from pipeline.sources import get_source

    write_fake_cifar(tmp_path, "cifar10")
    marker = tmp_path / "ran"
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "wb") as f:
        pickle.dump({"data": RunsCode(marker), "labels": [0]}, f, protocol=2)
    with pytest.raises(DataError, match="refusing to load posix.system"):
        get_source("cifar10")(DataConfig(dataset="cifar10", data_root=str(tmp_path), download=False))
    assert not marker.exists()


def _crafted(tmp_path, name="evil.pt"):
    marker = tmp_path / f"{name}.ran"
    torch.save({"ema": {}, "config": "{}", "payload": RunsCode(marker)}, tmp_path / name)
    return tmp_path / name, marker


def test_every_file_the_pipeline_reads_refuses_code(tmp_path):
    from models.evaluation.features import load_domain_classifier
    from models.methods.diffrc import load_prototype_guidance
    from pipeline.common.artifacts import load_classifier, load_model
    from pipeline.common.features import check_plain_weights
    from pipeline.common.preflight import safe_checkpoint

    path, marker = _crafted(tmp_path)
    loaders = [lambda: load_model(path), lambda: load_classifier(path), lambda: load_prototype_guidance(path),
               lambda: load_domain_classifier(path), lambda: check_plain_weights(path),
               lambda: safe_checkpoint(path, "train.init_from")]
    for load in loaders:
        with pytest.raises(Exception) as info:
            load()
        assert "Unpickl" in type(info.value).__name__ or "weights_only" in str(info.value) or "refusing" in str(info.value) \
            or "cannot load model weights" in str(info.value), info.value
    assert not marker.exists()


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, str(REPO / "pipeline" / "run.py"), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def _one_error_line(res):
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-2000:]
    return lines[0]


def test_bad_checkpoints_as_init_from_stop_before_ray(tmp_path):
    evil, marker = _crafted(tmp_path)
    truncated = tmp_path / "truncated.pt"
    torch.save({"ema": {"w": torch.zeros(1000)}, "config": "{}"}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    base = ["--config", "configs/digits_lt.yaml", "--set", f"output_dir={tmp_path / 'out'}", "--set",
            "train.methods=[ddpm,cbdm]", "--stages", "train"]
    for path, message in ((evil, "refusing train.init_from"), (truncated, "not a readable torch file"),
                          (text, "not a readable torch file"), (foreign, "not a taildiff model.pt"),
                          (tmp_path / "missing.pt", "does not exist")):
        line = _one_error_line(run_cli(*base, "--set", f"train.init_from={path}"))
        assert message in line, line
    assert not marker.exists()
    assert not (tmp_path / "out" / "datasets").exists()  # stopped before the data stage: nothing half-built


def test_a_second_run_into_a_held_run_folder_is_refused(tmp_path):
    from pipeline.common.locking import run_lock

    run_dir = tmp_path / "runs" / "digits_lt"
    with run_lock(run_dir):
        res = run_cli("--config", "configs/digits_lt.yaml", "--set", f"output_dir={tmp_path}", "--stages", "data")
    assert "another taildiff run" in _one_error_line(res) and "--set name=" in _one_error_line(res)


def test_full_disk_is_one_line(tmp_path, monkeypatch):
    import errno
    from pathlib import Path

    from pipeline.common.files import writable_dir

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(DataError, match="No space left on device.*--set output_dir="):
        writable_dir(tmp_path / "x", "output folder")


@pytest.mark.parametrize("read_only", ["output_dir", "datasets", "runs"])
def test_read_only_output_folder_is_one_line_before_ray(tmp_path, capsys, read_only):
    """A read-only output folder (or its datasets/ or runs/ part) stops the CLI with one line naming
    the fix, before Ray starts, and nothing is written. Root ignores mode bits, so as root the call
    runs with nobody's effective uid (the modules it needs are imported first: nobody cannot read
    root's Python)."""
    import pipeline.common.files  # noqa: F401  (imported lazily by run(); nobody could not read it)
    import pipeline.common.locking  # noqa: F401
    from pipeline.run import main

    import shutil
    import tempfile
    from pathlib import Path

    # under /tmp itself: pytest's own tmp folders are 0700, which nobody could not even enter
    base = Path(tempfile.mkdtemp(prefix="taildiff-ro-"))
    out = base / "out"
    out.mkdir()
    for part in ("datasets", "runs"):
        if part == read_only:
            (out / part).mkdir()
    for folder in (base, out):
        folder.chmod(0o777)  # open to all, as a shared scratch folder ...
    (out if read_only == "output_dir" else out / read_only).chmod(0o555)  # ... but this part read-only
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    as_root = os.geteuid() == 0
    if as_root:
        os.seteuid(65534)  # nobody; the real and saved uid stay 0, so this can be undone
    try:
        rc = main(["--config", str(REPO / "configs" / "digits_lt.yaml"), "--set", f"output_dir={out}",
                   "--stages", "data"])
    finally:
        if as_root:
            os.seteuid(0)
    try:
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert rc == 2 and len(err) == 1, err
        assert "is not writable (Permission denied)" in err[0] and "--set output_dir=" in err[0], err
        assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing written
    finally:
        for folder in (out, out / "datasets", out / "runs"):
            if folder.exists():
                folder.chmod(0o755)
        shutil.rmtree(base)
