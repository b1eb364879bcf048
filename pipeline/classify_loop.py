"""The Ray Train worker loop of the classify stage: epochs of the (resampled) training set,
test-set evaluation on rank 0, a checkpoint per epoch, resume.

The numbers (ResNet-32, the recipe's loss, the schedule, the metrics) come from models/.
"""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import torch

from models.classifier_training import classifier_step, make_classifier_state, predict, set_lr
from models.classify_metrics import classification_metrics, confusion
from models.lt_losses import ClassifierLoss, EpochSchedule, get_recipe
from models.resnet import resnet32
from models.seeding import derive_seed
from pipeline.config import config_from_dict


def epoch_schedule(c) -> EpochSchedule:
    return EpochSchedule.scaled(c.epochs, c.lr, c.warmup_epochs, c.decay_epochs, c.drw_epoch)


def build_classifier(recipe_name: str, num_classes: int, in_channels: int) -> torch.nn.Module:
    return resnet32(num_classes, in_channels, normed=get_recipe(recipe_name).normed_head)


def _save(state, history: list, metrics: dict, rank: int) -> None:
    import ray.train

    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    net = state.net.module if hasattr(state.net, "module") else state.net
    blob = {"net": net.state_dict(), "opt": state.opt.state_dict(), "generator": state.generator.get_state(),
            "epoch": state.epoch}
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(blob, Path(tmp) / "state.pt")
        (Path(tmp) / "progress.json").write_text(json.dumps({"epoch": state.epoch, "history": history}))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def classify_loop_per_worker(loop_config: dict) -> dict:
    import ray.train
    import ray.train.torch

    from pipeline.shards import read_split

    cfg = config_from_dict(loop_config["config"])
    c, arm, recipe = cfg.classify, loop_config["arm"], loop_config["recipe"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(c.torch_threads or max(1, round(c.cpus_per_worker)))
    torch.manual_seed(derive_seed(cfg.seed, "classify-torch", arm, rank))
    device = ray.train.torch.get_device()
    num_classes, image_shape = loop_config["num_classes"], tuple(loop_config["image_shape"])

    net = build_classifier(recipe, num_classes, image_shape[2])
    state = make_classifier_state(net, c.lr, c.momentum, c.weight_decay, derive_seed(cfg.seed, "classify", arm, rank),
                                  device)
    schedule = epoch_schedule(c)
    loss_fn = ClassifierLoss(get_recipe(recipe), loop_config["train_counts"], schedule, la_tau=c.la_tau,
                             ldam_max_m=c.ldam_max_m, ldam_s=c.ldam_s, drw_beta=c.drw_beta)
    history: list[dict] = []
    checkpoint = ray.train.get_checkpoint()
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
            state.generator.manual_seed(derive_seed(cfg.seed, "classify", arm, rank, state.epoch))
    if world > 1:
        state.net = ray.train.torch.prepare_model(state.net, move_to_device=False)

    test = read_split(Path(loop_config["test_dir"]), image_shape, num_classes) if rank == 0 else None
    groups = loop_config["groups"]
    per_worker = c.batch_size // world
    shard = ray.train.get_dataset_shard("train")
    final = None
    while state.epoch < c.epochs:
        epoch = state.epoch
        set_lr(state.opt, schedule.lr_at(epoch))
        total, batches = torch.zeros((), device=device), 0
        for batch in shard.iter_torch_batches(batch_size=per_worker, drop_last=True, prefetch_batches=2):
            images = batch["image"].to(device, non_blocking=True)  # (b, H, W, C) uint8
            y = batch["label"].to(device, non_blocking=True)
            total += classifier_step(state, images, y, loss_fn, epoch, c.augment, c.bf16)
            batches += 1
        if batches == 0:
            raise RuntimeError(f"an epoch of the training set holds no full batch of {per_worker} rows: "
                               "lower classify.batch_size")
        state.epoch = epoch + 1
        row = {"epoch": state.epoch, "lr": schedule.lr_at(epoch), "loss": (total / batches).item()}
        if not math.isfinite(row["loss"]):
            raise RuntimeError(f"non-finite classifier loss at epoch {state.epoch}: lower classify.lr")
        last = state.epoch == c.epochs
        if rank == 0 and (state.epoch % c.eval_every == 0 or last):
            net = state.net.module if hasattr(state.net, "module") else state.net
            pred, _ = predict(net, torch.from_numpy(test["image"]), bf16=c.bf16, device=device)
            m = classification_metrics(test["label"], pred.numpy(), num_classes, groups)
            row.update({k: v for k, v in m.items() if k != "per_class_accuracy"})
            if last:
                final = {**m, "confusion": confusion(test["label"], pred.numpy(), num_classes).tolist()}
        history.append(row)
        _save(state, history, row, rank)
    if rank != 0:
        return {}
    if final is None:  # finished before a resume: evaluate the restored weights
        net = state.net.module if hasattr(state.net, "module") else state.net
        pred, _ = predict(net, torch.from_numpy(test["image"]), bf16=c.bf16, device=device)
        final = {**classification_metrics(test["label"], pred.numpy(), num_classes, groups),
                 "confusion": confusion(test["label"], pred.numpy(), num_classes).tolist()}
    evaluated = [r for r in history if "accuracy" in r]
    best = max(evaluated, key=lambda r: r["accuracy"])
    return {"last": final, "best_epoch": best["epoch"], "best_accuracy": best["accuracy"],
            "best_balanced_accuracy": best["balanced_accuracy"], "history": history,
            "epochs": state.epoch, "train_images_per_epoch": int(np.sum(loop_config["train_counts"]))}
