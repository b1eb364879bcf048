"""Sampling with the UNet compiled (torch.compile, inductor) against eager, on this machine's CPU in
fp32, both NHWC (the sampling layout on an fp32 CPU), measured in one run:

1. the network alone: `--repeats` interleaved Euler-a batches of `--batch` images (ω > 0: one forward
   of 2x`--batch` per step), images/s; the compile's cost with an empty inductor cache (cold: a
   fresh machine) and with the cache it just filled (warm: every later actor of that machine); the
   largest difference between the two networks' images from the same seeds, as floats and as uint8.
2. `--stage N`: the sampling stage itself (pipeline.common.generation.generate_set on this process's
   Ray, one CPU actor as the presets): N images, `sample.compile=false` then `true` with an empty
   inductor cache, so the compiled set's wall time includes the cold compile.

    python benchmarks/bench_sample_compile.py [--checkpoint model.pt] [--repeats 3] [--batch 100]
        [--sampler euler_a] [--steps 15] [--omega 3] [--stage 1000]

Without a checkpoint the default preset's network with its initial weights is timed (the speed does
not depend on the weights; the image differences do, so give a trained model.pt for those).
pipeline/common/devices.py:resolve_compile uses the result.
"""
from __future__ import annotations

import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def network(args, net, schedule, C, size, num_classes) -> None:
    from models.data.images import to_uint8_images
    from models.diffusion.guidance import CFGDenoiser, ImageNoise
    from models.diffusion.samplers import generate

    eager = net.to(memory_format=torch.channels_last)
    compiled = torch.compile(copy.deepcopy(eager))
    y = torch.arange(args.batch) % num_classes

    def sample(n):
        noise = ImageNoise(list(range(args.batch)), (C, size, size), "cpu")
        with torch.no_grad():
            return generate(CFGDenoiser(n, args.omega, n.null_label), schedule, noise, y, sampler=args.sampler,
                            steps=args.steps)

    x = torch.randn(2 * args.batch, C, size, size).contiguous(memory_format=torch.channels_last)
    t, lab = torch.full((2 * args.batch,), 500), torch.cat([y, y])
    with torch.no_grad():
        start = time.perf_counter()
        compiled(x, t, lab)  # the cold compile (this process's inductor cache dir starts empty)
        cold = time.perf_counter() - start
        torch._dynamo.reset()  # forget the compiled graph; the on-disk cache stays
        compiled = torch.compile(copy.deepcopy(eager))
        start = time.perf_counter()
        compiled(x, t, lab)
        warm = time.perf_counter() - start
        eager(x, t, lab)  # the eager network's first call (oneDNN's set-up) is not timed either
    rates, images = {"eager": [], "compiled": []}, {}
    for _ in range(args.repeats):
        for name, n in (("eager", eager), ("compiled", compiled)):
            start = time.perf_counter()
            images[name] = sample(n)
            rates[name].append(args.batch / (time.perf_counter() - start))
    diff = float((images["eager"] - images["compiled"]).abs().max())
    u8 = [to_uint8_images(images[k].float(), size, size).numpy().astype(int) for k in ("eager", "compiled")]
    pix = np.abs(u8[0] - u8[1])
    print(f"network: {args.sampler}-{args.steps}, ω = {args.omega:g}, batch {args.batch}, {args.threads} threads, "
          f"fp32, NHWC, {args.repeats} interleaved repeats")
    for name, r in rates.items():
        print(f"  {name:9s} {np.median(r):6.2f} img/s  (runs {', '.join(f'{v:.2f}' for v in r)})")
    ratio = float(np.median(np.array(rates["compiled"]) / np.array(rates["eager"])))
    print(f"  compiled / eager: {ratio:.2f}x (median of per-repeat ratios)")
    print(f"  compile: {cold:.1f} s with an empty inductor cache, {warm:.1f} s with a warm one")
    print(f"  images: max |Δ| {diff:.1e} (floats in [-1, 1]); uint8 pixels that differ {100 * (pix > 0).mean():.3f}% "
          f"(max {pix.max()} level)")
    saved = 1 / np.median(rates["eager"]) - 1 / np.median(rates["compiled"])  # seconds per image
    if saved > 0:
        print(f"  break-even: {cold / saved:.0f} images (cold), {warm / saved:.0f} images (warm) per actor")


def stage(args, weights: Path, n: int) -> None:
    import ray

    from pipeline.common.artifacts import DatasetArtifact, ModelArtifact, load_model
    from pipeline.common.generation import generate_set
    from pipeline.config import load_config

    _, run_cfg, manifest = load_model(weights)
    classes = len(manifest["class_names"])
    per_class = -(-n // classes)
    out = Path(tempfile.mkdtemp(prefix="taildiff-bench-compile-"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    model = ModelArtifact("ddpm", weights.parent, {"step": 0}, True)
    data = DatasetArtifact(out, manifest, True)
    print(f"stage: generate_set, {per_class * classes} images, {args.sampler}-{args.steps}, ω = {args.omega:g}, "
          f"batch {args.batch}, one CPU actor")
    seconds = {}
    for setting in ("false", "true"):
        cfg = load_config(REPO / "configs" / "fmnist_lt.yaml", [
            f"output_dir={out}", f"sample.sampler={args.sampler}", f"sample.steps={args.steps}",
            f"sample.omega={args.omega}", f"sample.batch_size={args.batch}", "sample.num_actors=1",
            f"sample.compile={setting}", "sample.grid_per_class=0", f"model.timesteps={run_cfg.model.timesteps}"])
        start = time.perf_counter()
        generate_set(cfg, data, model, [per_class] * classes, folder=f"compile-{setting}", seed_tag="bench")
        seconds[setting] = time.perf_counter() - start
        print(f"  compile={setting:5s} {seconds[setting]:7.1f} s  ({per_class * classes / seconds[setting]:.2f} img/s"
              + (", incl. the cold compile)" if setting == "true" else ")"))
    print(f"  eager / compiled wall time: {seconds['false'] / seconds['true']:.2f}x")
    ray.shutdown()


def main() -> None:
    from bench_sample_layout import sampling_net, sampling_parser  # this folder: the sampling benchmarks' options
    from pipeline.common.artifacts import make_schedule
    from pipeline.common.machine import cpu_name

    parser = sampling_parser(__doc__)
    parser.add_argument("--stage", type=int, default=0, help="also time the sampling stage on this many images")
    args = parser.parse_args()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="taildiff-inductor-")  # cold for part 1
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_name()}; torch {torch.__version__}")
    net, cfg, manifest = sampling_net(args.checkpoint)
    (_, _, C), size = manifest["image_shape"], cfg.model.image_size
    network(args, net, make_schedule(cfg), C, size, len(manifest["class_names"]))
    if args.stage:
        if not args.checkpoint:
            raise SystemExit("--stage needs --checkpoint (a model.pt written by the train stage)")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="taildiff-inductor-")  # the actors' (cold)
        stage(args, Path(args.checkpoint).resolve(), args.stage)


if __name__ == "__main__":
    main()
