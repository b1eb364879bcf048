"""Classifier-side long-tail baselines: the losses, the re-weighting and the LDAM-DRW schedule.

Recipes (what the classify stage trains on the real LT split, and on real + synthetic):
  ce        cross-entropy, instance-balanced sampling
  rs        cross-entropy on a class-balanced resampled stream (every class equally likely)
  la        logit-adjusted loss, Menon et al. 2021 eq. (10): ℓ = −log softmax(f(x) + τ·log π)_y,
            prediction argmax f(x)
  ldam_drw  LDAM, Cao et al. 2019 eq. (13): ℓ = −log softmax(s·(z − Δ·1_y))_y with
            Δ_j = C / n_j^{1/4} (C so that max Δ = max_m) on a cosine classifier; deferred
            re-weighting from the DRW epoch with class-balanced weights (1−β)/(1−β^{n_j})
            (Cui et al. 2019), normalised to sum to the number of classes

Losses take logits (B, K) and labels (B,) and return the batch loss; with `class_weight` the
mean is weighted as torch's cross_entropy does (Σ w_{y_i} ℓ_i / Σ w_{y_i}).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Recipe:
    loss: str  # ce | logit_adjusted | ldam
    resample: str  # a models/resampling.py mode for the training stream
    drw: bool  # deferred re-weighting from the DRW epoch
    normed_head: bool  # LDAM's cosine classifier


RECIPES: dict[str, Recipe] = {
    "ce": Recipe("ce", "none", False, False),
    "rs": Recipe("ce", "balanced", False, False),
    "la": Recipe("logit_adjusted", "none", False, False),
    "ldam_drw": Recipe("ldam", "none", True, True),
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown classifier recipe {name!r}: use one of {', '.join(RECIPES)}")
    return RECIPES[name]


def cross_entropy_loss(logits: torch.Tensor, y: torch.Tensor, class_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    return F.cross_entropy(logits.float(), y, weight=class_weight)


def logit_adjusted_loss(logits: torch.Tensor, y: torch.Tensor, log_prior: torch.Tensor, tau: float = 1.0,
                        class_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Menon et al. eq. (10): CE of f(x) + τ·log π. log_prior: (K,) log class frequencies."""
    return F.cross_entropy(logits.float() + tau * log_prior, y, weight=class_weight)


def ldam_margins(counts: Sequence[int], max_m: float = 0.5) -> torch.Tensor:
    """Δ_j ∝ n_j^{-1/4}, scaled so the largest margin (the rarest class) is max_m. Shape (K,)."""
    m = 1.0 / np.sqrt(np.sqrt(np.asarray(counts, dtype=np.float64)))
    return torch.tensor(m * (max_m / m.max()), dtype=torch.float32)


