"""The diffusion stage's per-job worker loop: stream batches, step, log, checkpoint, resume,
and (rank 0) export the job's model when it ends.

Runs inside `pipeline.common.launcher.jobs_worker` on every worker of a `TorchTrainer`, once per
job (method) of the run; the numbers (loss, step, EMA) come from models/. One host
synchronisation per `log_every` steps (the logged means); none per step. The running means are
checked for finiteness at every log step *and* before every checkpoint, so no checkpoint of a
diverged run is ever written.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch

from models.data.images import to_model_space
from models.diffusion.training import checkpoint_state, make_train_state, restore_state, train_step
from models.methods.registry import make_loss
from models.seeding import derive_seed
from pipeline.common.artifacts import build_net, load_model, make_schedule
from pipeline.common.launcher import DeterministicError, NonFiniteLossError, report_checkpoint
from pipeline.common.progress import report_progress
from pipeline.common.storage import ensure_local, pull_path, push_path, storage_of
from pipeline.common.tracking import RunLogger
from pipeline.config import config_from_dict


def train_hparams(cfg, use_gpu: bool, total_steps: int = 0):
    from models.diffusion.training import TrainHParams
    from models.precision import resolve_bf16

    t = cfg.train
    channels_last = use_gpu if t.channels_last is None else t.channels_last
    return TrainHParams(lr=t.lr, warmup_steps=t.warmup_steps, grad_clip=t.grad_clip, ema_decay=t.ema_decay,
                        ema_warmup=t.ema_warmup, p_uncond=t.p_uncond, cond_drop=cfg.model.cond_drop,
                        bf16=resolve_bf16(t.bf16, "cuda" if use_gpu else "cpu"), channels_last=channels_last,
                        lr_schedule=t.lr_schedule, decay_fraction=t.decay_fraction, total_steps=total_steps)


class LossLog:
    """loss.csv in the method's folder, written by rank 0; a resume drops rows past its step."""

    def __init__(self, path: Path, enabled: bool, resume_step: int):
        self.path, self.enabled, self.header = path, enabled, None
        if enabled and path.is_file():
            lines = path.read_text().splitlines()
            if lines:
                self.header = lines[0].split(",")
                col = self.header.index("step")
                kept = [ln for ln in lines[1:] if ln and int(float(ln.split(",")[col])) <= resume_step]
                path.write_text("\n".join([lines[0], *kept]) + "\n")
        elif enabled:
            path.unlink(missing_ok=True)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        if self.header is None:
            self.header = ["step", "epoch"] + [k for k in row if k not in ("step", "epoch")]
            self.path.write_text(",".join(self.header) + "\n")
        with self.path.open("a") as f:
            f.write(",".join(f"{row.get(k, float('nan')):.6g}" for k in self.header) + "\n")


def _load_init(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["ema"]
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise DeterministicError(f"train.init_from: cannot read {path} ({type(exc).__name__}: "
                                 f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}); give a "
                                 "model.pt written by the train stage") from None


def _export(state, out_dir: Path, run_config: dict) -> None:
    """model.pt = the EMA weights and how to rebuild the net; written atomically by rank 0."""
    blob = {"ema": state.ema.state_dict(), "step": state.step, "config": json.dumps(run_config, sort_keys=True,
                                                                                      default=str)}
    tmp = out_dir / "model.pt.tmp"
    torch.save(blob, tmp)
    os.replace(tmp, out_dir / "model.pt")


@torch.no_grad()
def sample_grid(ema, cfg, manifest: dict, schedule, device, conditional: bool, method: str):
    """A row per class of the EMA's samples (fixed seeds, a few solver steps): the image TensorBoard
    shows at each checkpoint. uint8 (H, W, C)."""
    import numpy as np

    from pipeline.common.features import balanced_plan, generate_images
    from pipeline.common.tracking import image_grid

    classes = len(manifest["class_names"])
    n = classes * cfg.tracking.grid_per_class
    labels, seeds = balanced_plan(classes, n, cfg.seed, "tensorboard-grid")
    order = np.argsort(labels, kind="stable")
    was_training = ema.training
    ema.eval()
    images = generate_images(ema, schedule, manifest, cfg.model.image_size, labels[order], seeds[order],
                             sampler="dpmpp_2m", steps=cfg.tracking.grid_steps,
                             omega=cfg.sample.omega_for(method) if conditional else 0.0, batch_size=n,
                             bf16=cfg.train.bf16, device=device)
    ema.train(was_training)
    return image_grid(images, classes)


