"""DiffROP: probabilistic contrastive loss on posterior means (Yu et al.), Eq. 11–15, Alg. 1.

For pairs (i, j) of a batch with different labels at a shared t and ε,
    d_ij = ‖μ_θ(x_t^i, t, c_i) − μ_θ(x_t^j, t, c_j)‖²,  μ_θ = (1/√α_t)(x_t − β_t/√(1−ᾱ_t) ε_θ)
and the per-sample term is τ(t) · mean_j f(d_ij) over i's valid partners, with
    neg_l2       f = −d                     (the naive Eq. 14; the paper finds it hurts)
    hinge        f = max(0, margin − d)     (Eq. 15)
    reciprocal   f = 1 / (1 + d)            (Alg. 1)
    exponential  f = exp(−d)
    τ(t) = τ0 · exp(−(t/T) / temperature)   (the paper's temperature-controlled decay in t).
Pairs share t and ε by construction: the batch is cut into groups of `group_size` consecutive
samples that draw one (t, ε) per group (`group_draws`), and only pairs inside a group count.
‖·‖² is the per-pixel mean, as in the DDPM term (the paper leaves the scale implicit), and the
term averages over partners where Alg. 1 sums (so τ0 does not scale with the batch); the hinge
margin is one constant rather than Eq. 15's per-t D_t. Label-dropped (unconditional) samples
form no pairs: their μ_θ carries no class to separate.
"""
from __future__ import annotations

import torch

FORMS = ("neg_l2", "hinge", "reciprocal", "exponential")


def group_draws(x0: torch.Tensor, T: int, group_size: int, generator=None):
    """(t, ε) shared within consecutive groups of `group_size` samples. Shapes (B,), (B, ...)."""
    B = x0.shape[0]
    groups = -(-B // group_size)
    t = torch.randint(0, T, (groups,), generator=generator, device=x0.device).repeat_interleave(group_size)[:B]
    noise = torch.randn((groups, *x0.shape[1:]), generator=generator, device=x0.device, dtype=x0.dtype)
    return t, noise.repeat_interleave(group_size, dim=0)[:B]


def tau_of_t(t: torch.Tensor, T: int, tau0: float, temperature: float) -> torch.Tensor:
    return tau0 * torch.exp(-(t.float() / T) / temperature)


def pair_mask(y: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """(B, B) bool: i ≠ j, different labels, same t and same ε."""
    key = torch.cat([t[:, None].to(noise.dtype), noise.flatten(1)], dim=1)
    group = torch.unique(key, dim=0, return_inverse=True)[1]  # (B,) exact (t, ε) identity
    return (y[:, None] != y[None, :]) & (group[:, None] == group[None, :])


def pairwise_penalty(d: torch.Tensor, form: str, margin: float = 1.0) -> torch.Tensor:
    if form == "neg_l2":
        return -d
    if form == "hinge":
        return (margin - d).clamp(min=0)
    if form == "reciprocal":
        return 1.0 / (1.0 + d)
    if form == "exponential":
        return torch.exp(-d)
    raise ValueError(f"unknown DiffROP form {form!r}: use one of {', '.join(FORMS)}")


@torch.autocast("cuda", enabled=False)
@torch.autocast("cpu", enabled=False)
def diffrop_term(mean: torch.Tensor, y: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, *, T: int,
                 form: str = "reciprocal", tau0: float = 0.01, temperature: float = 1.0,
                 margin: float = 1.0, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample PCL term. mean: (B, ...) μ_θ(x_t, t, c) with gradient; y: (B,) labels;
    valid: (B,) bool, samples that may form pairs (the conditional ones). -> (B,)."""
    mask = pair_mask(y, t, noise)  # (B, B)
    if valid is not None:
        mask = mask & valid[:, None] & valid[None, :]
    m = mean.flatten(1).float()
    sq = (m * m).sum(1)
    d = ((sq[:, None] + sq[None, :] - 2 * m @ m.T) / m.shape[1]).clamp(min=0)  # (B, B) per-pixel mean
    f = pairwise_penalty(d, form, margin) * mask
    partners = mask.sum(1)
    per_sample = f.sum(1) / partners.clamp(min=1)
    return tau_of_t(t, T, tau0, temperature) * per_sample * (partners > 0)

