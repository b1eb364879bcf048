"""Samplers and classifier-free guidance.

Every sampler is a free function with one signature,
    sampler(denoiser, schedule, noise, y, **options) -> x_0 in [−1, 1], shape (B, C, H, W)
where `denoiser(x_t, t, y) -> ε̂` (a net, or the `CFGDenoiser` wrapper around one) and `noise`
is an `ImageNoise`: one torch.Generator per image, so an image depends only on its own seed and
label, never on the batch it was drawn in or the device.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from models.schedule import NoiseSchedule

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class CFGDenoiser:
    """ε̂ = (1 + ω)·ε(x_t, y) − ω·ε(x_t, ∅), in one batched forward of 2B (Ho & Salimans 2022,
    written as in CBDM/OC). ω = 0 is the plain conditional prediction (one forward of B)."""

    def __init__(self, net: torch.nn.Module, omega: float, null_label: int, autocast_dtype=None):
        self.net, self.omega, self.null_label = net, float(omega), int(null_label)
        self.autocast_dtype = autocast_dtype

    def _net(self, x, t, y):
        with torch.autocast(x.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            return self.net(x, t, y).float()

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.omega == 0.0:
            return self._net(x, t, y)
        null = torch.full_like(y, self.null_label)
        both = self._net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))  # (2B, C, H, W)
        cond, uncond = both.chunk(2)
        return (1.0 + self.omega) * cond - self.omega * uncond


class ImageNoise:
    """Per-image Gaussian noise streams: draw k of image i comes from seed_i's generator."""

    def __init__(self, seeds: Sequence[int], shape: Sequence[int], device: torch.device | str = "cpu"):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.shape, self.device = tuple(shape), torch.device(device)

    def __len__(self) -> int:
        return len(self.generators)

    def draw(self) -> torch.Tensor:
        """The next noise tensor of every image. Shape (B, *shape). Drawn on CPU, then moved."""
        z = torch.stack([torch.randn(self.shape, generator=g) for g in self.generators])
        return z.to(self.device, non_blocking=True)


def _t(step: int, batch: int, device) -> torch.Tensor:
    return torch.full((batch,), step, dtype=torch.long, device=device)


@torch.no_grad()
def ddpm_sample(denoiser: Denoiser, schedule: NoiseSchedule, noise: ImageNoise, y: torch.Tensor, *,
                variance: str = "fixedlarge", clip_x0: bool = False,
                progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Ancestral DDPM sampling over all T steps (Ho et al. Alg. 2).

    x_{t−1} = μ_θ(x_t, t) + σ_t z, no noise at the last step; σ_t² = β_t ("fixedlarge", what the
    papers sample with) or the posterior variance β̃_t ("fixedsmall"). With `clip_x0` the mean is
    taken from x̂_0 clipped to [−1, 1] (improved-diffusion); the DDPM port the papers use
    computes it from the unclipped x̂_0, the default.
    """
    x = noise.draw()  # x_T, (B, C, H, W)
    B, dev = x.shape[0], x.device
    if variance not in ("fixedlarge", "fixedsmall"):
        raise ValueError(f"unknown DDPM variance {variance!r}: use fixedlarge or fixedsmall")
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


def ddim_timesteps(T: int, steps: int) -> list[int]:
    """Uniform stride, last step t = 0: T=1000, 100 steps -> 990, 980, ..., 0 (as OC evaluates)."""
    if not 1 <= steps <= T:
        raise ValueError(f"DDIM steps must be in [1, {T}], got {steps}")
    stride = T // steps
    return list(range(0, stride * steps, stride))[::-1]


@torch.no_grad()
def ddim_sample(denoiser: Denoiser, schedule: NoiseSchedule, noise: ImageNoise, y: torch.Tensor, *,
                steps: int = 100, eta: float = 0.0, clip_x0: bool = True,
                progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2021, Eq. 12): η = 0 deterministic, η = 1 the DDPM posterior variance."""
    x = noise.draw()
    B, dev = x.shape[0], x.device
    ab = schedule.alpha_bar.to(dev)
    ts = ddim_timesteps(schedule.T, steps)
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


SAMPLERS = {"ddpm": ddpm_sample, "ddim": ddim_sample}
