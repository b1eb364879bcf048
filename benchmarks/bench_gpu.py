"""The GPU benchmark suite, one call (≤ 8 minutes on an H100/H200), pure torch (no ray):

  train      the cifar preset's train step (35.7M UNet): the reference-style fp32 loop (Python EMA
             over the state dict, a `.item()` host sync every step) against ours (bf16 autocast,
             channels_last, fused Adam, one foreach EMA op, no per-step host sync), ± torch.compile;
             steps/s, images/s and MFU (37.3 GFLOP per image forward + backward)
  cbdm       CBDM's y and y′ forwards batched into one call against two passes
  sample     DDIM-100 + CFG and the fastest few-step solver setting, images/s
  fidelity   torch-fidelity's inception-v3-compat feature extraction + FID/IS on `--fid-images`
             images (50k by default; random weights, since the machine has no internet: this
             times the computation, not the number)

`--tiny` runs the same code with a small UNet and a few steps, on any device (a CI test runs it
on the CPU so the script cannot rot). Prints one line per measurement and a JSON summary.

    python benchmarks/bench_gpu.py [--tiny] [--compile] [--solver dpmpp_2m --solver-steps 10] [--json out.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the device machine has no install

from models.diffusion.guidance import CFGDenoiser, ImageNoise  # noqa: E402
from models.diffusion.samplers import generate  # noqa: E402
from models.diffusion.schedule import NoiseSchedule  # noqa: E402
from models.diffusion.training import TrainHParams, make_train_state, train_step  # noqa: E402
from models.diffusion.unet import build_unet  # noqa: E402
from models.methods.base import ddpm_loss  # noqa: E402
from models.methods.registry import default_options, make_loss  # noqa: E402

GFLOP_PER_IMAGE = 37.3  # DDPM CIFAR UNet, forward + backward, 32×32×3


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, steps: int, warmup: int, device) -> float:
    """Seconds per call of fn(), after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / steps


def reference_ema(source, target, decay):
    """The reference code's EMA: a Python loop over the state dict."""
    source_dict, target_dict = source.state_dict(), target.state_dict()
    for key in source_dict:
        target_dict[key].data.copy_(target_dict[key].data * decay + source_dict[key].data * (1 - decay))


def bench_train(args, device, x, y) -> dict:
    schedule = NoiseSchedule()
    torch.manual_seed(0)
    net = build_unet(args.preset, in_channels=3, num_classes=10).to(device)
    ema = copy.deepcopy(net)
    opt = torch.optim.Adam(net.parameters(), lr=2e-4)
    log = []

    def reference_step():
        opt.zero_grad()
        loss = ddpm_loss(net, x, y, schedule)["loss"].mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        reference_ema(net, ema, 0.9999)
        log.append(loss.item())  # the per-step host sync of tqdm/tensorboard logging

    out = {"baseline": timed(reference_step, args.steps, 3, device)}
    variants = [("taildiff", False)] + ([("taildiff+compile", True)] if args.compile else [])
    for label, compile_net in variants:
        hp = TrainHParams(lr=2e-4, warmup_steps=5000, ema_decay=0.9999, bf16=True,
                          channels_last=device.type == "cuda")
        torch.manual_seed(0)
        state = make_train_state(build_unet(args.preset, in_channels=3, num_classes=10), hp, seed=0, device=device)
        if compile_net:
            state.net = torch.compile(state.net)
        xc = x.contiguous(memory_format=torch.channels_last) if hp.channels_last else x
        out[label] = timed(lambda: train_step(state, xc, y, ddpm_loss, schedule, hp), args.steps,
                           15 if compile_net else 3, device)
    return out


