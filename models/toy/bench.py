"""A toy long-tail bench in the spirit of DiffROP §5.1 (Eq. 16): a 2-D mixture of Gaussians with
long-tailed class counts and overlapping neighbours, a tiny MLP ε-network, and every registry
method trained for the same number of steps with the project's own losses, samplers and train
step (the data are (B, 2, 1, 1) "images", which every loss flattens).

Per class it measures
  leakage      the fraction of generated samples of the class that fall in another class's region
               (the Bayes region of the true, prior-free class densities: argmax_c N(x; m_c, s_c²))
  energy       the energy distance between generated samples and the true class distribution
               (coverage of the class's mode; 0 = same distribution)
  memorised    the fraction of generated samples closer to one of the class's training points than
               the 5% quantile of fresh true samples' nearest-training distances (5% = no copying)
  spread       the mean pairwise distance of the class's samples over that of true samples (diversity)
The classes sit on an arc, each overlapping its neighbours; the rarest classes lie next to the
most frequent ones, so a model that leans on the head leaks tail samples into it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from models.diffusion.guidance import CFGDenoiser, ImageNoise
from models.diffusion.samplers import generate
from models.diffusion.schedule import NoiseSchedule
from models.diffusion.training import TrainHParams, make_train_state, train_step
from models.methods.registry import default_options, make_loss, method_needs, method_parts
from models.data.resampling import epoch_plan


@dataclass(frozen=True)
class ToyData:
    """Class means on an arc, isotropic std per class, long-tailed counts (head first)."""

    counts: tuple = (1000, 400, 150, 50, 6, 3)
    radius: float = 1.0
    spacing: float = 0.5  # radians between neighbouring class means on the arc
    std: float = 0.15
    order: tuple = (0, 5, 1, 4, 2, 3)  # arc position -> class: tail classes beside the head ones

    @property
    def num_classes(self) -> int:
        return len(self.counts)

    def means(self) -> np.ndarray:
        """(C, 2) class means; class order[k] sits at angle k·spacing."""
        out = np.zeros((self.num_classes, 2))
        for k, c in enumerate(self.order):
            a = (k - (self.num_classes - 1) / 2) * self.spacing
            out[c] = [self.radius * math.sin(a), self.radius * math.cos(a) - 0.5 * self.radius]
        return out

    def sample(self, counts, seed: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        means = self.means()
        x = np.concatenate([means[c] + self.std * rng.standard_normal((n, 2)) for c, n in enumerate(counts)])
        y = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
        return x.astype(np.float32), y.astype(np.int64)

    def region(self, x: np.ndarray) -> np.ndarray:
        """The Bayes region (prior-free) each point falls in. (N, 2) -> (N,)."""
        d = ((x[:, None, :] - self.means()[None]) ** 2).sum(-1)
        return d.argmin(1)


class ToyNet(nn.Module):
    """ε_θ(x, t, y) for 2-D x shaped (B, 2, 1, 1): sinusoidal t, a class embedding (+ null class)."""

    def __init__(self, num_classes: int, width: int = 128, temb: int = 32):
        super().__init__()
        self.null_label, self.temb = num_classes, temb
        self.label = nn.Embedding(num_classes + 1, temb)
        self.net = nn.Sequential(nn.Linear(2 + 2 * temb, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        half = self.temb // 2
        freqs = torch.exp(-math.log(1000.0) * torch.arange(half, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        h = torch.cat([x.flatten(1), args.sin(), args.cos(), self.label(y)], dim=1)  # (B, 2 + 2·temb)
        return self.net(h).view(-1, 2, 1, 1)


@dataclass(frozen=True)
class ToyRun:
    steps: int = 600  # short enough that DDPM's tail is still wrong (at 1500 every class fits)
    batch_size: int = 256
    lr: float = 2e-3
    T: int = 200
    sample_steps: int = 50
    omega: float = 0.0  # the learnt conditional itself: guidance would sharpen every class
    per_class: int = 400  # generated samples per class
    options: dict = field(default_factory=dict)  # section -> options overrides (dicts of fields)


# Per-method option overrides on the toy: in 2-D the OC kernel exp(−‖x_t − √ᾱ x_0‖²/2(1−ᾱ)) is wide at
# every t, so with the default cutoff (= T) most tail targets move to head points; the toy transfers
# only at t < T/10 (the paper's cutoff knob). Everything else runs at its default.
TOY_OPTIONS = {m: {"oc": {"cutoff": 20}} for m in ("t2h", "h2t", "oc_full")}


def toy_run(method: str, **fields) -> "ToyRun":
    """The bench's ToyRun for `method` (its TOY_OPTIONS), other fields as given."""
    return ToyRun(options=TOY_OPTIONS.get(method, {}), **fields)


