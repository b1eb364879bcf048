"""Samplers: free functions with one signature, the step schedule chosen by the caller.

    sampler(denoiser, schedule, noise, y, timesteps, *, clip_x0=None, eta=0.0, progress=None)
        -> x_0 in [−1, 1], shape (B, C, H, W)

`denoiser(x_t, t, y) -> ε̂` is a net or a guidance wrapper (models/diffusion/guidance.py);
`noise` an `ImageNoise` (one generator per image); `timesteps` the descending integer steps to
visit (k-diffusion style: the caller owns the schedule; `SAMPLERS[name].timesteps(T, steps)` is
each sampler's default). The project's own verified DDPM and DDIM live here; DPM-Solver++ (2M),
UniPC and Euler ancestral come from diffusers' schedulers (models/diffusion/solvers.py).
`generate` is the one entry point callers use, so none of them branches on the sampler name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from models.diffusion.guidance import Denoiser, ImageNoise
from models.diffusion.schedule import NoiseSchedule


def _t(step: int, batch: int, device) -> torch.Tensor:
    return torch.full((batch,), int(step), dtype=torch.long, device=device)


def all_timesteps(T: int, steps: int | None = None) -> list[int]:
    """Every step T−1, …, 0 (ancestral DDPM; `steps` is ignored)."""
    return list(range(T - 1, -1, -1))


def ddim_timesteps(T: int, steps: int) -> list[int]:
    """Uniform stride, last step t = 0: T=1000, 100 steps -> 990, 980, ..., 0 (as OC evaluates)."""
    if not 1 <= steps <= T:
        raise ValueError(f"DDIM steps must be in [1, {T}], got {steps}")
    stride = T // steps
    return list(range(0, stride * steps, stride))[::-1]


def linspace_timesteps(T: int, steps: int) -> list[int]:
    """diffusers' "linspace" spacing: round(linspace(0, T−1, steps+1))[::-1][:-1] (999, 899, …, 100)."""
    if not 1 <= steps <= T:
        raise ValueError(f"solver steps must be in [1, {T}], got {steps}")
    return np.linspace(0, T - 1, steps + 1).round()[::-1][:-1].astype(np.int64).tolist()


def euler_timesteps(T: int, steps: int) -> list[int]:
    """Euler's spacing in diffusers: linspace(0, T−1, steps)[::-1], rounded to integer steps (999, 888, …, 0)."""
    if not 1 <= steps <= T:
        raise ValueError(f"solver steps must be in [1, {T}], got {steps}")
    return np.linspace(0, T - 1, steps).round()[::-1].astype(np.int64).tolist()


