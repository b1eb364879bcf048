"""Checks that can run before Ray starts, each a one-line error naming the fix: the files a run
will read (every one loaded with weights_only=True, so a pickled object that would run code is
refused before anything unpickles it) and the sizes the stages will need."""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from pipeline.errors import ConfigError


def safe_checkpoint(path: Path, what: str, need: tuple = ()) -> dict:
    """torch.load(weights_only=True), or one line: missing, truncated, not a torch file, or holding
    pickled objects (refused unloaded). `need`: keys a taildiff file of that kind holds."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what}={path} does not exist: give an existing file")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0][:160]
        raise ConfigError(f"refusing {what}={path}: it holds pickled objects that weights_only loading will not "
                          f"run ({first}); give a file written by this pipeline") from None
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file fails in many ways, all the same to the user
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{what}={path} is not a readable torch file ({first}): it is truncated or of another "
                          "kind; give a model.pt written by the train stage") from None
    missing = [k for k in need if not isinstance(blob, dict) or k not in blob]
    if missing:
        raise ConfigError(f"{what}={path} is not a taildiff model.pt (no {', '.join(missing)}): give train/<method>/"
                          "model.pt of a run")
    return blob


def check_run_inputs(cfg) -> None:
    """Every file named in the config, before Ray starts."""
    if cfg.data.dataset == "imagefolder":  # (the data stage would say the same after a Ray start)
        from pipeline.sources.imagefolder import check_root

        check_root(cfg.data)
    t = cfg.train
    if t.init_from and t.init_from not in t.methods:
        safe_checkpoint(Path(t.init_from), "train.init_from", need=("ema", "config"))
    if cfg.evaluate.extractor == "inception" and cfg.evaluate.weights_path:
        from pipeline.common.features import check_plain_weights

        if not Path(cfg.evaluate.weights_path).is_file():
            raise ConfigError(f"evaluate.weights_path={cfg.evaluate.weights_path} does not exist: give the inception "
                              "weights file")
        check_plain_weights(Path(cfg.evaluate.weights_path))


def check_data_sizes(cfg, data) -> None:
    """Batches the stages will ask of the long-tailed split, once its counts are known."""
    n = int(data.manifest["num_train"])
    per_worker = cfg.train.batch_size // cfg.train.num_workers
    if "train" in cfg.stages or "sample" in cfg.stages or "evaluate" in cfg.stages:
        if cfg.resample.epoch_size is None and per_worker > n:
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} needs {per_worker} images per worker but the "
                              f"long-tailed split has {n}: lower train.batch_size or set resample.epoch_size")
    c = cfg.classify
    if "classify" in cfg.stages and c.batch_size // c.num_workers > n:
        raise ConfigError(f"classify.batch_size={c.batch_size} is larger than the long-tailed split ({n} images): "
                          "lower classify.batch_size")