def train_job(job: dict, shard, checkpoint) -> dict:
    """The launcher's per-job loop: a diffusion model or a guidance feature network."""
    return (train_features_job if job["kind"] == "features" else train_method_job)(job, shard, checkpoint)


def train_method_job(job: dict, shard, checkpoint) -> dict:
    """One diffusion model on this worker group."""
    import ray.train
    import ray.train.torch

    cfg = config_from_dict(job["config"])
    method, manifest = job["method"], job["manifest"]
    shared, output_dir = storage_of(cfg), job.get("output_dir", cfg.output_dir)
    out_dir = pull_path(job["out_dir"], shared, output_dir)  # this job's loss.csv so far, on any node
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.train.torch_threads or max(1, round(cfg.train.cpus_per_worker)))
    torch.manual_seed(derive_seed(cfg.seed, "torch", method, rank))
    device = ray.train.torch.get_device()

    job_started = time.perf_counter()
    hp = dataclasses.replace(train_hparams(cfg, job["use_gpu"], job["steps"]), lr=job.get("lr", cfg.train.lr))
    if not job.get("conditional", True):  # an unconditional backbone: every label is the null label
        hp = dataclasses.replace(hp, p_uncond=1.0)
    state = make_train_state(build_net(cfg, manifest), hp, derive_seed(cfg.seed, "train", method, rank), device)
    schedule = make_schedule(cfg)
    loss_fn = make_loss(method, cfg.method_options(), manifest["class_counts"], T=schedule.T)
    inputs = {}
    if job.get("source_weights"):  # a frozen source model the loss compares against (DiffRC)
        source, _, _ = load_model(ensure_local(job["source_weights"], shared, output_dir), device)
        inputs["source"] = source
    run_config = {"run": cfg.to_dict(), "manifest": manifest, "method": method,
                  "conditional": job.get("conditional", True), "guidance": job.get("guidance")}
    total, per_worker = job["steps"], cfg.train.batch_size // world

    epoch, skip, metrics = job["start_epoch"], 0, {}
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            blob = torch.load(Path(ckpt_dir) / "state.pt", map_location="cpu", weights_only=True)
            progress = json.loads((Path(ckpt_dir) / "progress.json").read_text())
        restore_state(state, blob)
        if rank != 0:  # the checkpoint holds rank 0's RNG; other ranks re-derive theirs
            state.generator.manual_seed(derive_seed(cfg.seed, "train", method, rank, state.step))
            torch.manual_seed(derive_seed(cfg.seed, "torch", method, rank, state.step))
        epoch, skip = progress["epoch"], progress["batches_in_epoch"]
        metrics = dict(progress.get("metrics", {}))
    elif job.get("init_weights"):  # fine-tuning: start from another model's EMA weights
        weights = _load_init(str(ensure_local(job["init_weights"], shared, output_dir)))
        state.net.load_state_dict(weights)
        state.ema.load_state_dict(weights)
    if world > 1:
        state.net = ray.train.torch.prepare_model(state.net, move_to_device=False)

    size, hflip = cfg.model.image_size, cfg.train.hflip
    loss_log = LossLog(out_dir / "loss.csv", rank == 0, state.step)
    tracker = RunLogger(Path(job.get("run_dir", cfg.run_dir)), job.get("name", method), rank == 0 and cfg.tracking.tensorboard,
                        cfg.tracking.mlflow_uri, params={"method": method, "steps": total})
    proxy = None  # Tune sweeps only: a quick FID reported with each checkpoint
    if job.get("proxy") and rank == 0:
        from pipeline.common.proxy import ProxyFID

        proxy = ProxyFID(job["proxy"], cfg, manifest, out_dir)
    sums: dict[str, torch.Tensor] = {}
    window, window_start, waited = 0, time.perf_counter(), 0.0
    key = f"train/{job.get('name', method)}"
    if rank == 0:
        report_progress(key, state.step, total, "step", min_interval=0.0)  # the rate counts from here
    while state.step < total:
        batches_in_epoch = 0
        fetch_start = time.perf_counter()
        for batch in shard.iter_torch_batches(batch_size=per_worker, drop_last=True, prefetch_batches=2):
            waited += time.perf_counter() - fetch_start
            batches_in_epoch += 1
            if skip:  # resuming mid-epoch: these batches were trained on before the checkpoint
                if int(batch["epoch"][0]) != epoch:
                    raise DeterministicError(f"the data stream is at epoch {int(batch['epoch'][0])} but the "
                                             f"checkpoint at epoch {epoch}: the driver must build the stream from it")
                skip -= 1
                window_start = fetch_start = time.perf_counter()
                waited = 0.0
                continue
            epoch = int(batch["epoch"][0])
            images = batch["image"].to(device, non_blocking=True)
            x0 = to_model_space(images, size, hflip, state.generator)  # (b, C, S, S)
            y = batch["label"].to(device, non_blocking=True)
            terms = train_step(state, x0, y, loss_fn, schedule, hp, **inputs)
            for name, value in terms.items():
                sums[name] = sums[name] + value if name in sums else value.clone()
            window += 1
            done = state.step >= total
            log_now = state.step % cfg.train.log_every == 0 or done
            ckpt_now = state.step % cfg.train.checkpoint_every == 0 or done
            if (log_now or ckpt_now) and window:
                elapsed = time.perf_counter() - window_start
                metrics = {name: (value / window).item() for name, value in sums.items()}  # the host sync
                if not all(math.isfinite(v) for v in metrics.values()):
                    raise NonFiniteLossError(
                        f"training {method} diverged: loss {metrics.get('loss')} (mean of steps "
                        f"{state.step - window + 1}-{state.step}); lower train.lr or raise train.warmup_steps")
                metrics.update(step=state.step, epoch=epoch, lr=state.opt.param_groups[0]["lr"],
                               images_per_second=window * per_worker * world / max(elapsed, 1e-9),
                               data_wait_fraction=waited / max(elapsed, 1e-9))
                loss_log.write(metrics)
                tracker.scalars(state.step, metrics, prefix="train/")
                sums, window, window_start, waited = {}, 0, time.perf_counter(), 0.0
                if rank == 0:
                    report_progress(key, state.step, total, "step")
                if not ckpt_now and proxy is None:  # a Tune trial reports at its checkpoints only,
                    ray.train.report(metrics)         # each with the FID its TuneConfig's metric needs
            if ckpt_now:
                if proxy is not None:
                    metrics["fid"] = proxy(state.ema, state.step)
                    tracker.scalars(state.step, {"proxy_fid": metrics["fid"]}, prefix="tune/")
                if rank == 0 and tracker.tb is not None and cfg.tracking.grid_per_class:
                    tracker.image("samples/ema", state.step, sample_grid(state.ema, cfg, manifest, schedule, device,
                                                                         job.get("conditional", True), method))
                progress = {"step": state.step, "epoch": epoch, "batches_in_epoch": batches_in_epoch,
                            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
                blob = checkpoint_state(state, run_config)
                report_checkpoint(method, {"state.pt": lambda p: torch.save(blob, p)}, progress, metrics, rank)
            if done:
                break
            fetch_start = time.perf_counter()
        else:
            if batches_in_epoch == 0:
                raise DeterministicError(f"an epoch of the training stream holds no full batch of {per_worker} "
                                         "rows: lower train.batch_size or raise resample.epoch_size")
            epoch += 1
            skip = 0
    tracker.close()
    final = {"step": state.step, "epoch": epoch, **{k: v for k, v in metrics.items() if k not in ("step", "epoch")},
             "fit_seconds": round(time.perf_counter() - job_started, 2)}
    if rank == 0:
        (out_dir / "final.json").write_text(json.dumps(final))
        _export(state, out_dir, run_config)
        push_path(out_dir, shared, output_dir)  # the driver may be on another node
    return final


def train_features_job(job: dict, shard, checkpoint) -> dict:
    """The time-conditioned feature network of a prototype guidance (DiffRC Eq. 11–12) on noisy
    images of the LT stream; rank 0 exports features.pt (weights, prototypes, class prior)."""
    import ray.train
    import ray.train.torch

    from models.methods.diffrc import PrototypeNet, feature_train_step

    cfg = config_from_dict(job["config"])
    opts = getattr(cfg, job["section"])
    manifest = job["manifest"]
    shared, output_dir = storage_of(cfg), job.get("output_dir", cfg.output_dir)
    out_dir = pull_path(job["out_dir"], shared, output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.train.torch_threads or max(1, round(cfg.train.cpus_per_worker)))
    device = ray.train.torch.get_device()
    counts = torch.tensor(manifest["class_counts"], dtype=torch.float32)
    torch.manual_seed(derive_seed(cfg.seed, "features", job["name"], rank))
    net = PrototypeNet(manifest["image_shape"][2], len(counts), ch=opts.feature_ch, dim=opts.feature_dim).to(device)
    net.prior.copy_(counts / counts.sum())  # π_k = N_k / N (Eq. 12)
    opt = torch.optim.Adam(net.parameters(), lr=opts.feature_lr)
    generator = torch.Generator(device=device).manual_seed(derive_seed(cfg.seed, "features-draws", job["name"], rank))
    step, epoch = 0, job["start_epoch"]
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            blob = torch.load(Path(ckpt_dir) / "state.pt", map_location="cpu", weights_only=True)
        net.load_state_dict(blob["net"])
        opt.load_state_dict(blob["opt"])
        generator.set_state(blob["generator"])
        step, epoch = blob["step"], blob["epoch"]
    if world > 1:
        net = ray.train.torch.prepare_model(net, move_to_device=False)
    model = net.module if hasattr(net, "module") else net
    schedule = make_schedule(cfg)
    per_worker, total = cfg.train.batch_size // world, job["steps"]
    loss_log = LossLog(out_dir / "loss.csv", rank == 0, step)
    tracker = RunLogger(Path(job.get("run_dir", cfg.run_dir)), job["name"], rank == 0 and cfg.tracking.tensorboard, cfg.tracking.mlflow_uri)
    started, window, running = time.perf_counter(), 0, torch.zeros(())
    if rank == 0:
        report_progress(f"train/{job['name']}", step, total, "step", min_interval=0.0)
    while step < total:
        for batch in shard.iter_torch_batches(batch_size=per_worker, drop_last=True, prefetch_batches=2):
            x0 = to_model_space(batch["image"].to(device), cfg.model.image_size)
            running = running + feature_train_step(model, opt, x0, batch["label"].to(device), schedule, opts,
                                                   generator).cpu()
            step, window = step + 1, window + 1
            epoch = int(batch["epoch"][0])
            if step % cfg.train.log_every == 0 or step >= total:
                loss = (running / window).item()
                if not math.isfinite(loss):
                    raise NonFiniteLossError(f"the feature network of {job['name']} diverged at step {step}")
                loss_log.write({"step": step, "epoch": epoch, "loss_pc": loss})
                tracker.scalars(step, {"loss_pc": loss}, prefix="features/")
                running, window = torch.zeros(()), 0
                if rank == 0:
                    report_progress(f"train/{job['name']}", step, total, "step")
            if step % cfg.train.checkpoint_every == 0 or step >= total:
                blob = {"net": model.state_dict(), "opt": opt.state_dict(), "generator": generator.get_state(),
                        "step": step, "epoch": epoch}
                report_checkpoint(job["name"], {"state.pt": lambda p: torch.save(blob, p)},
                                  {"step": step, "epoch": epoch, "batches_in_epoch": 0}, {"step": step}, rank)
            if step >= total:
                break
        else:
            epoch += 1
    tracker.close()
    final = {"step": step, "epoch": epoch, "fit_seconds": round(time.perf_counter() - started, 2)}
    if rank == 0:
        export = {"net": model.state_dict(), "in_channels": manifest["image_shape"][2], "num_classes": len(counts),
                  "ch": opts.feature_ch, "dim": opts.feature_dim, "temperature": opts.temperature, "step": step}
        torch.save(export, out_dir / "features.pt.tmp")
        os.replace(out_dir / "features.pt.tmp", out_dir / "features.pt")
        (out_dir / "final.json").write_text(json.dumps(final))
        push_path(out_dir, shared, output_dir)
    return final
