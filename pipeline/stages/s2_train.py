"""Train stage: every method of the run trained on Ray Train, fed by its rebalanced stream.

Methods run as jobs of one `TorchTrainer` per *wave* (pipeline/common/launcher.py): the methods
trained from scratch together, then every method fine-tuned from them (`train.init_from`)
together, so a run pays the worker-group start-up once per wave, not once per method. What a
method needs from the pipeline (its resampling mode, a diagnostic curve) comes from its
registry entry (models/methods/), never from a name test here.

Layout under the run folder:
  train/ray/<wave>-<hash>/         Ray Train storage (checkpoints); the same name on a rerun
                                   resumes from the latest checkpoint
  train/<method>/model.pt          EMA weights + what is needed to rebuild the net (the artifact)
  train/<method>/loss.csv, loss.png, metrics.json, manifest.json, <diagnostic>.png

Each method's key hashes everything that shapes its weights (data, resampling, model, training,
its method sections, the init weights by content), so a changed config trains afresh.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from pathlib import Path

import torch

from models.methods.registry import method_needs, method_parts, used_sections
from models.seeding import derive_seed
from pipeline.common.artifacts import DatasetArtifact, ModelArtifact, make_schedule
from pipeline.common.devices import cluster_gpus, resolve_use_gpu
from pipeline.common.files import write_json
from pipeline.common.launcher import Job, Scaling, run_jobs
from pipeline.config import Config, stable_hash
from pipeline.errors import TaildiffError

log = logging.getLogger("taildiff.train")
LOOP = "pipeline.stages.s2_train_loop:train_method_job"


def method_resample(cfg: Config, method: str):
    """The data stream a method trains on: its Needs' resampling mode, else the run's resample section."""
    mode = method_needs(method, cfg.method_options()).resample
    return dataclasses.replace(cfg.resample, mode=mode) if mode else cfg.resample


def is_finetuned(cfg: Config, method: str) -> bool:
    return bool(cfg.train.init_from) and cfg.train.init_from != method


def method_steps(cfg: Config, method: str) -> int:
    """train.finetune_steps for a method fine-tuned from train.init_from, else train.steps."""
    if cfg.train.finetune_steps is not None and is_finetuned(cfg, method):
        return cfg.train.finetune_steps
    return cfg.train.steps


def init_weights_path(cfg: Config, method: str, check: bool = True) -> str | None:
    """train.init_from as a model.pt path (a method of this run, trained earlier in it, or a path)."""
    source = cfg.train.init_from
    if not source or source == method:
        return None
    path = (cfg.run_dir / "train" / source / "model.pt") if source in cfg.train.methods else Path(source)
    if check and not path.is_file():
        raise TaildiffError(f"train.init_from={source}: no weights at {path}; train that method first "
                            "(list it earlier in train.methods) or give an existing model.pt")
    return str(path.resolve())


def run_key(cfg: Config, data: DatasetArtifact, method: str) -> str:
    """Hash of everything that shapes a method's weights but the step count (and not logging or
    checkpoint cadence): raising train.steps continues the same Ray Train run from its checkpoint."""
    train = dataclasses.asdict(dataclasses.replace(
        cfg.train, methods=(method,), steps=0, log_every=0, checkpoint_every=0, keep_checkpoints=0, max_failures=0,
        init_from=None, use_gpu=False, torch_threads=None, cpus_per_worker=1.0))
    train.pop("finetune_steps")  # a step count, like steps
    payload = {"data": data.manifest["config_hash"], "resample": dataclasses.asdict(method_resample(cfg, method)),
               "model": dataclasses.asdict(cfg.model), "train": train, "seed": cfg.seed, "method": method}
    payload.update({name: dataclasses.asdict(getattr(cfg, name)) for name in sorted(used_sections(method))})
    init = init_weights_path(cfg, method) if is_finetuned(cfg, method) else None
    if init:  # fine-tuning from other weights: which weights, by content stamp
        payload["init_weights"] = [init, os.path.getsize(init), os.path.getmtime(init)]
    return stable_hash(payload)


def _finished(cfg: Config, data: DatasetArtifact, method: str) -> ModelArtifact | None:
    out = (cfg.run_dir / "train" / method).resolve()
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if (manifest.get("run_key") == run_key(cfg, data, method) and (out / "model.pt").is_file()
            and manifest["metrics"].get("step") == method_steps(cfg, method)):
        return ModelArtifact(method, out, manifest["metrics"], skipped=True)
    return None


def run_train(cfg: Config, data: DatasetArtifact, tune_hooks: dict | None = None) -> dict[str, ModelArtifact]:
    """Train (or reuse) every method of `cfg.train.methods`; returns method -> artifact."""
    for method in cfg.train.methods:
        method_parts(method)  # names checked before Ray places anything
    base = [m for m in cfg.train.methods if not is_finetuned(cfg, m)]
    finetuned = [m for m in cfg.train.methods if is_finetuned(cfg, m)]
    out: dict[str, ModelArtifact] = {}
    for wave in (base, finetuned):
        if wave:
            out.update(train_methods(cfg, data, wave, tune_hooks))
    return {m: out[m] for m in cfg.train.methods}


def train_methods(cfg: Config, data: DatasetArtifact, methods: list[str],
                  tune_hooks: dict | None = None) -> dict[str, ModelArtifact]:
    """One wave: every unfinished method of `methods` as a job of one TorchTrainer run."""
    from pipeline.common.progress import stage_progress

    results = {m: art for m in methods if (art := _finished(cfg, data, m)) is not None}
    for method, art in results.items():
        log.info("train[%s]: reusing %s (step %s)", method, art.path, art.metrics.get("step"))
    todo = [m for m in methods if m not in results]
    if not todo:
        return results
    use_gpu = resolve_use_gpu(cfg.train.use_gpu, cluster_gpus(), "train")
    keys = {m: run_key(cfg, data, m) for m in methods}
    storage = (cfg.run_dir / "train" / "ray").resolve()
    # named after the whole wave, finished jobs included, so a rerun resumes the same Ray run
    name = f"{'-'.join(methods).replace('+', '-')[:80]}-{stable_hash(keys)}"
    jobs = [_job(cfg, data, m, keys[m], use_gpu, tune_hooks) for m in todo]
    hooks = tune_hooks or {}
    with (contextlib.nullcontext() if tune_hooks else stage_progress("train")):  # a Tune trial has no terminal
        run_jobs(LOOP, jobs, name=name, storage=storage, scaling=Scaling(cfg.train.num_workers, use_gpu,
                                                                          cfg.train.cpus_per_worker),
                 keep=cfg.train.keep_checkpoints, max_failures=cfg.train.max_failures, callbacks=hooks.get("callbacks"),
                 what=f"training {', '.join(todo)}",
                 pending=lambda js: [j for j in js if _finished_export(cfg, data, j.name) is None])
    for method in todo:
        results[method] = _finish(cfg, data, method, keys[method], storage / name, use_gpu)
    return results


def _finished_export(cfg: Config, data: DatasetArtifact, method: str):
    """A job's exported model.pt + final.json exist (written by its rank 0 when it ended)."""
    out = (cfg.run_dir / "train" / method).resolve()
    return out if (out / "final.json").is_file() and (out / "model.pt").is_file() else None


