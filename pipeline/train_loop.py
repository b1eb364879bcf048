"""The Ray Train worker loop: stream batches, step, log, checkpoint, resume.

Runs on every worker of a `TorchTrainer`; the numbers (loss, step, EMA) come from models/.
One host synchronisation per `log_every` steps (the logged means); none per step.
"""
from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import torch

from models.images import to_model_space
from models.methods import make_loss
from models.seeding import derive_seed
from models.training import checkpoint_state, make_train_state, restore_state, train_step
from pipeline.config import config_from_dict, method_options
from pipeline.train import NonFiniteLossError, build_net, hparams, make_schedule


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


def _save_checkpoint(state, progress: dict, run_config: dict, metrics: dict, rank: int) -> None:
    import ray.train

    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(checkpoint_state(state, run_config), Path(tmp) / "state.pt")
        (Path(tmp) / "progress.json").write_text(json.dumps(progress))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def train_loop_per_worker(loop_config: dict) -> dict:
    import ray.train
    import ray.train.torch

    cfg = config_from_dict(loop_config["config"])
    method, manifest = loop_config["method"], loop_config["manifest"]
    out_dir = Path(loop_config["out_dir"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.train.torch_threads or max(1, round(cfg.train.cpus_per_worker)))
    torch.manual_seed(derive_seed(cfg.seed, "torch", method, rank))
    device = ray.train.torch.get_device()

    hp = hparams(cfg)
    state = make_train_state(build_net(cfg, manifest), hp, derive_seed(cfg.seed, "train", method, rank), device)
    schedule = make_schedule(cfg)
    loss_fn = make_loss(method, method_options(cfg), manifest["class_counts"])
    run_config = {"run": cfg.to_dict(), "manifest": manifest, "method": method}

    epoch, skip = loop_config["start_epoch"], 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            blob = torch.load(Path(ckpt_dir) / "state.pt", map_location="cpu", weights_only=True)
            progress = json.loads((Path(ckpt_dir) / "progress.json").read_text())
        restore_state(state, blob)
        if rank != 0:  # the checkpoint holds rank 0's RNG; other ranks re-derive theirs
            state.generator.manual_seed(derive_seed(cfg.seed, "train", method, rank, state.step))
            torch.manual_seed(derive_seed(cfg.seed, "torch", method, rank, state.step))
        epoch, skip = progress["epoch"], progress["batches_in_epoch"]
        if state.step >= loop_config["steps"]:  # finished before; only the export was missing
            return {"step": state.step, "epoch": epoch, **progress.get("metrics", {})}
    elif loop_config.get("init_weights"):  # fine-tuning: start from another model's EMA weights
        weights = torch.load(loop_config["init_weights"], map_location="cpu", weights_only=True)["ema"]
        state.net.load_state_dict(weights)
        state.ema.load_state_dict(weights)
    if world > 1:
        state.net = ray.train.torch.prepare_model(state.net, move_to_device=False)

    total, per_worker = loop_config["steps"], cfg.train.batch_size // world
    size, hflip = cfg.model.image_size, cfg.train.hflip
    loss_log = LossLog(out_dir / "loss.csv", rank == 0, state.step)
    proxy = None  # Tune sweeps only (pipeline/tune_proxy.py): a quick FID reported with each checkpoint
    if loop_config.get("proxy") and rank == 0:
        from pipeline.tune_proxy import ProxyFID

        proxy = ProxyFID(loop_config["proxy"], cfg, manifest, out_dir)
    shard = ray.train.get_dataset_shard("train")
    sums: dict[str, torch.Tensor] = {}
    window, window_start, metrics, waited = 0, time.perf_counter(), {}, 0.0
    while state.step < total:
        batches_in_epoch = 0
        fetch_start = time.perf_counter()
        for batch in shard.iter_torch_batches(batch_size=per_worker, drop_last=True, prefetch_batches=2):
            waited += time.perf_counter() - fetch_start
            batches_in_epoch += 1
            if skip:  # resuming mid-epoch: these batches were trained on before the checkpoint
                if int(batch["epoch"][0]) != epoch:
                    raise RuntimeError(f"the data stream is at epoch {int(batch['epoch'][0])} but the checkpoint "
                                       f"at epoch {epoch}: the driver must build the stream from the checkpoint")
                skip -= 1
                window_start = fetch_start = time.perf_counter()
                waited = 0.0
                continue
            epoch = int(batch["epoch"][0])
            images = batch["image"].to(device, non_blocking=True)
            x0 = to_model_space(images, size, hflip, state.generator)  # (b, C, S, S)
            y = batch["label"].to(device, non_blocking=True)
            terms = train_step(state, x0, y, loss_fn, schedule, hp)
            for name, value in terms.items():
                sums[name] = sums[name] + value if name in sums else value.clone()
            window += 1
            done = state.step >= total
            if state.step % cfg.train.log_every == 0 or done:
                elapsed = time.perf_counter() - window_start
                metrics = {name: (value / window).item() for name, value in sums.items()}  # the host sync
                if not all(math.isfinite(v) for v in metrics.values()):
                    raise NonFiniteLossError(f"non-finite loss {metrics['loss']} near step {state.step}")
                metrics.update(step=state.step, epoch=epoch, lr=state.opt.param_groups[0]["lr"],
                               images_per_second=window * per_worker * world / max(elapsed, 1e-9),
                               data_wait_fraction=waited / max(elapsed, 1e-9))
                loss_log.write(metrics)
                sums, window, window_start, waited = {}, 0, time.perf_counter(), 0.0
                if not (state.step % cfg.train.checkpoint_every == 0 or done):
                    ray.train.report(metrics)
            if state.step % cfg.train.checkpoint_every == 0 or done:
                if not metrics or metrics.get("step") != state.step:
                    metrics = {"step": state.step, "epoch": epoch}
                if proxy is not None:
                    metrics["fid"] = proxy(state.ema, state.step)
                progress = {"step": state.step, "epoch": epoch, "batches_in_epoch": batches_in_epoch,
                            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
                _save_checkpoint(state, progress, run_config, metrics, rank)
            if done:
                break
            fetch_start = time.perf_counter()
        else:
            if batches_in_epoch == 0:
                raise RuntimeError(f"an epoch of the training stream holds no full batch of {per_worker} rows: "
                                   "lower train.batch_size or raise resample.epoch_size")
            epoch += 1
            skip = 0
    return metrics
