"""How steady is a short ResNet-32 fit's last epoch under each learning-rate schedule? (no Ray)

The study's classifiers train 3 epochs. LDAM-DRW's per-epoch step schedule scaled to 3 epochs is
lr 0.1 for two epochs and 0.001 for the last, and its last-epoch accuracy swings between seeds
(one arm of 3 seeds collapsed in each of two studies). This trains the real Fashion-MNIST-LT
(imbalance 0.01, the study's data) with each schedule over `--seeds` seeds for the `ce` and `rs`
recipes, the same seeds per schedule, and prints per schedule: top-1 and few-group accuracy
mean ± std over seeds, the worst seed, and rs − ce with a 95% t-interval over seeds (paired by seed).

    python benchmarks/bench_classify_schedule.py --seeds 4 --epochs 3
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.classify.lt_losses import ClassifierLoss, EpochSchedule, get_recipe  # noqa: E402
from models.classify.metrics import classification_metrics  # noqa: E402
from models.classify.resnet import resnet32  # noqa: E402
from models.classify.training import classifier_step, make_classifier_state, predict, set_lr  # noqa: E402
from models.data.longtail import long_tailed_counts, select_long_tailed  # noqa: E402
from models.data.resampling import epoch_plan  # noqa: E402
from models.evaluation.intervals import mean_interval  # noqa: E402
from models.precision import resolve_bf16  # noqa: E402
from pipeline.sources.fashion_mnist import DEBIAN_DIR, read_idx  # noqa: E402


def load(root: Path):
    xtr, ytr = read_idx(root / "train-images-idx3-ubyte.gz"), read_idx(root / "train-labels-idx1-ubyte.gz")
    xte, yte = read_idx(root / "t10k-images-idx3-ubyte.gz"), read_idx(root / "t10k-labels-idx1-ubyte.gz")
    counts = long_tailed_counts(6000, 10, "exp", 0.01)
    idx = select_long_tailed(ytr, counts, seed=0)
    return (xtr[idx][..., None].copy(), ytr[idx].astype(np.int64), xte[..., None].copy(), yte.astype(np.int64),
            counts)


def fit(schedule: str, recipe: str, seed: int, data, epochs: int, batch: int, bf16: bool) -> dict:
    xtr, ytr, xte, yte, counts = data
    torch.manual_seed(seed)
    net = resnet32(10, 1, normed=get_recipe(recipe).normed_head)
    state = make_classifier_state(net, 0.1, 0.9, 2e-4, seed, input_size=28)
    sched = EpochSchedule.scaled(epochs, 0.1, kind=schedule)  # models/classify/lt_losses.py
    loss_fn = ClassifierLoss(get_recipe(recipe), counts, sched)
    images, labels = torch.from_numpy(xtr), torch.from_numpy(ytr)
    for epoch in range(epochs):
        plan = epoch_plan(ytr, get_recipe(recipe).resample, seed=seed, epoch=epoch)
        iters = len(plan) // batch
        for it in range(iters):
            rows = torch.from_numpy(plan[it * batch:(it + 1) * batch])
            set_lr(state.opt, sched.lr_at(epoch, it, iters))
            classifier_step(state, images[rows], labels[rows], loss_fn, epoch, True, bf16)
    pred, _ = predict(state.net, torch.from_numpy(xte), bf16=bf16, size=28)
    groups = {"many": [0, 1, 2], "medium": [3, 4, 5, 6], "few": [7, 8, 9]}
    m = classification_metrics(yte, pred.numpy(), 10, groups)
    return {"accuracy": 100 * m["accuracy"], "few": 100 * m["few_accuracy"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--recipes", default="ce,rs")
    ap.add_argument("--schedules", default="step,cosine")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-root", type=Path, default=DEBIAN_DIR)
    ap.add_argument("--out", type=Path, default=None, help="write every fit's numbers here (JSON)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bf16 = resolve_bf16("auto", torch.device("cpu"))
    data = load(args.data_root)
    recipes, schedules = args.recipes.split(","), args.schedules.split(",")
    print(f"Fashion-MNIST-LT, {len(data[1])} training images, ResNet-32, {args.epochs} epochs, batch "
          f"{args.batch_size}, lr 0.1, bf16={bf16}, seeds 0..{args.seeds - 1}")
    runs: dict = {}
    for seed in range(args.seeds):  # seeds outermost: every schedule sees the machine in the same state
        for schedule in schedules:
            for recipe in recipes:
                t0 = time.perf_counter()
                r = fit(schedule, recipe, seed, data, args.epochs, args.batch_size, bf16)
                r["seconds"] = round(time.perf_counter() - t0, 1)
                runs.setdefault(schedule, {}).setdefault(recipe, []).append(r)
                print(f"  seed {seed} {schedule:6s} {recipe:4s} top-1 {r['accuracy']:.2f} few {r['few']:.2f} "
                      f"({r['seconds']} s)", flush=True)
    print(f"\n| schedule | recipe | top-1 mean ± std | worst top-1 | few mean ± std | worst few |")
    print("|---|---|---|---|---|---|")
    for schedule in schedules:
        for recipe in recipes:
            acc = np.array([r["accuracy"] for r in runs[schedule][recipe]])
            few = np.array([r["few"] for r in runs[schedule][recipe]])
            print(f"| {schedule} | {recipe} | {acc.mean():.2f} ± {acc.std(ddof=1):.2f} | {acc.min():.2f} | "
                  f"{few.mean():.2f} ± {few.std(ddof=1):.2f} | {few.min():.2f} |")
    if "ce" in recipes and "rs" in recipes:
        print("\n| schedule | rs − ce top-1 [95% t over seeds] | rs − ce few [95% t] |")
        print("|---|---|---|")
        for schedule in schedules:
            cells = []
            for key in ("accuracy", "few"):
                d = np.array([a[key] - b[key] for a, b in zip(runs[schedule]["rs"], runs[schedule]["ce"])])
                iv = mean_interval(d)
                cells.append(f"{iv['mean']:+.2f} [{iv['low']:+.2f}, {iv['high']:+.2f}]")
            print(f"| {schedule} | {cells[0]} | {cells[1]} |")
    if args.out:
        args.out.write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
