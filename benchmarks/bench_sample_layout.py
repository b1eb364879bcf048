"""Sampling throughput with the UNet's weights contiguous (NCHW) against channels_last (NHWC), on
this machine's CPU in fp32, interleaved repeats in one run; and the largest difference between the
two layouts' images (the same seeds).

    python benchmarks/bench_sample_layout.py [--checkpoint model.pt] [--repeats 3] [--batch 100]
        [--sampler euler_a] [--steps 15] [--omega 3]

Without a checkpoint the default preset's network with its initial weights is timed (the speed does
not depend on the weights). pipeline/common/devices.py:conv_channels_last uses the result.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def sampling_parser(doc: str) -> argparse.ArgumentParser:
    """The options of the sampling benchmarks (this one, bench_sample_compile.py)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--sampler", default="euler_a")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--omega", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=2)
    return parser


def sampling_net(checkpoint: str | None):
    """(network in eval mode without gradients, its Config, its data manifest): a trained model.pt, else
    the default preset's network with its initial weights (speed does not depend on the weights)."""
    from pipeline.common.artifacts import build_net, load_model
    from pipeline.config import load_config

    if checkpoint:
        net, cfg, manifest = load_model(Path(checkpoint))
    else:
        cfg = load_config(REPO / "configs" / "fmnist_lt.yaml", [])
        manifest = {"image_shape": [28, 28, 1], "class_names": [str(i) for i in range(10)]}
        torch.manual_seed(0)
        net = build_net(cfg, manifest)
    return net.eval().requires_grad_(False), cfg, manifest


def main() -> None:
    from models.diffusion.guidance import CFGDenoiser, ImageNoise
    from models.diffusion.samplers import generate
    from pipeline.common.artifacts import make_schedule
    from pipeline.common.machine import cpu_name

    args = sampling_parser(__doc__).parse_args()
    torch.set_num_threads(args.threads)
    net, cfg, manifest = sampling_net(args.checkpoint)
    schedule, (_, _, C), size = make_schedule(cfg), manifest["image_shape"], cfg.model.image_size
    nets = {"contiguous": net, "channels_last": copy.deepcopy(net).to(memory_format=torch.channels_last)}
    y = torch.arange(args.batch) % len(manifest["class_names"])
    rates, images = {k: [] for k in nets}, {}
    for _ in range(args.repeats):
        for name, n in nets.items():
            den = CFGDenoiser(n, args.omega, n.null_label)
            noise = ImageNoise(list(range(args.batch)), (C, size, size), "cpu")
            start = time.perf_counter()
            with torch.inference_mode():
                images[name] = generate(den, schedule, noise, y, sampler=args.sampler, steps=args.steps)
            rates[name].append(args.batch / (time.perf_counter() - start))
    print(f"{args.sampler}-{args.steps}, ω = {args.omega:g}, batch {args.batch}, {args.threads} threads, fp32, "
          f"{args.repeats} interleaved repeats; CPU: {cpu_name()}")
    for name, r in rates.items():
        print(f"  {name:13s} {np.median(r):6.2f} img/s  (runs {', '.join(f'{x:.2f}' for x in r)})")
    ratio = np.median(np.array(rates["channels_last"]) / np.array(rates["contiguous"]))
    diff = float((images["channels_last"] - images["contiguous"]).abs().max())
    print(f"  channels_last / contiguous: {ratio:.2f}x (median of per-repeat ratios); max |Δ image| {diff:.1e}")


if __name__ == "__main__":
    main()