def bench_cbdm(args, device, x, y) -> dict:
    schedule = NoiseSchedule()
    out = {}
    for label, batched in (("cbdm batched", True), ("cbdm two-pass", False)):
        opts = default_options()
        opts["cbdm"] = type(opts["cbdm"])(batched=batched)
        loss = make_loss("cbdm", opts, [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50])
        hp = TrainHParams(lr=2e-4, warmup_steps=5000, bf16=True, channels_last=device.type == "cuda")
        torch.manual_seed(0)
        state = make_train_state(build_unet(args.preset, in_channels=3, num_classes=10), hp, seed=0, device=device)
        out[label] = timed(lambda: train_step(state, x, y, loss, schedule, hp), max(2, args.steps // 2), 2, device)
    return out


@torch.no_grad()
def bench_sample(args, device) -> dict:
    torch.manual_seed(0)
    net = build_unet(args.preset, in_channels=3, num_classes=10).to(device).eval()
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    den = CFGDenoiser(net, 1.5, net.null_label, autocast_dtype=torch.bfloat16)
    schedule = NoiseSchedule()
    n = args.sample_batch
    y = torch.arange(n, device=device) % 10
    out = {}
    for label, sampler, steps in (("ddim-100 + cfg", "ddim", args.ddim_steps),
                                  (f"{args.solver}-{args.solver_steps} + cfg", args.solver, args.solver_steps)):
        seconds = timed(lambda: generate(den, schedule, ImageNoise(range(n), (3, 32, 32), device), y, sampler=sampler,
                                         steps=steps), 1, 1, device)
        out[label] = n / seconds
    return out


def bench_fidelity(args, device) -> float:
    """Seconds for inception features of `fid_images` images + FID and IS from them."""
    import tempfile

    import torch_fidelity.utils as tfu
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_features_to_metric

    class Fresh(FeatureExtractorInceptionV3):  # random weights: no download on this machine
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None

    with tempfile.TemporaryDirectory() as tmp:
        torch.save({}, f"{tmp}/empty.pt")
        weights = f"{tmp}/inception.pt"
        torch.save(Fresh("inception-v3-compat", ["2048"], feature_extractor_weights_path=f"{tmp}/empty.pt")
                   .state_dict(), weights)
        net = tfu.create_feature_extractor("inception-v3-compat", ["2048", "logits_unbiased"],
                                           cuda=device.type == "cuda", verbose=False,
                                           feature_extractor_weights_path=weights)
        images = torch.randint(0, 256, (args.fid_images, 3, 32, 32), dtype=torch.uint8)
        sync(device)
        start = time.perf_counter()
        feats, logits = [], []
        with torch.no_grad():
            for i in range(0, len(images), args.fid_batch):
                f, lg = net(images[i:i + args.fid_batch].to(device))
                feats.append(f.double().cpu())
                logits.append(lg.double().cpu())
        feats, logits = torch.cat(feats), torch.cat(logits)
        stats = fid_features_to_statistics(feats)
        fid_statistics_to_metric(stats, stats, verbose=False)
        isc_features_to_metric(logits, splits=10)
        sync(device)
        return time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="small UNet, few steps: the CPU smoke run")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--solver", default="dpmpp_2m")
    parser.add_argument("--solver-steps", type=int, default=10)
    parser.add_argument("--ddim-steps", type=int, default=100)
    parser.add_argument("--sample-batch", type=int, default=500)
    parser.add_argument("--fid-images", type=int, default=50_000)
    parser.add_argument("--fid-batch", type=int, default=500)
    parser.add_argument("--peak-tflops", type=float, default=790.0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    args.preset = "cifar"
    if args.tiny:
        args.preset, args.batch_size, args.steps = "small", 8, 2
        args.sample_batch, args.ddim_steps, args.solver_steps, args.fid_images, args.fid_batch = 4, 4, 3, 16, 8
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(args.batch_size, 3, 32, 32, generator=g) * 2 - 1).to(device)
    y = torch.randint(0, 10, (args.batch_size,), generator=g).to(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    results: dict = {"device": name, "preset": args.preset, "batch": args.batch_size, "tiny": args.tiny}

    train = bench_train(args, device, x, y)
    for label, seconds in train.items():
        img_s = args.batch_size / seconds
        mfu = img_s * GFLOP_PER_IMAGE * 1e9 / (args.peak_tflops * 1e12)
        results[label] = {"steps_per_s": round(1 / seconds, 3), "images_per_s": round(img_s, 1), "mfu": round(mfu, 4)}
        print(f"train  {label:<18} {1 / seconds:8.2f} steps/s {img_s:9.1f} img/s  MFU {mfu:6.1%}")
    print(f"train  taildiff / baseline: {train['baseline'] / train['taildiff']:.2f}x")
    cbdm = bench_cbdm(args, device, x, y)
    results["cbdm_two_pass_over_batched"] = round(cbdm["cbdm two-pass"] / cbdm["cbdm batched"], 3)
    print(f"cbdm   batched {cbdm['cbdm batched'] * 1e3:.1f} ms/step, two-pass {cbdm['cbdm two-pass'] * 1e3:.1f} ms/step "
          f"({results['cbdm_two_pass_over_batched']:.2f}x)")
    for label, img_s in bench_sample(args, device).items():
        results[f"sample {label}"] = round(img_s, 1)
        print(f"sample {label:<22} {img_s:9.1f} img/s")
    seconds = bench_fidelity(args, device)
    results[f"fidelity {args.fid_images} images"] = round(seconds, 2)
    print(f"fid+is {args.fid_images} images: {seconds:.1f} s (inception features + statistics)")
    print(json.dumps(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
