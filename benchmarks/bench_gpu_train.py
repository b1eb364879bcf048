"""GPU training throughput of the `cifar` preset (the DDPM CIFAR-10 UNet, 35.7M parameters).

Pure torch (no ray), so it runs on a lent accelerator box. Measures, in one run and on the same
device, synthetic CIFAR-shaped batches:
  baseline  the loop as the reference code writes it: fp32, a Python EMA loop over the state
            dict, `.item()` logging and host syncs every step;
  taildiff  models.training.train_step: bf16 autocast, channels_last, fused Adam, one foreach
            EMA op, no per-step host sync (optionally torch.compile on the net).
Reports steps/s, images/s, MFU against a peak (default 790 TFLOP/s dense bf16, an H100/H200
figure) with 37.3 GFLOP per image forward+backward, and the taildiff/baseline ratio.

    python benchmarks/bench_gpu_train.py [--batch-size 128] [--steps 50] [--compile] [--preset cifar]
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.methods.base import ddpm_loss  # noqa: E402
from models.diffusion.schedule import NoiseSchedule  # noqa: E402
from models.diffusion.training import TrainHParams, make_train_state, train_step  # noqa: E402
from models.diffusion.unet import build_unet  # noqa: E402

GFLOP_PER_IMAGE = 37.3  # DDPM CIFAR UNet, forward + backward, 32×32×3


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def reference_ema(source, target, decay):
    """The reference code's EMA: a Python loop over the state dict."""
    source_dict, target_dict = source.state_dict(), target.state_dict()
    for key in source_dict.keys():
        target_dict[key].data.copy_(target_dict[key].data * decay + source_dict[key].data * (1 - decay))


def baseline(net, x, y, steps, device):
    schedule = NoiseSchedule()
    ema = copy.deepcopy(net)
    opt = torch.optim.Adam(net.parameters(), lr=2e-4)
    log = []
    for step in range(steps + 3):
        if step == 3:
            sync(device)
            start = time.perf_counter()
        opt.zero_grad()
        loss = ddpm_loss(net, x, y, schedule)["loss"].mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        reference_ema(net, ema, 0.9999)
        log.append(loss.item())  # the per-step host sync of tensorboard/tqdm logging
    sync(device)
    return steps / (time.perf_counter() - start)


def optimised(net, x, y, steps, device, compile_net):
    hp = TrainHParams(lr=2e-4, warmup_steps=5000, ema_decay=0.9999, bf16=True, channels_last=True)
    state = make_train_state(net, hp, seed=0, device=device)
    if compile_net:
        state.net = torch.compile(state.net)
    schedule = NoiseSchedule()
    x = x.contiguous(memory_format=torch.channels_last)
    for step in range(steps + (15 if compile_net else 3)):
        if step == (15 if compile_net else 3):
            sync(device)
            start = time.perf_counter()
        out = train_step(state, x, y, ddpm_loss, schedule, hp)
    out["loss"].item()
    sync(device)
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--preset", default="cifar")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=790.0)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(args.batch_size, 3, 32, 32, generator=g) * 2 - 1).to(device)
    y = torch.randint(0, 10, (args.batch_size,), generator=g).to(device)

    torch.manual_seed(0)
    base_sps = baseline(build_unet(args.preset, in_channels=3, num_classes=10).to(device), x, y, args.steps, device)
    torch.manual_seed(0)
    opt_sps = optimised(build_unet(args.preset, in_channels=3, num_classes=10), x, y, args.steps, device,
                        args.compile)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    results = {"device": name, "preset": args.preset, "batch": args.batch_size, "compile": args.compile}
    for label, sps in (("baseline", base_sps), ("taildiff", opt_sps)):
        img_s = sps * args.batch_size
        mfu = img_s * GFLOP_PER_IMAGE * 1e9 / (args.peak_tflops * 1e12)
        results[label] = {"steps_per_s": round(sps, 3), "images_per_s": round(img_s, 1), "mfu": round(mfu, 4)}
        print(f"{label:<9} {sps:8.2f} steps/s {img_s:9.1f} img/s  MFU {mfu:6.1%} of {args.peak_tflops:.0f} TFLOP/s")
    print(f"taildiff / baseline: {opt_sps / base_sps:.2f}x on {name}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
