"""Diffusion training losses, one function per method, one signature:

    loss(net, x0, y, schedule, *, t=None, noise=None, generator=None, y_true=None)
        -> {"loss": (B,) per-sample objective, <other named (B,) terms for logging>}

y are the labels fed to the net (the null label where dropped for guidance), y_true the data
labels. Methods and their composition live in models/methods.py.

Every random draw (t, ε, and each method's own) is either passed in or drawn from `generator`,
so the same inputs give the same loss and a test can check it against the paper's equation.
The training step averages "loss" over the batch and logs the other terms.
"""
from __future__ import annotations

import torch

from models.schedule import NoiseSchedule


def draw_t_noise(x0: torch.Tensor, schedule: NoiseSchedule, t=None, noise=None, generator=None):
    """The (t, ε) pair of a DDPM step: passed in, or t ~ U{0..T−1} and ε ~ N(0, I) from `generator`."""
    if t is None:
        t = torch.randint(0, schedule.T, (x0.shape[0],), generator=generator, device=x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return t, noise


def per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """‖a − b‖² / D per sample. (B, ...) -> (B,)."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


def ddpm_loss(net, x0: torch.Tensor, y: torch.Tensor, schedule: NoiseSchedule, *,
              t=None, noise=None, generator=None, y_true=None) -> dict[str, torch.Tensor]:
    """L_simple = ‖ε − ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, t, y)‖² (Ho et al. 2020, Eq. 14).

    The reference every method reduces to; `y_true` (the labels before dropout) is unused here.
    """
    t, noise = draw_t_noise(x0, schedule, t, noise, generator)
    x_t = schedule.q_sample(x0, t, noise)  # (B, C, H, W)
    eps = net(x_t, t, y)
    mse = per_sample_mse(eps, noise)
    return {"loss": mse, "mse": mse.detach()}
