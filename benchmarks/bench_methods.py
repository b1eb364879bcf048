"""Every long-tail method against DDPM on this machine, in one run: per-step cost, and with
`--grad-share` how strong each method's own term is.

Cost: the same batch (Fashion-MNIST-LT images, batch 64), the default `small` UNet, bf16 autocast
where this CPU has bf16 kernels (the preset's `bf16: auto`, models/precision.py), else fp32,
and the same `models.diffusion.training.train_step` the Ray Train workers use. Methods are timed
in interleaved rounds (every round times every method once) and the median per-step time is
reported, so a slow patch of the machine hits all methods alike.

Gradient share (`--grad-share`): ‖∇θ regulariser‖ / ‖∇θ DDPM term‖, the median over `--batches`
batches of the Fashion-MNIST-LT training set, at the network's initialisation and after
`--train-steps` DDPM steps of the default preset's recipe (or on a trained `--checkpoint`). OC
has no regulariser: its line is the fraction of samples whose target moved. Printed as lines
`grad_share <method> <value>` (one per state).

    python benchmarks/bench_methods.py [--rounds 5] [--steps 8]
    python benchmarks/bench_methods.py --grad-share [--batches 50] [--train-steps 500] [--checkpoint model.pt]
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from models.data.images import to_model_space  # noqa: E402
from models.data.longtail import long_tailed_counts, select_long_tailed  # noqa: E402
from models.diffusion.schedule import NoiseSchedule  # noqa: E402
from models.diffusion.training import TrainHParams, drop_labels, make_train_state, train_step  # noqa: E402
from models.diffusion.unet import build_unet  # noqa: E402
from models.methods.base import ddpm_loss  # noqa: E402
from models.methods.registry import default_options, make_loss  # noqa: E402
from models.precision import resolve_bf16  # noqa: E402

COST = ["ddpm", "t2h", "h2t", "oc_full", "diffrop", "diffrop/exponential", "diffrop/hinge", "reweight", "cbdm",
        "cbdm/separate", "cbdm+diffrop", "t2h+cbdm", "diffrc", "diffrc_cfg"]
SHARE = ["cbdm", "diffrop", "diffrop/exponential", "diffrop/hinge", "diffrop/neg_l2", "diffrop/tau0=10",
         "diffrop/tau0=30", "diffrop/tau0=100", "t2h"]
IMAGE_SIZE = 28  # the default preset's model.image_size (configs/fmnist_lt.yaml)


def options_for(name: str, preset: dict | None = None) -> tuple[str, dict]:
    """`method/variant` -> (method, options): variant = a DiffROP form or CBDM's separate forwards."""
    method, _, variant = name.partition("/")
    opts = default_options()
    for section, fields in (preset or {}).items():
        opts[section] = dataclasses.replace(opts[section], **fields)
    if variant == "separate":
        opts["cbdm"] = dataclasses.replace(opts["cbdm"], batched=False)
    elif variant:  # DiffROP: a form and/or key=value fields, e.g. exponential or reciprocal,tau0=10
        for item in variant.split(","):
            key, eq, value = item.partition("=")
            field = {key: float(value)} if eq else {"form": key}
            opts["diffrop"] = dataclasses.replace(opts["diffrop"], **field)
    return method, opts


def load_lt(n: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Fashion-MNIST-LT (the default preset's split) in model space."""
    from pipeline.sources.fashion_mnist import DEBIAN_DIR, read_idx

    images = read_idx(DEBIAN_DIR / "train-images-idx3-ubyte.gz")
    labels = read_idx(DEBIAN_DIR / "train-labels-idx1-ubyte.gz").astype("int64")
    counts = long_tailed_counts(6000, 10, "exp", 0.01)
    idx = select_long_tailed(labels, counts, seed=0)
    if n is not None:
        idx = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(0))[:n].numpy()]
    x = to_model_space(torch.from_numpy(images[idx].copy())[..., None], IMAGE_SIZE)
    return x, torch.from_numpy(labels[idx]), counts