@torch.no_grad()
def ddpm_sample(denoiser: Denoiser, schedule: NoiseSchedule, noise: ImageNoise, y: torch.Tensor,
                timesteps: list[int] | None = None, *, variance: str = "fixedlarge", clip_x0: bool | None = None,
                eta: float = 0.0, progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Ancestral DDPM sampling over all T steps (Ho et al. Alg. 2).

    x_{t−1} = μ_θ(x_t, t) + σ_t z, no noise at the last step; σ_t² = β_t ("fixedlarge", what the
    papers sample with) or the posterior variance β̃_t ("fixedsmall"). With `clip_x0` the mean is
    taken from x̂_0 clipped to [−1, 1] (improved-diffusion); the DDPM port the papers use
    computes it from the unclipped x̂_0, the default.
    """
    if timesteps is not None and list(timesteps) != all_timesteps(schedule.T):
        raise ValueError("the ancestral DDPM sampler visits every step T-1..0: use ddim (eta=1) for fewer steps")
    if variance not in ("fixedlarge", "fixedsmall"):
        raise ValueError(f"unknown DDPM variance {variance!r}: use fixedlarge or fixedsmall")
    x = noise.draw()  # x_T, (B, C, H, W)
    B, dev = x.shape[0], x.device
    var = (schedule.fixedlarge_var if variance == "fixedlarge" else schedule.posterior_var).to(dev)
    for i in reversed(range(schedule.T)):
        t = _t(i, B, dev)
        eps = denoiser(x, t, y)
        if clip_x0:
            x0 = schedule.x0_from_eps(x, t, eps).clamp(-1, 1)
            mean, _ = schedule.posterior_mean_variance(x0, x, t)
        else:
            mean = schedule.mean_from_eps(x, t, eps)
        x = mean + var[i].sqrt() * noise.draw() if i > 0 else mean
        if progress is not None:
            progress(schedule.T - i)
    return x.clamp(-1, 1)


@torch.no_grad()
def ddim_sample(denoiser: Denoiser, schedule: NoiseSchedule, noise: ImageNoise, y: torch.Tensor,
                timesteps: list[int], *, eta: float = 0.0, clip_x0: bool | None = None,
                progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2021, Eq. 12) over the given descending timesteps, last step to ᾱ = 1:
    η = 0 deterministic, η = 1 the DDPM posterior variance. x̂_0 is clipped unless clip_x0=False."""
    clip_x0 = True if clip_x0 is None else clip_x0
    x = noise.draw()
    B, dev = x.shape[0], x.device
    ab = schedule.alpha_bar.to(dev)
    ts = [int(i) for i in timesteps]
    for k, i in enumerate(ts):
        t = _t(i, B, dev)
        eps = denoiser(x, t, y)
        ab_t = ab[i]
        ab_prev = ab[ts[k + 1]] if k + 1 < len(ts) else torch.ones((), device=dev)
        x0 = (x - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()
        if clip_x0:
            x0 = x0.clamp(-1, 1)
            eps = (x - ab_t.sqrt() * x0) / (1 - ab_t).sqrt()  # keep ε consistent with the clipped x̂_0
        sigma = eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)).sqrt()
        x = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0 and k + 1 < len(ts):
            x = x + sigma * noise.draw()
        if progress is not None:
            progress(k + 1)
    return x.clamp(-1, 1)


@dataclass(frozen=True)
class Sampler:
    """A sampler and its default step schedule. `stochastic`: draws noise after x_T."""

    fn: Callable
    timesteps: Callable[[int, int], list[int]]
    stochastic: bool
    source: str  # where the update rule comes from


def _solver(name: str):
    def run(denoiser, schedule, noise, y, timesteps, **options):
        from models.diffusion.solvers import solver_sample

        return solver_sample(name, denoiser, schedule, noise, y, timesteps, **options)

    run.__name__ = f"{name}_sample"
    return run


SAMPLERS: dict[str, Sampler] = {
    "ddpm": Sampler(ddpm_sample, all_timesteps, True, "own (Ho et al. Alg. 2, the papers' DDPM port)"),
    "ddim": Sampler(ddim_sample, ddim_timesteps, False, "own (Song et al. Eq. 12, OC's spacing)"),
    "dpmpp_2m": Sampler(_solver("dpmpp_2m"), linspace_timesteps, False, "diffusers DPMSolverMultistepScheduler"),
    "unipc": Sampler(_solver("unipc"), linspace_timesteps, False, "diffusers UniPCMultistepScheduler"),
    "euler_a": Sampler(_solver("euler_a"), euler_timesteps, True, "diffusers EulerAncestralDiscreteScheduler"),
}


def sampler_timesteps(name: str, T: int, steps: int) -> list[int]:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}: use one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name].timesteps(T, steps)


def network_evaluations(name: str, T: int, steps: int, omega: float) -> int:
    """Network evaluations per image: one per visited step, two with classifier-free guidance."""
    return len(sampler_timesteps(name, T, steps)) * (2 if omega else 1)


def generate(denoiser: Denoiser, schedule: NoiseSchedule, noise: ImageNoise, y: torch.Tensor, *, sampler: str,
             steps: int, eta: float = 0.0, clip_x0: bool | None = None, timesteps: list[int] | None = None,
             progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """x_0 (B, C, H, W) in [−1, 1] from the named sampler on its default schedule (or `timesteps`)."""
    ts = timesteps if timesteps is not None else sampler_timesteps(sampler, schedule.T, steps)
    if eta and sampler != "ddim":
        raise ValueError(f"eta is DDIM's noise level; the {sampler} sampler takes none (set sample.eta=0)")
    return SAMPLERS[sampler].fn(denoiser, schedule, noise, y, ts, eta=eta, clip_x0=clip_x0, progress=progress)
