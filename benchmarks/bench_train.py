"""Training throughput on this machine, measured in one run.

1. The default preset's model and step on Fashion-MNIST-LT batches (batch 64): images/s of the pure
   `models.training.train_step` loop in fp32 and in bf16 autocast (goal >= 125 img/s bf16).
2. The same steps through the Ray Train stage (1 worker, the rebalanced Ray Data stream, DDP
   off): steady-state images/s measured inside the worker, and the overhead against (1).

    python benchmarks/bench_train.py [--steps 60] [--batch-size 64]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def plain_loop(cfg, manifest, images, labels, steps, batch, bf16, threads):
    """The stage's own model, hyper-parameters, loss and step (from `cfg`), on random batches drawn
    in the process: no Ray, no data stream."""
    import dataclasses

    from models.data.images import to_model_space
    from models.diffusion.training import make_train_state, train_step
    from models.methods.registry import make_loss
    from pipeline.common.artifacts import build_net, make_schedule
    from pipeline.stages.s2_train_loop import train_hparams

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    hp = dataclasses.replace(train_hparams(cfg, False, cfg.train.steps), bf16=bf16)
    state = make_train_state(build_net(cfg, manifest), hp, seed=0)
    schedule = make_schedule(cfg)
    loss_fn = make_loss("ddpm", cfg.method_options(), manifest["class_counts"], T=schedule.T)
    g = torch.Generator().manual_seed(0)
    warm = 5
    for step in range(warm + steps):
        if step == warm:
            start = time.perf_counter()
        idx = torch.randint(0, len(labels), (batch,), generator=g)
        x0 = to_model_space(images[idx], cfg.model.image_size, cfg.train.hflip, state.generator)
        out = train_step(state, x0, labels[idx], loss_fn, schedule, hp)
    out["loss"].item()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    import ray

    from pipeline.config import load_config
    from pipeline.stages.s1_data import run_data
    from pipeline.common.shards import read_split
    from pipeline.stages.s2_train import run_train

    out = Path(tempfile.mkdtemp(prefix="taildiff-bench-train-"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    base = [f"output_dir={out}", f"train.batch_size={args.batch_size}", "train.num_workers=1",
            "train.cpus_per_worker=1", "train.torch_threads=2", "train.checkpoint_every=100000"]
    data = run_data(load_config(None, base))
    arrays = read_split(data.split_dir("train"), data.image_shape)
    images, labels = torch.from_numpy(arrays["image"]), torch.from_numpy(arrays["label"])

    cfg0 = load_config(None, base)
    manifest = data.manifest
    rates = {}
    for bf16 in (False, True):
        rates[bf16] = plain_loop(cfg0, manifest, images, labels, args.steps, args.batch_size, bf16, threads=2)
    print(f"small preset, batch {args.batch_size}, {args.steps} timed steps, 2 threads")
    print(f"  plain loop fp32: {rates[False]:7.1f} img/s")
    print(f"  plain loop bf16: {rates[True]:7.1f} img/s   (bf16/fp32 {rates[True] / rates[False]:.2f}x; "
          f"goal 125 img/s: {rates[True] / 125:.2f}x)")

    # Ray Train: log every 10 steps; the first window includes start-up, so it is left out.
    steps = args.steps + 10
    cfg = load_config(None, base + [f"train.steps={steps}", "train.log_every=10", "train.bf16=true",
                                    "name=bench_train"])
    t0 = time.perf_counter()
    art = run_train(cfg, data)["ddpm"]
    wall = time.perf_counter() - t0
    lines = (art.path / "loss.csv").read_text().splitlines()
    rows = [dict(zip(lines[0].split(","), map(float, line.split(",")))) for line in lines[1:]]
    steady = [r["images_per_second"] for r in rows[1:]]
    ray_rate = len(steady) / sum(1.0 / r for r in steady)  # harmonic mean = total images / total time
    wait = sum(r["data_wait_fraction"] for r in rows[1:]) / len(rows[1:])
    after = plain_loop(cfg0, manifest, images, labels, args.steps, args.batch_size, True, threads=2)  # the machine drifts:
    plain = (rates[True] + after) / 2  # bracket the Ray Train run with plain runs
    print(f"  Ray Train bf16:  {ray_rate:7.1f} img/s steady state (worker-measured, includes the data stream; "
          f"{wait:.1%} of it waiting for data)")
    print(f"  plain loop bf16 again: {after:7.1f} img/s; Ray Train overhead vs the mean plain rate: "
          f"{(plain / ray_rate - 1) * 100:+.1f}% (goal <= 10%)")
    print(f"  Ray Train fit() wall for {steps} steps incl. start-up: {wall:.1f} s "
          f"(pure compute at the plain rate: {steps * args.batch_size / rates[True]:.1f} s)")
    print(json.dumps({"fp32": rates[False], "bf16": rates[True], "ray_bf16": ray_rate, "fit_wall_s": wall}))
    ray.shutdown()


if __name__ == "__main__":
    main()