def _job(cfg: Config, data: DatasetArtifact, method: str, key: str, use_gpu: bool, tune_hooks) -> Job:
    from pipeline.common.streams import resampled_stream

    out = (cfg.run_dir / "train" / method).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "final.json").unlink(missing_ok=True)  # a stale end marker of an earlier, different run
    per_worker = cfg.train.batch_size // cfg.train.num_workers
    rcfg = dataclasses.replace(method_resample(cfg, method), batch_size=per_worker)
    needs = method_needs(method, cfg.method_options())
    for name in needs.diagnostics:
        plot_diagnostic(cfg, data, method, name, rcfg, out)
    config = {"config": cfg.to_dict(), "method": method, "steps": method_steps(cfg, method),
              "manifest": data.manifest, "out_dir": str(out), "init_weights": init_weights_path(cfg, method),
              "use_gpu": use_gpu, "start_epoch": 0}
    if (tune_hooks or {}).get("proxy"):
        config["proxy"] = tune_hooks["proxy"]
    seed = derive_seed(cfg.seed, "resample", method)

    def stream(start_epoch: int):
        config["start_epoch"] = start_epoch
        return resampled_stream(data.split_dir("train"), data.image_shape, rcfg, seed=seed, start_epoch=start_epoch,
                                num_classes=data.num_classes)

    return Job(name=method, config=config, stream=stream)


