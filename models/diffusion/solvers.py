"""Few-step solvers from diffusers' schedulers, behind the project's sampler signature.

DPM-Solver++ (2M) (Lu et al. 2022, data prediction, the recommended solver for guided sampling),
UniPC (Zhao et al. 2023, bh2 with predict-x0) and Euler ancestral (k-diffusion's sampler as
diffusers ships it) all take any ε-network. The project keeps what the signature promises:
  * the step schedule is the caller's: after `set_timesteps(n)` resets a scheduler's state, its
    `timesteps` and `sigmas` are replaced by the caller's steps (σ_t = √((1−ᾱ_t)/ᾱ_t), the
    formula every diffusers scheduler uses), so the default spacing reproduces diffusers' own
    loop exactly and any other spacing is honoured;
  * the schedule's own β table goes in as `trained_betas`, so ᾱ is the project's;
  * per-image noise: x_T and Euler ancestral's fresh noise come from each image's generator
    (diffusers' `randn_tensor` takes a generator list);
  * x̂_0 clipping is one wrapper (`ClippedDenoiser`) for every solver: ε is replaced by the ε
    that makes the clipped x̂_0 (DDIM's rule), equal to diffusers' thresholding at max value 1.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from models.diffusion.guidance import Denoiser, ImageNoise
from models.diffusion.schedule import NoiseSchedule

SOLVERS = ("dpmpp_2m", "unipc", "euler_a")


class ClippedDenoiser:
    """ε̂ made consistent with x̂_0 clipped to [−1, 1]: ε' = (x_t − √ᾱ_t·clip(x̂_0)) / √(1−ᾱ_t)."""

    def __init__(self, inner: Denoiser, schedule: NoiseSchedule):
        self.inner, self.schedule = inner, schedule

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        eps = self.inner(x, t, y)
        x0 = self.schedule.x0_from_eps(x, t, eps).clamp(-1, 1)
        return self.schedule.eps_from_x0(x, t, x0)


def make_scheduler(name: str, schedule: NoiseSchedule):
    """A fresh diffusers scheduler for the project's β table."""
    from diffusers import DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, UniPCMultistepScheduler

    common = dict(num_train_timesteps=schedule.T, trained_betas=schedule.betas.double().numpy(),
                  prediction_type="epsilon", timestep_spacing="linspace")
    if name == "dpmpp_2m":
        return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2)
    if name == "unipc":
        return UniPCMultistepScheduler(**common, solver_order=2, predict_x0=True, solver_type="bh2")
    if name == "euler_a":
        return EulerAncestralDiscreteScheduler(**common)
    raise ValueError(f"unknown solver {name!r}: use one of {', '.join(SOLVERS)}")


def set_custom_timesteps(scheduler, timesteps: list[int], schedule: NoiseSchedule) -> None:
    """Reset the scheduler's state for len(timesteps) steps, then visit exactly `timesteps`."""
    scheduler.set_timesteps(len(timesteps))
    ab = schedule.alpha_bar.double()
    ts = torch.as_tensor(timesteps, dtype=torch.long)
    if len(ts) > 1 and not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError(f"timesteps must be strictly descending, got {timesteps}")
    sigmas = ((1 - ab[ts]) / ab[ts]).sqrt().numpy()
    scheduler.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
    scheduler.timesteps = ts.to(scheduler.timesteps.dtype)
    scheduler.num_inference_steps = len(timesteps)


@torch.no_grad()
def solver_sample(name: str, denoiser: Denoiser, schedule: NoiseSchedule, noise: ImageNoise, y: torch.Tensor,
                  timesteps: list[int], *, eta: float = 0.0, clip_x0: bool | None = None,
                  progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """x_0 (B, C, H, W) in [−1, 1] with the named diffusers solver over `timesteps` (descending).
    x̂_0 is clipped unless clip_x0=False (as DDIM here)."""
    scheduler = make_scheduler(name, schedule)
    set_custom_timesteps(scheduler, [int(t) for t in timesteps], schedule)
    if clip_x0 is None or clip_x0:
        denoiser = ClippedDenoiser(denoiser, schedule)
    x = noise.draw() * scheduler.init_noise_sigma  # (B, C, H, W); Euler works in σ-space
    step_kwargs = {"generator": noise.generators} if name == "euler_a" else {}
    B, dev = x.shape[0], x.device
    for k, t in enumerate(scheduler.timesteps):
        x_in = scheduler.scale_model_input(x, t)  # VP x_t (identity for the multistep solvers)
        eps = denoiser(x_in, torch.full((B,), int(t), dtype=torch.long, device=dev), y)
        x = scheduler.step(eps, t, x, return_dict=False, **step_kwargs)[0]
        if progress is not None:
            progress(k + 1)
    return x.clamp(-1, 1)
