"""Train stage: one Ray Train `TorchTrainer` run per method, fed by the rebalanced stream.

Layout under the run folder:
  train/ray/<method>-<hash>/       Ray Train storage (checkpoints, snapshot); the same name on a
                                   rerun makes Ray Train resume from the latest checkpoint
  train/<method>/model.pt          EMA weights + what is needed to rebuild the net (the artifact)
  train/<method>/loss.csv, loss.png, metrics.json, manifest.json

The hash covers everything that shapes the weights (data, resampling, model, training, method),
so a changed config trains afresh instead of resuming an incompatible checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from models.methods import get_method
from models.oc import transfer_probability_curve
from models.schedule import NoiseSchedule
from models.seeding import derive_seed
from models.training import TrainHParams
from models.unet import build_unet
from pipeline.config import Config, config_from_dict, stable_hash
from pipeline.data import DatasetArtifact
from pipeline.errors import TaildiffError

log = logging.getLogger("taildiff.train")


class NonFiniteLossError(RuntimeError):
    """Raised inside a worker when the running loss stops being finite."""


@dataclass(frozen=True)
class ModelArtifact:
    method: str
    path: Path  # train/<method>/
    metrics: dict
    skipped: bool

    @property
    def weights(self) -> Path:
        return self.path / "model.pt"


def hparams(cfg: Config) -> TrainHParams:
    t = cfg.train
    return TrainHParams(lr=t.lr, warmup_steps=t.warmup_steps, grad_clip=t.grad_clip, ema_decay=t.ema_decay,
                        ema_warmup=t.ema_warmup, p_uncond=t.p_uncond, cond_drop=cfg.model.cond_drop,
                        bf16=t.bf16, channels_last=t.channels_last)


def build_net(cfg: Config, manifest: dict) -> torch.nn.Module:
    extra = {} if cfg.model.dropout is None else {"dropout": cfg.model.dropout}
    return build_unet(cfg.model.preset, in_channels=manifest["image_shape"][2],
                      num_classes=len(manifest["class_names"]), cond_drop=cfg.model.cond_drop, **extra)


def make_schedule(cfg: Config) -> NoiseSchedule:
    return NoiseSchedule(cfg.model.schedule, cfg.model.timesteps)


def run_key(cfg: Config, data: DatasetArtifact, method: str) -> str:
    """Hash of everything that shapes a method's weights but the step count (and not logging or
    checkpoint cadence): raising train.steps continues the same Ray Train run from its checkpoint."""
    train = dataclasses.asdict(dataclasses.replace(
        cfg.train, methods=(method,), steps=0, log_every=0, checkpoint_every=0, keep_checkpoints=0, max_failures=0,
        init_from=None))  # the init weights enter below, by content
    train.pop("finetune_steps")  # a step count, like steps
    spec = get_method(method)
    payload = {"data": data.manifest["config_hash"], "resample": dataclasses.asdict(method_resample(cfg, method)),
               "model": dataclasses.asdict(cfg.model), "train": train, "seed": cfg.seed,
               "method": method}
    sections = {"cbdm": "cbdm" in spec.regularisers, "oc": spec.oc_mode is not None,
                "diffrop": "diffrop" in spec.regularisers, "reweight": spec.reweight}
    payload.update({name: dataclasses.asdict(getattr(cfg, name)) for name, used in sections.items() if used})
    init = init_weights_path(cfg, method) if cfg.train.init_from else None
    if init:  # fine-tuning from other weights: which weights, by content stamp
        payload["init_weights"] = [init, os.path.getsize(init), os.path.getmtime(init)]
    return stable_hash(payload)


def method_steps(cfg: Config, method: str) -> int:
    """train.finetune_steps for a method fine-tuned from train.init_from, else train.steps."""
    if cfg.train.finetune_steps is not None and cfg.train.init_from and cfg.train.init_from != method:
        return cfg.train.finetune_steps
    return cfg.train.steps


def method_resample(cfg: Config, method: str):
    """The data stream a method trains on: rs/rs_sqrt pick their mode, OC may ask for balanced batches."""
    spec = get_method(method)
    rcfg = cfg.resample
    if spec.resample:
        rcfg = dataclasses.replace(rcfg, mode=spec.resample)
    if spec.oc_mode and cfg.oc.batch_resample:
        if spec.resample:
            raise TaildiffError(f"method {method} asks for {spec.resample} resampling and oc.batch_resample: pick one")
        rcfg = dataclasses.replace(rcfg, mode="balanced_batch")
    return rcfg


def init_weights_path(cfg: Config, method: str) -> str | None:
    """train.init_from as a model.pt path (a method of this run, trained earlier in it, or a path)."""
    source = cfg.train.init_from
    if not source or source == method:
        return None
    path = (cfg.run_dir / "train" / source / "model.pt") if source in cfg.train.methods else Path(source)
    if not path.is_file():
        raise TaildiffError(f"train.init_from={source}: no weights at {path}; train that method first "
                            "(list it earlier in train.methods) or give an existing model.pt")
    return str(path.resolve())


def latest_progress(storage: Path) -> dict | None:
    """progress.json of the checkpoint Ray Train will resume from, if any (read by the driver)."""
    snapshot = storage / "checkpoint_manager_snapshot.json"
    try:
        state = json.loads(snapshot.read_text())
        name = state["latest_checkpoint_result"]["checkpoint_dir_name"]
        return json.loads((storage / name / "progress.json").read_text())
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        return None


def run_train(cfg: Config, data: DatasetArtifact) -> dict[str, ModelArtifact]:
    return {method: train_method(cfg, data, method) for method in cfg.train.methods}


def train_method(cfg: Config, data: DatasetArtifact, method: str, tune_hooks: dict | None = None) -> ModelArtifact:
    """Train (or reuse) one method. `tune_hooks` (Tune sweeps only): {"proxy": the quick-FID settings
    for the worker loop, "callbacks": Ray Train callbacks such as TuneReportCallback}."""
    spec = get_method(method)
    out = (cfg.run_dir / "train" / method).resolve()
    key = run_key(cfg, data, method)
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if (manifest.get("run_key") == key and manifest["metrics"].get("step") == method_steps(cfg, method)
                and (out / "model.pt").is_file()):
            log.info("train[%s]: reusing %s (step %s)", method, out, manifest["metrics"].get("step"))
            return ModelArtifact(method, out, manifest["metrics"], skipped=True)
    out.mkdir(parents=True, exist_ok=True)
    storage = (cfg.run_dir / "train" / "ray").resolve()
    name = f"{method.replace('+', '-')}-{key}"
    per_worker = cfg.train.batch_size // cfg.train.num_workers
    rcfg = dataclasses.replace(method_resample(cfg, method), batch_size=per_worker)
    if spec.oc_mode:
        plot_transfer_curve(cfg, data, rcfg, out)
    init_weights = init_weights_path(cfg, method)
    started = time.perf_counter()
    # Ray Train's own retries would restart workers on a stream whose epoch was fixed when the
    # run began; retrying here rebuilds the stream at the checkpoint's epoch every time.
    for attempt in range(cfg.train.max_failures + 1):
        result = _fit_once(cfg, data, method, rcfg, storage, name, out, init_weights, tune_hooks)
        if result.error is None:
            break
        if "NonFiniteLossError" in str(result.error) or attempt == cfg.train.max_failures:
            raise TaildiffError(_failure_message(method, result.error, storage / name))
        log.warning("train[%s]: attempt %d failed (%s); resuming from the last checkpoint", method, attempt + 1,
                    str(result.error).strip().splitlines()[-1][:200])
    metrics = dict(result.return_value or {})
    if not metrics:
        raise TaildiffError(f"training {method} returned no metrics; see the Ray logs under {storage / name}")
    metrics["fit_seconds"] = round(time.perf_counter() - started, 2)
    _export_model(result.checkpoint, out)
    plot_loss_curve(out / "loss.csv", out / "loss.png", title=f"{cfg.name}: {method}")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    manifest = {"method": method, "run_key": key, "ray_run": str(storage / name), "metrics": metrics,
                "dataset": str(data.path), "init_from": init_weights, "resample": rcfg.mode,
                "config": cfg.to_dict()}
    tmp = manifest_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, manifest_path)  # last: marks the stage finished
    log.info("train[%s]: %d steps, final loss %.4f, %.1f img/s", method, metrics["step"], metrics.get("loss", float("nan")),
             metrics.get("images_per_second", float("nan")))
    return ModelArtifact(method, out, metrics, skipped=False)


def _fit_once(cfg: Config, data: DatasetArtifact, method: str, rcfg, storage: Path, name: str, out: Path,
              init_weights: str | None, tune_hooks: dict | None = None):
    """One TorchTrainer.fit(), resuming from the run's latest checkpoint if it has one."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.resample import resampled_stream
    from pipeline.train_loop import train_loop_per_worker

    progress = latest_progress(storage / name)
    start_epoch = progress["epoch"] if progress else 0
    steps = method_steps(cfg, method)
    if progress and progress["step"] > steps:
        raise TaildiffError(
            f"{storage / name} already holds a checkpoint at step {progress['step']} > {steps} steps "
            f"(train.steps / train.finetune_steps): raise it, or pick another run name (--set name=...)")
    if progress:
        log.info("train[%s]: resuming from step %d (epoch %d)", method, progress["step"], start_epoch)
    stream = resampled_stream(data.split_dir("train"), data.image_shape, rcfg,
                              seed=derive_seed(cfg.seed, "resample", method), start_epoch=start_epoch,
                              num_classes=data.num_classes)
    ingest = ray.train.DataConfig.default_ingest_options()
    ingest.preserve_order = True  # the plan's order: reproducible batches, exact mid-epoch resume
    loop_config = {"config": cfg.to_dict(), "method": method, "steps": steps, "manifest": data.manifest,
                   "out_dir": str(out), "start_epoch": start_epoch, "init_weights": init_weights}
    hooks = tune_hooks or {}
    if hooks.get("proxy"):
        loop_config["proxy"] = hooks["proxy"]
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=str(storage),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=0), callbacks=hooks.get("callbacks")),
        datasets={"train": stream},
        dataset_config=ray.train.DataConfig(execution_options=ingest),
    )
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as exc:
        return _Failed(exc)