def _options(overrides: dict) -> dict:
    import dataclasses

    opts = default_options()
    for section, fields in overrides.items():
        opts[section] = dataclasses.replace(opts[section], **fields)
    return opts


def _train(loss, x, y, y_np, mode, run: ToyRun, seed: int, schedule, num_classes: int, *, init=None, p_uncond=0.1,
           **inputs):
    hp = TrainHParams(lr=run.lr, warmup_steps=50, ema_decay=0.99, ema_warmup=True, p_uncond=p_uncond)
    net = ToyNet(num_classes)  # every class's label row, also for a source trained on the head only
    if init is not None:
        net.load_state_dict(init.state_dict())
    state = make_train_state(net, hp, seed=seed)
    epoch, plan, pos = 0, None, 0
    while state.step < run.steps:
        if plan is None or pos + run.batch_size > len(plan):
            plan = epoch_plan(y_np, mode, seed=seed, epoch=epoch, batch_size=run.batch_size,
                              epoch_size=max(len(y_np), run.batch_size))
            epoch, pos = epoch + 1, 0
        idx = torch.from_numpy(plan[pos:pos + run.batch_size])
        pos += run.batch_size
        train_step(state, x[idx], y[idx], loss, schedule, hp, **inputs)
    return state.ema.eval()


def train_toy(method: str, data: ToyData, run: ToyRun, seed: int):
    """Train `method` on a fresh draw of the toy data; returns (net in eval mode, schedule, train x, y).
    A method that needs a source model (DiffRC) first trains it the pipeline's way: the plain loss on
    the classes the method names (its head classes), then starts from it with the source frozen."""
    torch.manual_seed(seed)
    x_np, y_np = data.sample(data.counts, seed)
    x, y = torch.from_numpy(x_np).view(-1, 2, 1, 1), torch.from_numpy(y_np)
    opts = _options(run.options)
    schedule = NoiseSchedule("linear", run.T, beta_1=1e-4 * 1000 / run.T, beta_T=0.02 * 1000 / run.T)
    needs = method_needs(method, opts)
    loss = make_loss(method, opts, data.counts, T=run.T)
    mode = needs.resample or "none"
    p_uncond = 0.1 if needs.conditional else 1.0
    if not needs.source_model:
        net = _train(loss, x, y, y_np, mode, run, seed, schedule, data.num_classes, p_uncond=p_uncond)
        return net, schedule, x_np, y_np
    part = next(m for m in method_parts(method) if m.source_classes is not None)
    head = part.source_classes(opts[part.section], data.counts)
    keep = np.isin(y_np, head)
    source = _train(make_loss("ddpm", opts, data.counts, T=run.T), x[torch.from_numpy(keep)],
                    y[torch.from_numpy(keep)], y_np[keep], "none", run, seed, schedule, data.num_classes,
                    p_uncond=p_uncond)
    source.requires_grad_(False)
    net = _train(loss, x, y, y_np, mode, run, seed, schedule, data.num_classes, init=source, p_uncond=p_uncond,
                 source=source)
    return net, schedule, x_np, y_np


