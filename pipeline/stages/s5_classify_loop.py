"""The classify stage's per-job worker loop: epochs of one arm's (resampled) training set,
test-set evaluation on rank 0, a checkpoint per epoch, resume, and (rank 0) the arm's export.

Runs inside `pipeline.common.launcher.jobs_worker`, once per arm of a wave, so the arms of a run
share one worker group. The numbers (ResNet-32, the recipe's loss, the schedule, the metrics)
come from models/.
"""
from __future__ import annotations

import json
import math
import time
import os
from pathlib import Path

import numpy as np
import torch

from models.classify.lt_losses import ClassifierLoss, EpochSchedule, get_recipe
from models.classify.metrics import classification_metrics, confusion
from models.classify.training import classifier_step, make_classifier_state, predict, set_lr
from models.precision import resolve_bf16
from models.seeding import derive_seed
from pipeline.common.artifacts import build_classifier
from pipeline.common.devices import conv_channels_last
from pipeline.common.launcher import DeterministicError, NonFiniteLossError, report_checkpoint
from pipeline.common.progress import report_progress
from pipeline.common.storage import ensure_local, push_path, storage_of
from pipeline.common.tracking import RunLogger
from pipeline.config import config_from_dict


def epoch_schedule(c) -> EpochSchedule:
    return EpochSchedule.scaled(c.epochs, c.lr, c.warmup_epochs, c.decay_epochs, c.drw_epoch, c.lr_schedule)


def _evaluate(net, test: dict, num_classes: int, groups: dict, bf16: bool, device, size: int,
              channels_last: bool) -> dict:
    pred, _ = predict(net, torch.from_numpy(test["image"]), bf16=bf16, device=device, size=size,
                      channels_last=channels_last)
    m = classification_metrics(test["label"], pred.numpy(), num_classes, groups)
    return {**m, "confusion": confusion(test["label"], pred.numpy(), num_classes).tolist()}


