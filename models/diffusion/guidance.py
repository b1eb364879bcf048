"""Sampling-time guidance: wrappers around a denoiser that return the same type, ε̂(x_t, t, y).

Wrappers compose: `ClassifierGuidance(CFGDenoiser(net, ω), grad_fn, s, schedule)` is classifier-
free guidance with a gradient guidance on top, and every sampler takes either. Per-image noise
lives in `ImageNoise`: one torch.Generator per image, so an image depends only on its own seed
and label, never on the batch it was drawn in or the device.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

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


class NullLabelDenoiser:
    """ε(x_t, ∅) for an unconditional backbone: every label is replaced by the null label."""

    def __init__(self, net: torch.nn.Module, null_label: int, autocast_dtype=None):
        self.inner = CFGDenoiser(net, 0.0, null_label, autocast_dtype)
        self.null_label = int(null_label)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.inner(x, t, torch.full_like(y, self.null_label))


class ClassifierGuidance:
    """ε̂ ← ε̂ − √(1−ᾱ_t) · s · g(x_t, t, y) (Dhariwal & Nichol 2021, Alg. 2), the ε-form of
    classifier guidance that every sampler (DDIM, the solvers, ancestral DDPM) can use.

    `grad_fn(x_t, t, y) -> (B, ...)` is the direction that raises p(y | x_t) (for DiffRC: −∇L_PC).
    `normalise` makes it the paper's ∇̂, per image: "rms" (or True) unit RMS (‖g‖ = √D, so s is
    per pixel and does not depend on the resolution), "l2" unit norm (‖g‖ = 1: the same s is √D
    times weaker, D = C·H·W = 784 at 28×28), False / None the raw gradient.
    For the ancestral DDPM step this shifts the mean by s·β_t/√α_t·g, Eq. 13's sΣg with Σ = β_t
    up to the factor 1/√α_t ∈ [1, 1.01].
    """

    def __init__(self, inner: Denoiser, grad_fn: Callable, scale: float, alpha_bar: torch.Tensor,
                 normalise: bool | str = "rms"):
        if normalise not in (True, False, None, "rms", "l2"):
            raise ValueError(f"normalise={normalise!r}: use rms, l2 or None")
        self.inner, self.grad_fn, self.scale = inner, grad_fn, float(scale)
        self.normalise = "rms" if normalise is True else (normalise or None)
        self.alpha_bar = alpha_bar

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        eps = self.inner(x, t, y)
        if self.scale == 0.0:
            return eps
        with torch.enable_grad():
            g = self.grad_fn(x.detach(), t, y).float()
        if self.normalise:
            sq = g.flatten(1).pow(2)
            norm = (sq.mean(1) if self.normalise == "rms" else sq.sum(1)).sqrt().clamp(min=1e-12)
            g = g / norm.reshape(-1, *([1] * (g.ndim - 1)))
        ab = self.alpha_bar.to(x.device)[t].float().reshape(-1, *([1] * (x.ndim - 1)))
        return eps - (1 - ab).sqrt() * self.scale * g


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