@torch.no_grad()
def sample_toy(net, schedule, data: ToyData, run: ToyRun, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """run.per_class samples of every class, each image from its own seed (the same for every method)."""
    labels = np.repeat(np.arange(data.num_classes), run.per_class)
    seeds = [seed * 1_000_003 + i for i in range(len(labels))]
    den = CFGDenoiser(net, run.omega, net.null_label)
    x = generate(den, schedule, ImageNoise(seeds, (2, 1, 1)), torch.from_numpy(labels), sampler="ddim",
                 steps=run.sample_steps, clip_x0=False)
    return x.view(-1, 2).numpy(), labels


def energy_distance(a: np.ndarray, b: np.ndarray) -> float:
    """2E‖A−B‖ − E‖A−A′‖ − E‖B−B′‖ (Székely): 0 iff the distributions agree."""
    def mean_dist(p, q):
        return float(np.sqrt(((p[:, None] - q[None]) ** 2).sum(-1)).mean())
    return 2 * mean_dist(a, b) - mean_dist(a, a) - mean_dist(b, b)


def toy_metrics(gen: np.ndarray, labels: np.ndarray, train_x: np.ndarray, train_y: np.ndarray, data: ToyData,
                seed: int = 0) -> dict:
    """Per-class leakage, energy distance to the true class distribution, and memorisation."""
    region = data.region(gen)
    truth_x, truth_y = data.sample([400] * data.num_classes, seed + 10_000)
    out = {"leakage": [], "energy": [], "memorised": [], "spread": []}
    for c in range(data.num_classes):
        g, tr, ref = gen[labels == c], train_x[train_y == c], truth_x[truth_y == c]
        out["leakage"].append(float((region[labels == c] != c).mean()))
        out["energy"].append(energy_distance(g, ref))
        pairwise = lambda a: float(np.sqrt(((a[:, None] - a[None]) ** 2).sum(-1)).mean())  # noqa: E731
        out["spread"].append(pairwise(g) / pairwise(ref))  # diversity relative to the true class
        d_gen = np.sqrt(((g[:, None] - tr[None]) ** 2).sum(-1)).min(1)
        d_ref = np.sqrt(((ref[:, None] - tr[None]) ** 2).sum(-1)).min(1)
        out["memorised"].append(float((d_gen < np.quantile(d_ref, 0.05)).mean()))
    return out


def tail_classes(data: ToyData, k: int = 3) -> list[int]:
    """The k rarest classes."""
    return sorted(range(data.num_classes), key=lambda c: data.counts[c])[:k]


def run_method(method: str, data: ToyData, run: ToyRun, seed: int) -> dict:
    net, schedule, tx, ty = train_toy(method, data, run, seed)
    gen, labels = sample_toy(net, schedule, data, run, seed)
    m = toy_metrics(gen, labels, tx, ty, data, seed)
    tail = tail_classes(data)
    m["tail_leakage"] = float(np.mean([m["leakage"][c] for c in tail]))
    m["tail_energy"] = float(np.mean([m["energy"][c] for c in tail]))
    m["tail_memorised"] = float(np.mean([m["memorised"][c] for c in tail]))
    m["tail_spread"] = float(np.mean([m["spread"][c] for c in tail]))
    m["overlap"] = float(np.mean(m["leakage"]))  # every class's leakage: the classes' overlap
    m["_samples"] = (gen, labels)
    return m


def _run_one(args: tuple) -> dict:
    """run_method in a pool process, on one thread (see run_methods)."""
    method, data, run, seed = args
    torch.set_num_threads(1)
    return run_method(method, data, run, seed)


def run_methods(jobs: list[tuple[str, ToyRun, int]], data: ToyData, processes: int | None = None) -> list[dict]:
    """run_method for each (method, run, seed) of `jobs`, in that order, on `processes` worker
    processes of one thread each (default: one per CPU core). A toy step is a few small matmuls whose
    time goes to per-op dispatch, which a second intra-op thread does not shorten; two processes do
    (tests/test_toy_bench.py on 2 cores: 152 s -> 108-111 s). A job's result depends only on its own
    method, run and seed, not on the order or the process."""
    import multiprocessing as mp
    import os
    from concurrent.futures import ProcessPoolExecutor

    processes = min(len(jobs), processes or len(os.sched_getaffinity(0)))
    args = [(method, data, run, seed) for method, run, seed in jobs]
    if processes <= 1:
        return [run_method(*a) for a in args]
    with ProcessPoolExecutor(processes, mp_context=mp.get_context("spawn")) as pool:
        return list(pool.map(_run_one, args))
