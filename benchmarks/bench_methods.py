"""Per-step cost of each long-tail method relative to DDPM, on this machine, in one run.

Same batch (Fashion-MNIST-LT images, 32×32, batch 64), same `small` UNet, bf16 autocast, the
same `models.training.train_step` the Ray Train workers use. Methods are timed in interleaved
rounds (every round times every method once) and the median per-step time is reported, so a
slow patch of the machine hits all methods alike. Goals from the issue: T2H and DiffROP
<= 1.15x DDPM, CBDM <= 2.1x.

    python benchmarks/bench_methods.py [--rounds 5] [--steps 8] [--batch-size 64]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from models.data.images import to_model_space  # noqa: E402
from models.data.longtail import long_tailed_counts  # noqa: E402
from models.methods.registry import MethodOptions, make_loss  # noqa: E402
from models.diffusion.schedule import NoiseSchedule  # noqa: E402
from models.diffusion.training import TrainHParams, make_train_state, train_step  # noqa: E402
from models.diffusion.unet import build_unet  # noqa: E402

METHODS = ["ddpm", "t2h", "h2t", "oc_full", "diffrop", "reweight", "cbdm", "cbdm/separate", "cbdm+diffrop",
           "t2h+cbdm"]


def load_images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from pipeline.sources.fashion_mnist import DEBIAN_DIR, read_idx

    images = torch.from_numpy(read_idx(DEBIAN_DIR / "train-images-idx3-ubyte.gz")[:n].copy())[..., None]
    labels = torch.from_numpy(read_idx(DEBIAN_DIR / "train-labels-idx1-ubyte.gz")[:n].astype("int64"))
    return to_model_space(images, 32), labels


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x0, y = load_images(args.batch_size)
    counts = long_tailed_counts(6000, 10, "exp", 0.01)
    hp = TrainHParams(lr=1e-3, warmup_steps=100, ema_decay=0.999, bf16=True)
    schedule = NoiseSchedule()
    runs = {}
    for name in METHODS:
        method, _, variant = name.partition("/")
        torch.manual_seed(0)
        state = make_train_state(build_unet("small", in_channels=1, num_classes=10), hp, seed=0)
        opts = MethodOptions(cbdm_batched=variant != "separate", oc_cutoff=1000)
        runs[name] = (state, make_loss(method, opts, counts))
        for _ in range(2):  # warm-up
            train_step(state, x0, y, runs[name][1], schedule, hp)
    times = {name: [] for name in METHODS}
    for _ in range(args.rounds):
        for name in METHODS:
            state, loss_fn = runs[name]
            start = time.perf_counter()
            for _ in range(args.steps):
                out = train_step(state, x0, y, loss_fn, schedule, hp)
            out["loss"].item()
            times[name].append((time.perf_counter() - start) / args.steps)
    base = statistics.median(times["ddpm"])
    goals = {"t2h": 1.15, "diffrop": 1.15, "cbdm": 2.1}
    print(f"per-step time, batch {args.batch_size}, small UNet, bf16, {args.threads} threads, "
          f"median of {args.rounds} interleaved rounds of {args.steps} steps")
    for name in METHODS:
        med = statistics.median(times[name])
        goal = goals.get(name)
        verdict = "" if goal is None else f"  (goal <= {goal:.2f}x: {'met' if med / base <= goal else 'missed'})"
        print(f"  {name:<14} {med * 1000:7.1f} ms  {med / base:5.2f}x DDPM{verdict}")


if __name__ == "__main__":
    main()
