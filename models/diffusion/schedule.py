"""The DDPM noise schedule (Ho et al. 2020): the forward process and its posteriors.

Owns no weights and no device state of its own beyond a few (T,) tables; every method takes
integer timesteps t in [0, T) as a (B,) long tensor and broadcasts over image dimensions.
Tables are computed in float64 and stored in float32, as the reference implementations do.
"""
from __future__ import annotations

import math

import torch

SCHEDULES = ("linear", "cosine")


def make_betas(kind: str, T: int, beta_1: float = 1e-4, beta_T: float = 0.02) -> torch.Tensor:
    """β_t for t = 1..T (index 0..T-1). `linear` as DDPM; `cosine` as Nichol & Dhariwal 2021."""
    if kind == "linear":
        return torch.linspace(beta_1, beta_T, T, dtype=torch.float64)
    if kind == "cosine":
        s = 0.008
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        alpha_bar = f / f[0]
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown noise schedule {kind!r}: use one of {', '.join(SCHEDULES)}")


def _extract(table: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """table[t] shaped (B, 1, 1, ...) to broadcast against a (B, ...) tensor of `ndim` dims."""
    out = table.to(t.device)[t]
    return out.reshape(t.shape[0], *([1] * (ndim - 1)))


class NoiseSchedule:
    """q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I) and the posterior q(x_{t−1} | x_t, x_0)."""

    def __init__(self, kind: str = "linear", T: int = 1000, beta_1: float = 1e-4, beta_T: float = 0.02):
        self.kind, self.T = kind, T
        betas = make_betas(kind, T, beta_1, beta_T)  # (T,) float64
        alphas = 1.0 - betas
        alpha_bar = torch.cumprod(alphas, 0)
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        post_var = betas * (1 - alpha_bar_prev) / (1 - alpha_bar)
        f32 = lambda x: x.to(torch.float32)  # noqa: E731
        self.betas = f32(betas)
        self.alphas = f32(alphas)
        self.alpha_bar = f32(alpha_bar)
        self.alpha_bar_prev = f32(alpha_bar_prev)
        self.sqrt_alpha_bar = f32(alpha_bar.sqrt())
        self.sqrt_one_minus_alpha_bar = f32((1 - alpha_bar).sqrt())
        self.sqrt_recip_alpha_bar = f32((1 / alpha_bar).sqrt())
        self.sqrt_recipm1_alpha_bar = f32((1 / alpha_bar - 1).sqrt())
        self.posterior_var = f32(post_var)
        self.posterior_coef_x0 = f32(betas * alpha_bar_prev.sqrt() / (1 - alpha_bar))
        self.posterior_coef_xt = f32((1 - alpha_bar_prev) * alphas.sqrt() / (1 - alpha_bar))
        # "fixedlarge" reverse variance (DDPM σ_t² = β_t), with the first entry set to the
        # posterior variance at t=1 for a better decoder likelihood, as the released code does.
        self.fixedlarge_var = f32(torch.cat([post_var[1:2], betas[1:]]))
        self.eps_mean_coef = f32(betas / (1 - alpha_bar).sqrt())  # β_t / √(1−ᾱ_t)
        self.sqrt_recip_alpha = f32(1 / alphas.sqrt())

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε. x0, noise: (B, C, H, W); t: (B,)."""
        return (_extract(self.sqrt_alpha_bar, t, x0.ndim) * x0
                + _extract(self.sqrt_one_minus_alpha_bar, t, x0.ndim) * noise)

    def x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x̂_0 = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t."""
        return (_extract(self.sqrt_recip_alpha_bar, t, x_t.ndim) * x_t
                - _extract(self.sqrt_recipm1_alpha_bar, t, x_t.ndim) * eps)

    def eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """ε = (x_t − √ᾱ_t x_0) / √(1−ᾱ_t), the target that makes x_0 the clean image."""
        return ((x_t - _extract(self.sqrt_alpha_bar, t, x_t.ndim) * x0)
                / _extract(self.sqrt_one_minus_alpha_bar, t, x_t.ndim))

    def posterior_mean_variance(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean and variance of q(x_{t−1} | x_t, x_0) (DDPM Eq. 6–7)."""
        mean = (_extract(self.posterior_coef_x0, t, x_t.ndim) * x0
                + _extract(self.posterior_coef_xt, t, x_t.ndim) * x_t)
        return mean, _extract(self.posterior_var, t, x_t.ndim)

    def mean_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """μ_θ(x_t, t) = (1/√α_t)(x_t − β_t/√(1−ᾱ_t) ε) (DDPM Eq. 11; DiffROP's μ_θ)."""
        return _extract(self.sqrt_recip_alpha, t, x_t.ndim) * (
            x_t - _extract(self.eps_mean_coef, t, x_t.ndim) * eps)

    def sample_t(self, batch: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """t ~ U{0, …, T−1}. Shape (B,)."""
        return torch.randint(0, self.T, (batch,), generator=generator, device=device)