def train_arm_job(job: dict, shard, checkpoint) -> dict:
    import ray.train
    import ray.train.torch

    from pipeline.common.shards import read_split

    job_started = time.perf_counter()  # the arm's own time inside the worker (the fit's fixed cost is the rest)
    cfg = config_from_dict(job["config"])
    c, arm, recipe = cfg.classify, job["arm"], job["recipe"]
    seed = job.get("seed", cfg.seed)
    shared, output_dir = storage_of(cfg), job.get("output_dir", cfg.output_dir)
    out_dir = Path(job["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)  # on a node other than the driver's, too
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(c.torch_threads or max(1, round(c.cpus_per_worker)))
    torch.manual_seed(derive_seed(seed, "classify-torch", arm, rank))
    device = ray.train.torch.get_device()
    bf16 = resolve_bf16(c.bf16, device)  # auto: on this worker's device (models/precision.py)
    num_classes, image_shape = job["num_classes"], tuple(job["image_shape"])

    net = build_classifier(recipe, num_classes, image_shape[2])
    channels_last = conv_channels_last(device, bf16) if c.channels_last is None else c.channels_last
    state = make_classifier_state(net, c.lr, c.momentum, c.weight_decay, derive_seed(seed, "classify", arm, rank),
                                  device, fused=job["use_gpu"], input_size=c.input_size, channels_last=channels_last)
    schedule = epoch_schedule(c)
    steps_per_epoch = max(1, int(np.sum(job["train_counts"])) // c.batch_size)  # the stream's epoch: the set's rows
    loss_fn = ClassifierLoss(get_recipe(recipe), job["train_counts"], schedule, la_tau=c.la_tau,
                             ldam_max_m=c.ldam_max_m, ldam_s=c.ldam_s, drw_beta=c.drw_beta)
    history: list[dict] = []
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            blob = torch.load(Path(ckpt_dir) / "state.pt", map_location="cpu", weights_only=True)
            history = json.loads((Path(ckpt_dir) / "progress.json").read_text())["history"]
        state.net.load_state_dict(blob["net"])
        state.opt.load_state_dict(blob["opt"])
        state.epoch = blob["epoch"]
        if rank == 0:
            state.generator.set_state(blob["generator"])
        else:
            state.generator.manual_seed(derive_seed(seed, "classify", arm, rank, state.epoch))
    if world > 1:
        state.net = ray.train.torch.prepare_model(state.net, move_to_device=False)

    test = (read_split(ensure_local(job["test_dir"], shared, output_dir), image_shape, num_classes)
            if rank == 0 else None)
    groups = job["groups"]
    per_worker = c.batch_size // world
    final = None
    key = f"classify/{arm}"
    tracker = RunLogger(Path(job.get("run_dir", cfg.run_dir)), f"classify-{arm}", rank == 0 and cfg.tracking.tensorboard, cfg.tracking.mlflow_uri,
                        params={"arm": arm, "recipe": recipe, "epochs": c.epochs})
    if rank == 0:
        report_progress(key, state.epoch, c.epochs, "epoch", min_interval=0.0)
    while state.epoch < c.epochs:
        epoch = state.epoch
        total, batches = torch.zeros((), device=device), 0
        for batch in shard.iter_torch_batches(batch_size=per_worker, drop_last=True, prefetch_batches=2):
            set_lr(state.opt, schedule.lr_at(epoch, batches, steps_per_epoch))  # per epoch for `step`
            images = batch["image"].to(device, non_blocking=True)  # (b, H, W, C) uint8
            y = batch["label"].to(device, non_blocking=True)
            total += classifier_step(state, images, y, loss_fn, epoch, c.augment, bf16)
            batches += 1
        if batches == 0:
            raise DeterministicError(f"an epoch of the training set holds no full batch of {per_worker} rows: "
                                     "lower classify.batch_size")
        state.epoch = epoch + 1
        row = {"epoch": state.epoch, "lr": schedule.lr_at(epoch, batches - 1, steps_per_epoch),  # its last step's
               "loss": (total / batches).item()}
        if not math.isfinite(row["loss"]):
            raise NonFiniteLossError(f"classifier {arm} diverged: loss {row['loss']} at epoch {state.epoch}; "
                                     "lower classify.lr")
        last = state.epoch == c.epochs
        if rank == 0 and (state.epoch % c.eval_every == 0 or last):
            m = _evaluate(state.net.module if hasattr(state.net, "module") else state.net, test, num_classes, groups,
                          bf16, device, c.input_size, channels_last)
            row.update({k: v for k, v in m.items() if k not in ("per_class_accuracy", "confusion")})
            if last:
                final = m
        history.append(row)
        tracker.scalars(state.epoch, row, prefix="classify/")
        if rank == 0:
            report_progress(key, state.epoch, c.epochs, "epoch", min_interval=0.0)
        model = state.net.module if hasattr(state.net, "module") else state.net
        blob = {"net": model.state_dict(), "opt": state.opt.state_dict(), "generator": state.generator.get_state(),
                "epoch": state.epoch}
        report_checkpoint(arm, {"state.pt": lambda p: torch.save(blob, p)}, {"epoch": state.epoch, "history": history},
                          row, rank)
    tracker.close()
    if rank != 0:
        return {}
    model = state.net.module if hasattr(state.net, "module") else state.net
    if final is None:  # finished before a resume: evaluate the restored weights
        final = _evaluate(model, test, num_classes, groups, bf16, device, c.input_size, channels_last)
    evaluated = [r for r in history if "accuracy" in r]
    best = max(evaluated, key=lambda r: r["accuracy"])
    result = {"last": final, "best_epoch": best["epoch"], "best_accuracy": best["accuracy"],
              "best_balanced_accuracy": best["balanced_accuracy"], "history": history, "epochs": state.epoch,
              "train_images_per_epoch": int(np.sum(job["train_counts"])),
              "fit_seconds": round(time.perf_counter() - job_started, 2)}
    export = {"net": {k: v.contiguous() for k, v in model.state_dict().items()}, "recipe": recipe,
              "num_classes": num_classes, "in_channels": image_shape[2], "epoch": state.epoch,
              "input_size": c.input_size}
    torch.save(export, out_dir / "model.pt.tmp")
    os.replace(out_dir / "model.pt.tmp", out_dir / "model.pt")
    (out_dir / "final.json").write_text(json.dumps(result))
    push_path(out_dir, shared, output_dir)  # the driver may be on another node
    return {"accuracy": final["accuracy"]}
