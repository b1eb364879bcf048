"""OC: oriented calibration of the denoising target (Zhang et al., ICLR 2024), Eq. 6–8, Alg. 1.

For each noisy x_t^(i), a clean target x_0^(z) is drawn from the batch (itself included) with
    p_sel(z) ∝ q(y_z)^β · exp(−‖x_t^(i) − √ᾱ_t x_0^(z)‖² / (2(1 − ᾱ_t)))
(the Gaussian kernel of q(x_t | x_0^(z)); β = 0 is the paper's plain selection, β ≠ 0 its
β-weighted Eq. 7). The draw is accepted by mode:
    t2h   q(y_z) ≥ q(y_i): a noisy tail sample may take a clean head target, never the reverse;
    h2t   q(y_z) ≤ q(y_i);
    full  always;
and only at steps t < cutoff (the paper's cutoff step; cutoff = 0 disables transfer). The new
target is ε_z = (x_t − √ᾱ_t x_0^(z)) / √(1 − ᾱ_t); the label fed to the net stays y_i. No
gradient flows through any of this. ‖·‖² here is the full sum over pixels: it is a likelihood,
computed in fp32 even inside a bf16 autocast region (its terms cancel: bf16 would move the
logits by O(1) exactly where transfers happen).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from models.methods.base import BuildContext, LossPiece, Method, Needs, Step

OC_MODES = ("t2h", "h2t", "full")


@dataclass(frozen=True)
class OCOptions:
    """The `oc` config section, shared by t2h / h2t / oc_full (the mode is the method's name)."""

    beta: float = 0.0  # q(y)^β-weighted selection, Eq. 7: the paper's knob (0 = the released plain selection)
    cutoff: int = 1000  # transfer only for t < cutoff: the paper's cutoff step (1000 = always, the code)
    batch_resample: bool = False  # the paper's batch re-sample: class-balanced batches (balanced_batch stream)

    def validate(self) -> None:
        if self.cutoff < 0:
            raise ValueError(f"oc.cutoff={self.cutoff} must be >= 0 (0 = never transfer, T = always)")


@torch.no_grad()
@torch.autocast("cuda", enabled=False)
@torch.autocast("cpu", enabled=False)
def selection_logits(x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, alpha_bar: torch.Tensor,
                     log_freq: torch.Tensor | None = None, beta: float = 0.0) -> torch.Tensor:
    """log p_sel up to a per-row constant. x0, x_t: (B, ...); t: (B,). Returns (B_i, B_z)."""
    ab = alpha_bar.to(x_t.device)[t].float()  # (B,)
    xt = x_t.flatten(1).float()  # (B, D)
    x0f = x0.flatten(1).float()
    # ‖x_t^i − √ᾱ_i x_0^z‖² = ‖x_t^i‖² − 2√ᾱ_i <x_t^i, x_0^z> + ᾱ_i ‖x_0^z‖²
    dist = ((xt * xt).sum(1, keepdim=True) - 2 * ab.sqrt()[:, None] * (xt @ x0f.T)
            + ab[:, None] * (x0f * x0f).sum(1)[None, :])  # (B, B)
    logits = -dist.clamp(min=0) / (2 * (1 - ab))[:, None]
    if beta and log_freq is not None:
        logits = logits + beta * log_freq[None, :]
    return logits


@torch.no_grad()
def oc_target(x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, y: torch.Tensor,
              class_freq: torch.Tensor, alpha_bar: torch.Tensor, *, mode: str = "t2h", beta: float = 0.0,
              cutoff: int = 1000, generator: torch.Generator | None = None):
    """The calibrated targets. y: (B,) true labels; class_freq: (C,) q(y).

    Returns (target (B, ...), source (B,) long: the batch index whose clean image is the target
    (i itself when nothing moved), transfer_prob (B,): Σ_{z≠i} p_sel(z), the paper's Fig. 7
    quantity, before gating and cutoff).
    """
    if mode not in OC_MODES:
        raise ValueError(f"unknown OC mode {mode!r}: use one of {', '.join(OC_MODES)}")
    freq = class_freq.to(x_t.device).float()[y]  # (B,) q(y_i) per sample
    log_freq = class_freq.to(x_t.device).float().clamp(min=1e-12).log()[y]
    logits = selection_logits(x0, x_t, t, alpha_bar, log_freq, beta)  # (B, B)
    probs = logits.softmax(dim=1)
    transfer_prob = 1.0 - probs.diagonal()
    z = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (B,)
    if mode == "t2h":
        allowed = freq[z] >= freq
    elif mode == "h2t":
        allowed = freq[z] <= freq
    else:
        allowed = torch.ones_like(freq, dtype=torch.bool)
    accept = allowed & (t < cutoff)
    own = torch.arange(len(z), device=z.device)
    z = torch.where(accept, z, own)
    moved = z != own
    ab = alpha_bar.to(x_t.device)[t].float().reshape(-1, *([1] * (x_t.ndim - 1)))
    new_eps = (x_t.float() - ab.sqrt() * x0[z].float()) / (1 - ab).sqrt()
    target = torch.where(moved.reshape(-1, *([1] * (x_t.ndim - 1))), new_eps.to(noise.dtype), noise)
    return target, z, transfer_prob


@torch.no_grad()
def transfer_probability_curve(x0: torch.Tensor, alpha_bar: torch.Tensor, timesteps, *, repeats: int = 4,
                               generator: torch.Generator | None = None) -> list[float]:
    """Mean Σ_{z≠i} p_sel(z) within a batch of real images at each t (the OC paper's Fig. 7)."""
    curve = []
    for step in timesteps:
        vals = []
        for _ in range(repeats):
            t = torch.full((x0.shape[0],), int(step), dtype=torch.long, device=x0.device)
            noise = torch.randn(x0.shape, generator=generator, device=x0.device)
            ab = alpha_bar.to(x0.device)[t].reshape(-1, *([1] * (x0.ndim - 1)))
            x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
            probs = selection_logits(x0, x_t, t, alpha_bar).softmax(dim=1)
            vals.append((1.0 - probs.diagonal()).mean().item())
        curve.append(sum(vals) / len(vals))
    return curve


class OCPiece(LossPiece):
    """Moves the DDPM term's target (Eq. 6–8); logs the moved fraction and the transfer probability."""

    def __init__(self, mode: str, opts: OCOptions, ctx: BuildContext):
        self.mode, self.opts = mode, opts
        counts = ctx.class_counts.float()
        self.freq = counts / counts.sum()

    def prepare(self, step: Step) -> None:
        target, source, transfer = oc_target(step.x0, step.x_t, step.t, step.noise, step.y_true, self.freq,
                                             step.schedule.alpha_bar, mode=self.mode, beta=self.opts.beta,
                                             cutoff=self.opts.cutoff, generator=step.generator)
        step.target = target
        moved = source != torch.arange(len(source), device=source.device)
        step.logs.update(oc_moved=moved.float(), oc_transfer_prob=transfer)


def _needs(opts: OCOptions) -> Needs:
    return Needs(resample="balanced_batch" if opts.batch_resample else None, diagnostics=("oc_transfer",))


def oc_diagnostic(name: str, opts: OCOptions, x0: torch.Tensor, schedule, generator=None):
    """The transfer probability against t on a batch of the run's stream (the paper's Fig. 7)."""
    ts = list(range(0, schedule.T, max(1, schedule.T // 40)))
    curve = transfer_probability_curve(x0, schedule.alpha_bar, ts, generator=generator)
    return {"x": ts, "y": curve, "xlabel": "diffusion step t", "ylabel": "P(target moves to another sample)",
            "marker_x": opts.cutoff, "marker_label": f"cutoff {opts.cutoff}"}


def _oc(name: str, mode: str, gate: str) -> Method:
    return Method(name=name, section="oc", options=OCOptions,
                  summary=f"OC target transfer, {gate}: the denoising target moves to another batch image's x_0",
                  paper="Zhang et al., ICLR 2024, Eq. 6–8 / Alg. 1",
                  build=lambda opts, ctx: OCPiece(mode, opts, ctx) if opts.cutoff > 0 else None,  # cutoff 0 = DDPM
                  needs=_needs, diagnostic=oc_diagnostic)


T2H = _oc("t2h", "t2h", "tail-to-head (a tail sample may take a head target)")
H2T = _oc("h2t", "h2t", "head-to-tail")
OC_FULL = _oc("oc_full", "full", "in both directions")
