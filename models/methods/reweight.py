"""Reweighting: the DDPM term × w_c ∝ n_c^−p, normalised to mean 1 over the training data
(the naive inverse-frequency weighting DiffROP's Table 4 and §3.3 discuss as a baseline)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from models.methods.base import BuildContext, LossPiece, Method, Step


@dataclass(frozen=True)
class ReweightOptions:
    """The `reweight` config section."""

    power: float = 1.0  # w_c ∝ n_c^−p: 1 = inverse frequency (DiffROP's baseline), 0.5 = inverse sqrt

    def validate(self) -> None:
        if self.power < 0:
            raise ValueError(f"reweight.power={self.power} must be >= 0 (0 = plain DDPM)")


def class_weights(class_counts: torch.Tensor, power: float) -> torch.Tensor:
    """w_c = n_c^−p · N / Σ_c n_c^(1−p): the data-weighted mean of w is 1. (C,)"""
    n = class_counts.double().clamp(min=1)
    w = n.pow(-power) * n.sum() / (n * n.pow(-power)).sum()
    return w.float()


class ReweightPiece(LossPiece):
    def __init__(self, opts: ReweightOptions, ctx: BuildContext):
        self.weights = class_weights(ctx.class_counts, opts.power)

    def prepare(self, step: Step) -> None:
        w = self.weights.to(step.x0.device)[step.y_true]
        step.weight = w if step.weight is None else step.weight * w


REWEIGHT = Method(
    name="reweight", section="reweight", options=ReweightOptions,
    summary="DDPM loss × n_c^−p (normalised to mean 1)",
    paper="DiffROP Table 4 / §3.3 baseline",
    build=lambda opts, ctx: ReweightPiece(opts, ctx) if opts.power > 0 else None,
)
