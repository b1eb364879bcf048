"""CBDM: Class-Balancing Diffusion Models (Qin et al., CVPR 2023), Eq. 4 and Alg. 1.

    L = ‖ε − ε_θ(x_t, y)‖² + (w_t / |𝒴|) Σ_{y′∈𝒴} ( ‖ε_θ(x_t, y) − sg(ε_θ(x_t, y′))‖²
                                                  + γ ‖sg(ε_θ(x_t, y)) − ε_θ(x_t, y′)‖² )

w_t = τ·t/T with τ = 1 (the released code's convention, used here) — the paper writes τ·t
with τ = 0.001 and T = 1000, the same number. y′ is drawn from a label set 𝒴: `train` (the
training label frequencies; the released code from scratch), `balanced` (uniform; the code when
fine-tuning) or `sqrt` (∝ √n_c). The regulariser is skipped for label-dropped (unconditional)
samples. ‖·‖² is the per-pixel mean, as in the DDPM term.
"""
from __future__ import annotations

import torch

from models.losses import per_sample_mse

LABEL_SETS = ("train", "balanced", "sqrt")


def label_set_probs(class_counts: torch.Tensor, label_set: str) -> torch.Tensor:
    """q_𝒴(y′) over the classes. (C,) counts -> (C,) probabilities."""
    counts = class_counts.float()
    if label_set == "train":
        w = counts
    elif label_set == "balanced":
        w = (counts > 0).float()
    elif label_set == "sqrt":
        w = counts.sqrt()
    else:
        raise ValueError(f"unknown CBDM label set {label_set!r}: use one of {', '.join(LABEL_SETS)}")
    return w / w.sum()


def draw_prime_labels(batch: int, num: int, probs: torch.Tensor, generator=None, device=None) -> torch.Tensor:
    """|𝒴| = num labels y′ per sample from q_𝒴. Shape (num, B)."""
    idx = torch.multinomial(probs.to(device), batch * num, replacement=True, generator=generator)
    return idx.reshape(num, batch)


def cbdm_terms(net, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor, eps: torch.Tensor,
               y_prime: torch.Tensor, *, tau: float, gamma: float, T: int, null_label: int,
               eps_prime: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The regulariser and commitment terms of Eq. 4, per sample.

    eps = ε_θ(x_t, y) from the main forward (with gradient); y_prime (K, B) the drawn labels;
    eps_prime (K, B, ...) optionally precomputed ε_θ(x_t, y′) (with gradient) from a batched
    forward, else computed here. Returns {"cbdm_reg": (B,), "cbdm_commit": (B,)} already
    weighted by w_t/|𝒴| (commit also by γ) and zero where y is the null label.
    """
    K, B = y_prime.shape
    if eps_prime is None:
        eps_prime = torch.stack([net(x_t, t, y_prime[k]) for k in range(K)])  # (K, B, C, H, W)
    weight = tau * t.float() / T * (y != null_label).float() / K  # (B,)
    reg = sum(per_sample_mse(eps, eps_prime[k].detach()) for k in range(K))
    commit = sum(per_sample_mse(eps.detach(), eps_prime[k]) for k in range(K))
    return {"cbdm_reg": weight * reg, "cbdm_commit": gamma * weight * commit}