def _finish(cfg: Config, data: DatasetArtifact, method: str, key: str, ray_run: Path, use_gpu: bool) -> ModelArtifact:
    out = (cfg.run_dir / "train" / method).resolve()
    try:
        metrics = json.loads((out / "final.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise TaildiffError(f"training {method} ended without its export; see the Ray logs under {ray_run}") from None
    plot_loss_curve(out / "loss.csv", out / "loss.png", title=f"{cfg.name}: {method}")
    write_json(out / "metrics.json", metrics)
    manifest = {"method": method, "run_key": key, "ray_run": str(ray_run), "metrics": metrics,
                "dataset": str(data.path), "init_from": init_weights_path(cfg, method),
                "resample": method_resample(cfg, method).mode, "use_gpu": use_gpu, "config": cfg.to_dict()}
    write_json(out / "manifest.json", manifest)  # last: marks the method finished
    log.info("train[%s]: %d steps, final loss %.4f, %.1f img/s", method, metrics["step"],
             metrics.get("loss", float("nan")), metrics.get("images_per_second", float("nan")))
    return ModelArtifact(method, out, metrics, skipped=False)


def plot_loss_curve(csv_path: Path, png_path: Path, title: str) -> None:
    """One panel per logged term (loss, mse, cbdm_reg, oc_moved, ...) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not csv_path.is_file():
        return
    lines = [line.split(",") for line in csv_path.read_text().splitlines()]
    header, rows = lines[0], [r for r in lines[1:] if r and r[0]]
    if not rows:
        return
    cols = {name: [float(r[i]) for r in rows] for i, name in enumerate(header)}
    meta = {"step", "epoch", "lr", "images_per_second", "data_wait_fraction"}
    names = [n for n in header if n not in meta]
    fig, axes = plt.subplots(1, len(names), figsize=(3.0 * len(names), 2.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        ax.plot(cols["step"], cols[name])
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def plot_diagnostic(cfg: Config, data: DatasetArtifact, method: str, name: str, rcfg, out: Path,
                    batch: int = 256) -> Path:
    """A method's diagnostic curve (e.g. OC's transfer probability against t, its Fig. 7) on a
    batch of the run's own training stream, written before training starts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from models.data.images import to_model_space
    from models.data.resampling import epoch_plan
    from pipeline.common.shards import read_split

    arrays = read_split(data.split_dir("train"), data.image_shape)
    plan = epoch_plan(arrays["label"], rcfg.mode, seed=cfg.seed, epoch=0, power=rcfg.power, batch_size=batch,
                      epoch_size=max(batch, len(arrays["label"])))[:batch]
    x0 = to_model_space(torch.from_numpy(arrays["image"][plan]), cfg.model.image_size)
    entry = next(m for m in method_parts(method) if m.diagnostic is not None)
    curve = entry.diagnostic(name, getattr(cfg, entry.section), x0, make_schedule(cfg),
                             generator=torch.Generator().manual_seed(0))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.csv").write_text("x,y\n" + "".join(f"{x},{y:.6f}\n" for x, y in zip(curve["x"], curve["y"])))
    fig, ax = plt.subplots(figsize=(5.0, 3.2))
    ax.plot(curve["x"], curve["y"], marker=".")
    if curve.get("marker_x") is not None:
        ax.axvline(curve["marker_x"], color="grey", linestyle="--", label=curve.get("marker_label"))
        ax.legend(fontsize=8)
    ax.set_xlabel(curve["xlabel"])
    ax.set_ylabel(curve["ylabel"])
    ax.set_title(f"{method}: {name} on a batch of {batch} ({rcfg.mode} stream)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=110)
    plt.close(fig)
    return out / f"{name}.png"