def ldam_loss(logits: torch.Tensor, y: torch.Tensor, margins: torch.Tensor, s: float = 30.0,
              class_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Cao et al. eq. (13): subtract the label's margin from its logit, scale by s, then CE.

    logits: (B, K) cosine logits in [−1, 1]; margins: (K,).
    """
    z = logits.float() - F.one_hot(y, logits.shape[1]).float() * margins[y].unsqueeze(1)  # (B, K)
    return F.cross_entropy(s * z, y, weight=class_weight)


def class_balanced_weights(counts: Sequence[int], beta: float) -> torch.Tensor:
    """Cui et al. 2019: w_j = (1−β)/(1−β^{n_j}), normalised so Σ_j w_j = K. β = 0 gives all ones."""
    n = np.asarray(counts, dtype=np.float64)
    w = (1.0 - beta) / (1.0 - np.power(beta, n))
    return torch.tensor(w / w.sum() * len(n), dtype=torch.float32)


@dataclass(frozen=True)
class EpochSchedule:
    """LDAM-DRW's per-epoch learning rate and DRW switch, scaled to `epochs` (`classify.lr_schedule: step`,
    the paper's and the default). `scaled(..., kind="cosine")` gives a `CosineSchedule` instead."""

    epochs: int
    lr: float
    warmup_epochs: int
    decay_epochs: tuple
    drw_epoch: int

    @classmethod
    def scaled(cls, epochs: int, lr: float, warmup_epochs: Optional[int] = None,
               decay_epochs: Optional[Sequence[int]] = None, drw_epoch: Optional[int] = None,
               kind: str = "step") -> "EpochSchedule":
        """Milestones left None scale from the 200-epoch recipe (5 warm-up, decay at 160 and 180);
        `kind` names the schedule class (LR_SCHEDULES)."""
        if kind not in LR_SCHEDULES:
            raise ValueError(f"unknown classifier lr schedule {kind!r}: use one of {', '.join(LR_SCHEDULES)}")
        if warmup_epochs is None:
            warmup_epochs = max(1, round(5 * epochs / 200))
        if decay_epochs is None:
            decay_epochs = (round(160 * epochs / 200), round(180 * epochs / 200))
        decay_epochs = tuple(int(e) for e in decay_epochs)
        return LR_SCHEDULES[kind](epochs, lr, int(warmup_epochs), decay_epochs,
                                  int(decay_epochs[0] if drw_epoch is None else drw_epoch))

    def lr_at(self, epoch: int, step: int = 0, steps_per_epoch: int = 1) -> float:
        """Per epoch, as the reference code (the iteration is ignored): epoch is 0-based, e = epoch + 1,
        warm-up lr·e/W for e <= W, then ×0.01 after the first decay epoch and ×0.0001 after the second."""
        e = epoch + 1
        if e <= self.warmup_epochs:
            return self.lr * e / self.warmup_epochs
        passed = sum(e > milestone for milestone in self.decay_epochs)
        return self.lr * 0.01 ** passed

    def drw_active(self, epoch: int) -> bool:
        return epoch >= self.drw_epoch


class CosineSchedule(EpochSchedule):
    """A per-iteration linear warm-up over the warm-up epochs, then a cosine to 0 at the last iteration
    (the decay epochs are not used; DRW still switches on at `drw_epoch`). A short run needs it: scaled
    to 3 epochs the step schedule is lr 0.1, 0.1, 0.001, and the last epoch cannot undo where the
    lr-0.1 phase ended (benchmarks/bench_classify_schedule.py)."""

    def lr_at(self, epoch: int, step: int = 0, steps_per_epoch: int = 1) -> float:
        """Iteration `step` (0-based) of 0-based `epoch`, an epoch being S = `steps_per_epoch` iterations:
        with t = epoch·S + step, T = epochs·S, W = warmup_epochs·S: lr·(t + 1)/W for t < W, then
        lr·(1 + cos(π·(t − W)/(T − W)))/2, so the last iteration's lr is lr·(1 + cos(π·(T−W−1)/(T−W)))/2 ≈ 0."""
        s = max(1, int(steps_per_epoch))
        t, total, warm = epoch * s + min(int(step), s - 1), self.epochs * s, self.warmup_epochs * s
        if t < warm:
            return self.lr * (t + 1) / warm
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (t - warm) / max(1, total - warm))))


LR_SCHEDULES = {"step": EpochSchedule, "cosine": CosineSchedule}


class ClassifierLoss:
    """One recipe's loss with its class statistics fixed: `loss(logits, y, epoch)`."""

    def __init__(self, recipe: Recipe, counts: Sequence[int], schedule: EpochSchedule, *, la_tau: float = 1.0,
                 ldam_max_m: float = 0.5, ldam_s: float = 30.0, drw_beta: float = 0.9999):
        counts = np.asarray(counts, dtype=np.float64)
        if (counts <= 0).any():
            raise ValueError("every class needs at least one training image for the LT losses")
        self.recipe, self.schedule = recipe, schedule
        self.log_prior = torch.tensor(np.log(counts / counts.sum()), dtype=torch.float32)  # (K,)
        self.margins = ldam_margins(counts, ldam_max_m)
        self.drw_weights = class_balanced_weights(counts, drw_beta)
        self.la_tau, self.ldam_s = la_tau, ldam_s

    def __call__(self, logits: torch.Tensor, y: torch.Tensor, epoch: int) -> torch.Tensor:
        device = logits.device
        weight = self.drw_weights.to(device) if self.recipe.drw and self.schedule.drw_active(epoch) else None
        if self.recipe.loss == "ce":
            return cross_entropy_loss(logits, y, weight)
        if self.recipe.loss == "logit_adjusted":
            return logit_adjusted_loss(logits, y, self.log_prior.to(device), self.la_tau, weight)
        if self.recipe.loss == "ldam":
            return ldam_loss(logits, y, self.margins.to(device), self.ldam_s, weight)
        raise ValueError(f"unknown classifier loss {self.recipe.loss!r}")
