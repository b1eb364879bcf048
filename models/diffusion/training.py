"""One optimisation step of a diffusion model, and the state a checkpoint needs to resume it.

`train_step` = label dropout -> loss -> backward -> grad-norm clip -> Adam with linear lr
warm-up -> EMA. It never synchronises with the host: it returns detached on-device tensors
that the caller accumulates and reads only when it logs.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from models.diffusion.schedule import NoiseSchedule


@dataclass(frozen=True)
class TrainHParams:
    lr: float = 2e-4
    warmup_steps: int = 5000
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    ema_warmup: bool = False  # decay_k = min(decay, (1 + k) / (10 + k)); off = the papers' fixed decay
    p_uncond: float = 0.1  # label dropout probability for classifier-free guidance
    cond_drop: str = "sample"  # "sample": per-sample with the null class; "batch": one coin per batch
    bf16: bool = False  # autocast the forward/loss in bfloat16
    channels_last: bool = False
    lr_schedule: str = "constant"  # constant (the papers) | cosine | linear: decay to 0 over the last decay_fraction
    decay_fraction: float = 0.3
    total_steps: int = 0  # the run's last step (the decay's end); 0 = no decay


@dataclass
class TrainState:
    net: nn.Module
    ema: nn.Module
    opt: torch.optim.Optimizer
    generator: torch.Generator  # t, ε, label dropout and method draws
    step: int = 0


def make_train_state(net: nn.Module, hp: TrainHParams, seed: int, device: torch.device | str = "cpu") -> TrainState:
    device = torch.device(device)
    net = net.to(device)
    if hp.channels_last:
        net = net.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    fused = device.type == "cuda"
    opt = torch.optim.Adam(net.parameters(), lr=hp.lr, fused=fused, foreach=None if fused else True)
    gen = torch.Generator(device=device).manual_seed(int(seed))
    return TrainState(net=net, ema=ema, opt=opt, generator=gen)


def drop_labels(y: torch.Tensor, p: float, mode: str, null_label: int, generator: torch.Generator) -> torch.Tensor:
    """Replace labels by `null_label` with probability p: per sample, or all together ("batch")."""
    if p <= 0:
        return y
    n = y.shape[0] if mode == "sample" else 1
    drop = torch.rand(n, generator=generator, device=y.device) < p
    return torch.where(drop, torch.full_like(y, null_label), y)


LR_SCHEDULES = ("constant", "cosine", "linear")


def lr_at(step: int, hp: TrainHParams) -> float:
    """Linear warm-up to hp.lr over hp.warmup_steps (step 0 already takes a small step), then constant
    (the papers' schedule) or, with `lr_schedule` cosine / linear, a decay to 0 over the last
    `decay_fraction` of `total_steps` (a short run's weights settle instead of stopping mid-flight)."""
    lr = hp.lr if hp.warmup_steps <= 0 else hp.lr * min(1.0, (step + 1) / hp.warmup_steps)
    if hp.lr_schedule == "constant" or hp.total_steps <= 0:
        return lr
    start = int(round(hp.total_steps * (1 - hp.decay_fraction)))
    if step < start:
        return lr
    frac = min(1.0, (step - start) / max(1, hp.total_steps - start))
    return lr * (1 - frac) if hp.lr_schedule == "linear" else lr * 0.5 * (1 + math.cos(math.pi * frac))


def ema_decay_at(step: int, hp: TrainHParams) -> float:
    return min(hp.ema_decay, (1 + step) / (10 + step)) if hp.ema_warmup else hp.ema_decay


@torch.no_grad()
def ema_update(ema: nn.Module, net: nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1 − decay)·net, one fused foreach op over all parameters."""
    ema_p = [p for p in ema.parameters()]
    net_p = [p.detach() for p in net.parameters()]
    torch._foreach_lerp_(ema_p, net_p, 1.0 - decay)
    for be, bn in zip(ema.buffers(), net.buffers()):
        be.copy_(bn)


def train_step(state: TrainState, x0: torch.Tensor, y: torch.Tensor, loss_fn: Callable,
               schedule: NoiseSchedule, hp: TrainHParams, **loss_options) -> dict[str, torch.Tensor]:
    """One step on a batch x0 (B, C, H, W) in [−1, 1] with labels y (B,). Returns detached means."""
    net, opt = state.net, state.opt
    net.train()
    if hp.channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    null = net.module.null_label if hasattr(net, "module") else net.null_label
    y_in = drop_labels(y, hp.p_uncond, hp.cond_drop, null, state.generator)
    with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=hp.bf16):
        terms = loss_fn(net, x0, y_in, schedule, generator=state.generator, y_true=y, **loss_options)
    loss = terms["loss"].float().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), hp.grad_clip, foreach=True)
    lr = lr_at(state.step, hp)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()
    ema_update(state.ema, net.module if hasattr(net, "module") else net, ema_decay_at(state.step, hp))
    state.step += 1
    out = {name: value.detach().float().mean() for name, value in terms.items() if name != "loss"}
    out["loss"] = loss.detach()
    out["grad_norm"] = grad_norm.detach()
    return out


# ---------------------------------------------------------------------------------------------
# Checkpoint contents: plain tensors, numbers and strings, loadable with weights_only=True.


def checkpoint_state(state: TrainState, config: dict, **extra) -> dict:
    net = state.net.module if hasattr(state.net, "module") else state.net
    rng = {"torch_cpu": torch.get_rng_state(), "generator": state.generator.get_state()}
    if torch.cuda.is_available():
        rng["torch_cuda"] = torch.cuda.get_rng_state_all()
    return {
        "net": net.state_dict(),
        "ema": state.ema.state_dict(),
        "opt": state.opt.state_dict(),
        "step": state.step,
        "rng": rng,
        "config": json.dumps(config, sort_keys=True, default=str),
        **extra,
    }


def restore_state(state: TrainState, ckpt: dict) -> None:
    net = state.net.module if hasattr(state.net, "module") else state.net
    net.load_state_dict(ckpt["net"])
    state.ema.load_state_dict(ckpt["ema"])
    state.opt.load_state_dict(ckpt["opt"])
    state.step = int(ckpt["step"])
    torch.set_rng_state(ckpt["rng"]["torch_cpu"])
    state.generator.set_state(ckpt["rng"]["generator"])
    if "torch_cuda" in ckpt["rng"] and torch.cuda.is_available():
        for device, rng_state in enumerate(ckpt["rng"]["torch_cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(rng_state, device)


def hparams_dict(hp: TrainHParams) -> dict:
    return asdict(hp)
