"""Classifier throughput on this machine, measured in one run (ratios, not absolute goals).

ResNet-32 (models/classify/resnet.py) on Fashion-MNIST-sized batches (uint8 28×28 grey, centred
on the recipe's 32×32 canvas or kept at 28×28 (`classify.input_size`), the LDAM-DRW
augmentation, batch 128) through `models.classify.training.classifier_step`: images/s in fp32
and in bf16 autocast, with and without channels_last (weights and inputs); test-set prediction
images/s; and what one epoch of the default preset costs (14,886 LT images, + 1,932 synthetic
per method with the fill-to-600 plan), from those rates.

    python benchmarks/bench_classify.py [--steps 30] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def train_rate(steps: int, bf16: bool, channels_last: bool, size: int = 32, batch: int = 128) -> float:
    from models.classify.training import classifier_step, make_classifier_state
    from models.classify.lt_losses import RECIPES, ClassifierLoss, EpochSchedule
    from models.classify.resnet import resnet32

    torch.manual_seed(0)
    net = resnet32(10, in_channels=1)
    state = make_classifier_state(net, 0.1, 0.9, 2e-4, seed=0, input_size=size, channels_last=channels_last)
    loss_fn = ClassifierLoss(RECIPES["ce"], [6000, 60] + [100] * 8, EpochSchedule.scaled(10, 0.1))
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 28, 28, 1), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (batch,), generator=g)
    warm = 3
    for step in range(warm + steps):
        if step == warm:
            start = time.perf_counter()
        loss = classifier_step(state, images, labels, loss_fn, epoch=0, augment=True, bf16=bf16)
    loss.item()
    return steps * batch / (time.perf_counter() - start)


def predict_rate(bf16: bool, n: int = 4000) -> float:
    from models.classify.training import predict
    from models.classify.resnet import resnet32

    net = resnet32(10, in_channels=1)
    images = torch.randint(0, 256, (n, 28, 28, 1), dtype=torch.uint8)
    predict(net, images[:500], bf16=bf16)
    start = time.perf_counter()
    predict(net, images, bf16=bf16)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rates = {}
    for size in (32, 28):
        for bf16 in (False, True):
            for cl in (False, True):
                name = f"train {size}px {'bf16' if bf16 else 'fp32'}{' channels_last' if cl else ''}"
                rates[name] = train_rate(args.steps, bf16, cl, size)
    rates["predict fp32"] = predict_rate(False)
    rates["predict bf16"] = predict_rate(True)
    base = rates["train 32px fp32"]
    for name, rate in rates.items():
        ratio = f"  ({rate / base:.2f}x train 32px fp32)" if name.startswith("train") else ""
        print(f"{name:36s} {rate:8.0f} img/s{ratio}")
    train, test = rates["train 28px bf16 channels_last"], rates["predict bf16"]
    real, synthetic, test_images = 14_886, 1_932, 10_000
    print(f"default preset epoch (28px, bf16, channels_last): LT real {real / train:.1f} s, real + synthetic {(real + synthetic) / train:.1f} s, "
          f"test-set evaluation {test_images / test:.1f} s")
    print(json.dumps({k: round(v, 1) for k, v in rates.items()}))


if __name__ == "__main__":
    main()