def bench_cost(args) -> None:
    x0, y, counts = load_lt(args.batch_size)
    hp = TrainHParams(lr=1e-3, warmup_steps=100, ema_decay=0.999, bf16=resolve_bf16("auto", "cpu"))
    schedule = NoiseSchedule()
    runs = {}
    for name in COST:
        method, opts = options_for(name)
        torch.manual_seed(0)
        state = make_train_state(build_unet("small", in_channels=1, num_classes=10, dropout=0.0), hp, seed=0)
        inputs = {}
        if method.startswith("diffrc"):  # the frozen head-class source model its pair loss compares against
            source = build_unet("small", in_channels=1, num_classes=10, dropout=0.0).eval().requires_grad_(False)
            inputs["source"] = source
        runs[name] = (state, make_loss(method, opts, counts), inputs)
        for _ in range(2):  # warm-up
            train_step(state, x0, y, runs[name][1], schedule, hp, **inputs)
    times = {name: [] for name in COST}
    for _ in range(args.rounds):
        for name in COST:
            state, loss_fn, inputs = runs[name]
            start = time.perf_counter()
            for _ in range(args.steps):
                out = train_step(state, x0, y, loss_fn, schedule, hp, **inputs)
            out["loss"].item()
            times[name].append((time.perf_counter() - start) / args.steps)
    base = statistics.median(times["ddpm"])
    print(f"per-step time, batch {args.batch_size}, small UNet, {'bf16' if hp.bf16 else 'fp32'}, {args.threads} threads, "
          f"median of {args.rounds} interleaved rounds of {args.steps} steps")
    for name in COST:
        med = statistics.median(times[name])
        print(f"  {name:<20} {med * 1000:7.1f} ms  {med / base:5.2f}x DDPM")


def grad_norm(value: torch.Tensor, params) -> float:
    grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
    return float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))


def grad_shares(net, x: torch.Tensor, y: torch.Tensor, counts, batches: int, batch_size: int, preset: dict,
                names=SHARE) -> dict:
    """Median ‖∇ term‖ / ‖∇ DDPM term‖ per method over `batches` batches (fp32, labels dropped as in training)."""
    schedule = NoiseSchedule()
    net.requires_grad_(True)  # a trained checkpoint's EMA weights come frozen
    params = list(net.parameters())
    out = {}
    for name in names:
        method, opts = options_for(name, preset)
        loss = make_loss(method, opts, counts)
        values = []
        for b in range(batches):
            g = torch.Generator().manual_seed(b)
            idx = torch.randint(0, len(y), (batch_size,), generator=g)
            y_in = drop_labels(y[idx], 0.1, "sample", net.null_label, g)
            res = loss(net, x[idx], y_in, schedule, generator=g, y_true=y[idx], keep_graph=True)
            if method == "t2h":
                values.append(float(res["oc_moved"].mean()))
                continue
            reg = sum(v.mean() for v in res["_terms"].values())
            values.append(grad_norm(reg, params) / max(grad_norm(res["_ddpm"].mean(), params), 1e-12))
        out[name] = statistics.median(values)
    return out


def bench_grad_share(args) -> None:
    import yaml

    torch.set_num_threads(args.threads)
    x, y, counts = load_lt()
    preset = {k: v for k, v in (yaml.safe_load((REPO / "configs" / "fmnist_lt.yaml").read_text()) or {}).items()
              if k in default_options()}
    states = []
    if args.checkpoint:
        blob = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        net = build_unet("small", in_channels=1, num_classes=10, dropout=0.0)
        net.load_state_dict(blob["ema"])
        states.append((f"checkpoint step {blob['step']}", net))
    else:
        torch.manual_seed(0)
        net = build_unet("small", in_channels=1, num_classes=10, dropout=0.0)
        states.append(("init", net))
        hp = TrainHParams(lr=1e-3, warmup_steps=100, ema_decay=0.999, ema_warmup=True,
                          bf16=resolve_bf16("auto", "cpu"))
        trained = build_unet("small", in_channels=1, num_classes=10, dropout=0.0)
        trained.load_state_dict(net.state_dict())
        state = make_train_state(trained, hp, seed=0)
        g = torch.Generator().manual_seed(1)
        for _ in range(args.train_steps):
            idx = torch.randint(0, len(y), (64,), generator=g)
            train_step(state, x[idx], y[idx], ddpm_loss, NoiseSchedule(), hp)
        states.append((f"after {args.train_steps} DDPM steps (EMA)", state.ema))
    for label, net in states:
        net = net.float().train()
        shares = grad_shares(net, x, y, counts, args.batches, 64, preset, args.methods.split(","))
        print(f"# {label}: median over {args.batches} batches of 64; t2h = moved fraction")
        for name, value in shares.items():
            print(f"grad_share {name} {value:.4g}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--grad-share", action="store_true")
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--train-steps", type=int, default=500)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--methods", default=",".join(SHARE),
                        help="comma-separated grad-share entries (default: all of SHARE)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.grad_share:
        bench_grad_share(args)
    else:
        bench_cost(args)


if __name__ == "__main__":
    main()
