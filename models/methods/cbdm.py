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

from dataclasses import dataclass

import torch

from models.methods.base import BuildContext, LossPiece, Method, Step, per_sample_mse

LABEL_SETS = ("train", "balanced", "sqrt")


@dataclass(frozen=True)
class CBDMOptions:
    """The `cbdm` config section."""

    # w_t = τ·t/T: the released code's τ = 1 (the paper's 0.001 on integer t); the Fashion-MNIST presets
    # fine-tune from the DDPM with 0.1 (τ = 1 erased the tail's conditioning there: README)
    tau: float = 1.0
    gamma: float = 0.25  # commitment weight γ: paper and code
    label_set: str = "train"  # 𝒴: train (code, from scratch) | balanced (code, fine-tuning) | sqrt
    num_labels: int = 1  # |𝒴| labels y′ per sample: 1 in the released code
    batched: bool = True  # ε(x_t, y) and ε(x_t, y′) in one (1+|𝒴|)·B forward (False: a second call)

    def validate(self) -> None:
        if self.label_set not in LABEL_SETS:
            raise ValueError(f"unknown CBDM label set {self.label_set!r}: set cbdm.label_set to one of "
                             f"{', '.join(LABEL_SETS)}")
        if self.num_labels < 1 or self.tau < 0 or self.gamma < 0:
            raise ValueError("cbdm.num_labels must be >= 1 and cbdm.tau, cbdm.gamma >= 0")


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


def cbdm_terms(eps: torch.Tensor, eps_prime: torch.Tensor, t: torch.Tensor, conditional: torch.Tensor, *,
               tau: float, gamma: float, T: int) -> dict[str, torch.Tensor]:
    """The regulariser and commitment terms of Eq. 4, per sample.

    eps = ε_θ(x_t, y) (B, ...) and eps_prime = ε_θ(x_t, y′) (K, B, ...), both with gradient;
    conditional (B,) bool. Returns {"cbdm_reg": (B,), "cbdm_commit": (B,)} weighted by
    w_t/|𝒴| (commit also by γ) and zero where the label was dropped.
    """
    K = eps_prime.shape[0]
    weight = tau * t.float() / T * conditional.float() / K  # (B,)
    reg = sum(per_sample_mse(eps, eps_prime[k].detach()) for k in range(K))
    commit = sum(per_sample_mse(eps.detach(), eps_prime[k]) for k in range(K))
    return {"cbdm_reg": weight * reg, "cbdm_commit": gamma * weight * commit}


class CBDMPiece(LossPiece):
    def __init__(self, opts: CBDMOptions, ctx: BuildContext):
        self.opts, self.T, self.batched = opts, ctx.T, opts.batched
        self.probs = label_set_probs(ctx.class_counts, opts.label_set)

    def prepare(self, step: Step) -> None:
        B = step.x0.shape[0]
        step.inputs["cbdm_y_prime"] = draw_prime_labels(B, self.opts.num_labels, self.probs, step.generator,
                                                        step.x0.device)  # (K, B)

    def forward_inputs(self, step: Step):
        K = self.opts.num_labels
        return (step.x_t.repeat(K, 1, 1, 1), step.t.repeat(K), step.inputs["cbdm_y_prime"].reshape(-1))

    def terms(self, step: Step, out: torch.Tensor | None):
        eps_prime = out.reshape(self.opts.num_labels, *step.x_t.shape)  # (K, B, C, H, W)
        terms = cbdm_terms(step.eps, eps_prime, step.t, step.conditional, tau=self.opts.tau, gamma=self.opts.gamma,
                           T=self.T)
        return terms, {}


CBDM = Method(
    name="cbdm", section="cbdm", options=CBDMOptions,
    summary="CBDM: τ·t/T·(‖ε(y) − sg ε(y′)‖² + γ‖sg ε(y) − ε(y′)‖²), y′ from a label set",
    paper="Qin et al., CVPR 2023, Eq. 4 / Alg. 1",
    build=lambda opts, ctx: CBDMPiece(opts, ctx) if opts.tau > 0 else None,  # τ = 0 is DDPM, draws included
    extra_cost=lambda opts: float(opts.num_labels),  # ε(x_t, y′) for each of the |𝒴| labels
)