@dataclass
class _Failed:
    error: Exception


def _failure_message(method: str, exc: Exception, where: Path) -> str:
    text = str(exc)
    if "NonFiniteLossError" in text:
        line = next((ln for ln in text.splitlines() if "NonFiniteLossError" in ln), text.splitlines()[0])
        return (f"training {method} stopped: {line.split('NonFiniteLossError:')[-1].strip()}; the last good "
                f"checkpoint is kept in {where}: lower train.lr or raise train.warmup_steps and rerun")
    first = text.strip().splitlines()[-1] if text.strip() else type(exc).__name__
    return f"training {method} failed ({first}); the Ray logs and last checkpoint are in {where}"


def _export_model(checkpoint, out: Path) -> None:
    """model.pt = the EMA weights and how to rebuild the net; written atomically."""
    with checkpoint.as_directory() as ckpt_dir:
        state = torch.load(Path(ckpt_dir) / "state.pt", map_location="cpu", weights_only=True)
    export = {"ema": state["ema"], "step": state["step"], "config": state["config"]}
    tmp = out / "model.pt.tmp"
    torch.save(export, tmp)
    os.replace(tmp, out / "model.pt")


def load_model(path: Path, device: str | torch.device = "cpu"):
    """EMA denoiser from a model.pt, with the Config and data manifest it was trained with."""
    try:
        blob = torch.load(Path(path), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as exc:
        raise TaildiffError(f"cannot load model weights {path} ({exc}): rerun the train stage") from None
    saved = json.loads(blob["config"])
    cfg = config_from_dict(saved["run"])
    net = build_net(cfg, saved["manifest"])
    net.load_state_dict(blob["ema"])
    return net.to(device).eval().requires_grad_(False), cfg, saved["manifest"]


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


def plot_transfer_curve(cfg: Config, data: DatasetArtifact, rcfg, out: Path, batch: int = 256) -> Path:
    """OC's transfer probability Σ_{z≠i} p_sel(z) against t on a batch of this run's training
    stream (the paper's Fig. 7), with the cutoff marked. Written before training starts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from models.images import to_model_space
    from models.resampling import epoch_plan
    from pipeline.shards import read_split

    arrays = read_split(data.split_dir("train"), data.image_shape)
    plan = epoch_plan(arrays["label"], rcfg.mode, seed=cfg.seed, epoch=0, power=rcfg.power, batch_size=batch,
                      epoch_size=max(batch, len(arrays["label"])))[:batch]
    x0 = to_model_space(torch.from_numpy(arrays["image"][plan]), cfg.model.image_size)
    schedule = make_schedule(cfg)
    ts = list(range(0, schedule.T, max(1, schedule.T // 40)))
    curve = transfer_probability_curve(x0, schedule.alpha_bar, ts, generator=torch.Generator().manual_seed(0))
    out.mkdir(parents=True, exist_ok=True)
    (out / "oc_transfer.csv").write_text("t,transfer_probability\n" + "".join(f"{t},{p:.6f}\n" for t, p in zip(ts, curve)))
    fig, ax = plt.subplots(figsize=(5.0, 3.2))
    ax.plot(ts, curve, marker=".")
    ax.axvline(cfg.oc.cutoff, color="grey", linestyle="--", label=f"cutoff {cfg.oc.cutoff}")
    ax.set_xlabel("diffusion step t")
    ax.set_ylabel("P(target moves to another sample)")
    ax.set_title(f"OC transfer probability, batch {batch} ({rcfg.mode} stream)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "oc_transfer.png", dpi=110)
    plt.close(fig)
    return out / "oc_transfer.png"
