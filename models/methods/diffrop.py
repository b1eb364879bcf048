"""DiffROP: the probabilistic contrastive (PCL) loss on posterior means (Yan, Qi, Hu, Yang and
Tang, "Training Class-Imbalanced Diffusion Model Via Overlap Optimization"), Eq. 7–15, Alg. 1.

For pairs (i, j) with c_i ≠ c_j at a shared t and ε (Eq. 12),
    d_ij = ‖μ_θ(x_t^i, t, c_i) − μ_θ(x_t^j, t, c_j)‖²  summed over pixels (Alg. 1, line 11),
    μ_θ = (1/√α_t)(x_t − β_t/√(1−ᾱ_t)·ε_θ)  (Eq. 9),
and sample i's term is τ(t) · Σ_{j: c_j ≠ c_i} f(d_ij), summed over partners (Alg. 1, line 13):
    reciprocal   f = 1 / (1 + d)            (Alg. 1; the default)
    exponential  f = exp(−d)
    hinge        f = max(0, D − d)          (Eq. 15)
    neg_l2       f = −d                     (Eq. 14, the naive form the paper finds harmful)
    τ(t) = τ0 · exp(−(t/T) / temperature)   (the temperature-controlled decay in t, §4.2).
`distance: kl` uses Eq. 8's KL instead, d = ‖Δμ‖² / (2σ_t²) with σ_t² = β_t. The hinge margin D
is `margin` (constant) or, with `margin_schedule: posterior`, Eq. 15's per-step D_t taken as the
same distance between the true posterior means μ̃(x_t^i, x_0^i) and μ̃(x_t^j, x_0^j): the penalty
then acts only while the model's two conditionals overlap more than the data's, which keeps
p_θ = q the optimum (the property §4.2 asks of the hinge).

Pairs need a shared (t, ε), but the DDPM term needs one independent (t, ε) per sample. So the
PCL term runs on a *paired second view* of the batch: the same x_0 and data labels, noised with
one (t, ε) per group of `group_size` images (groups drawn at random from the generator), in the
same batched forward as the main view. Its cost is one more forward/backward of B images (as
CBDM's). An impossible pairing is an error, never a silent zero.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from models.methods.base import BuildContext, LossPiece, Method, Step

FORMS = ("reciprocal", "exponential", "hinge", "neg_l2")
DISTANCES = ("l2", "kl")
MARGINS = ("constant", "posterior")


@dataclass(frozen=True)
class DiffROPOptions:
    """The `diffrop` config section. No public code exists: every default follows the paper's Alg. 1
    except τ0 / temperature, which the paper leaves open. τ0 = 1 stays the module's (and the toy bench's)
    value; the Fashion-MNIST presets fine-tune with τ0 = 0.1, chosen by a sweep (τ0 0.1 / 0.3 / 1,
    reciprocal and exponential; README "Measured"): larger τ0 widened the conditioning gap and cost
    FID and recall. tune_spaces/diffrop.yaml searches around 0.1."""

    form: str = "reciprocal"  # Alg. 1's hinge-like reciprocal form
    tau0: float = 1.0  # τ(t = 0); not given in the paper (presets: 0.1, swept)
    temperature: float = 1.0  # τ(t) = τ0·exp(−(t/T)/temperature); not given in the paper
    distance: str = "l2"  # l2: ‖Δμ‖² over pixels (Alg. 1) | kl: ‖Δμ‖²/(2β_t) (Eq. 8)
    margin: float = 1.0  # hinge only: the constant margin D
    margin_schedule: str = "constant"  # hinge only: constant | posterior (Eq. 15's per-step D_t)
    group_size: int = 8  # images of the paired view sharing one (t, ε)

    def validate(self) -> None:
        if self.form not in FORMS:
            raise ValueError(f"unknown DiffROP form {self.form!r}: set diffrop.form to one of {', '.join(FORMS)}")
        if self.distance not in DISTANCES:
            raise ValueError(f"diffrop.distance={self.distance!r}: use l2 (Alg. 1) or kl (Eq. 8)")
        if self.margin_schedule not in MARGINS:
            raise ValueError(f"diffrop.margin_schedule={self.margin_schedule!r}: use constant or posterior")
        if self.group_size < 2 or self.temperature <= 0 or self.tau0 < 0:
            raise ValueError("diffrop.group_size >= 2, diffrop.temperature > 0 and diffrop.tau0 >= 0 are required")


def tau_of_t(t: torch.Tensor, T: int, tau0: float, temperature: float) -> torch.Tensor:
    return tau0 * torch.exp(-(t.float() / T) / temperature)


def paired_draws(x0: torch.Tensor, T: int, group_size: int, generator=None):
    """The paired view's draws: a random grouping of the batch into groups of `group_size`, one
    (t, ε) per group. Returns group (B,) long, t (B,), noise (B, ...)."""
    B = x0.shape[0]
    if B < 2:
        raise ValueError("DiffROP pairs images within a batch: use batches of at least 2 images")
    groups = -(-B // group_size)
    perm = torch.randperm(B, generator=generator, device=x0.device)
    group = torch.empty(B, dtype=torch.long, device=x0.device)
    group[perm] = torch.arange(B, device=x0.device) // group_size
    t = torch.randint(0, T, (groups,), generator=generator, device=x0.device)[group]
    noise = torch.randn((groups, *x0.shape[1:]), generator=generator, device=x0.device, dtype=x0.dtype)[group]
    return group, t, noise


def pair_mask(y: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """(B, B) bool: different labels in the same group (i ≠ j follows from the labels)."""
    return (y[:, None] != y[None, :]) & (group[:, None] == group[None, :])


def check_shared_draws(group: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> None:
    """Eq. 12 needs one (t, ε) per group: caller-given draws that differ inside a group are an error."""
    ref = (group[:, None] == group[None, :]).float().argmax(1)  # (B,) first member of each one's group
    if not (torch.equal(t, t[ref]) and torch.equal(noise, noise[ref])):
        raise ValueError("DiffROP pairs must share t and ε within a group (Eq. 12): pass draws made by "
                         "paired_draws, or none")


def pairwise_penalty(d: torch.Tensor, form: str, margin: torch.Tensor | float = 1.0) -> torch.Tensor:
    if form == "neg_l2":
        return -d
    if form == "hinge":
        return (margin - d).clamp(min=0)
    if form == "reciprocal":
        return 1.0 / (1.0 + d)
    if form == "exponential":
        return torch.exp(-d)
    raise ValueError(f"unknown DiffROP form {form!r}: use one of {', '.join(FORMS)}")


def squared_distances(m: torch.Tensor) -> torch.Tensor:
    """‖m_i − m_j‖² summed over all but the batch dimension. (B, ...) -> (B, B)."""
    m = m.flatten(1).float()
    sq = (m * m).sum(1)
    return (sq[:, None] + sq[None, :] - 2 * m @ m.T).clamp(min=0)


@torch.autocast("cuda", enabled=False)
@torch.autocast("cpu", enabled=False)
def diffrop_term(mean: torch.Tensor, y: torch.Tensor, group: torch.Tensor, t: torch.Tensor, *, T: int,
                 form: str = "reciprocal", tau0: float = 1.0, temperature: float = 1.0, scale=None,
                 margin=1.0) -> torch.Tensor:
    """Per-sample PCL term τ(t)·Σ_j f(d_ij). mean: (B, ...) μ_θ with gradient; y, group, t: (B,);
    scale: (B,) divides d (1/(2σ_t²) for Eq. 8's KL) or None; margin: float or (B, B). -> (B,)."""
    mask = pair_mask(y, group)  # (B, B)
    d = squared_distances(mean)  # (B, B)
    if scale is not None:
        d = d * scale.float()[:, None]
    f = pairwise_penalty(d, form, margin) * mask
    return tau_of_t(t, T, tau0, temperature) * f.sum(1)


class DiffROPPiece(LossPiece):
    def __init__(self, opts: DiffROPOptions, ctx: BuildContext):
        self.opts, self.T = opts, ctx.T

    def prepare(self, step: Step) -> None:
        given = step.inputs.get("diffrop_pairs")
        if given is not None:
            group, t, noise = given
            check_shared_draws(group, t, noise)
        else:
            group, t, noise = paired_draws(step.x0, self.T, self.opts.group_size, step.generator)
        step.inputs["diffrop_view"] = (group, t, noise, step.schedule.q_sample(step.x0, t, noise))

    def forward_inputs(self, step: Step):
        _, t, _, x_t = step.inputs["diffrop_view"]
        return x_t, t, step.y_true  # the view is conditional throughout: every image can pair

    def terms(self, step: Step, out: torch.Tensor | None):
        o, s = self.opts, step.schedule
        group, t, noise, x_t = step.inputs["diffrop_view"]
        mean = s.mean_from_eps(x_t.float(), t, out.float())  # (B, C, H, W), with gradient
        var = s.betas.to(t.device)[t].float()  # σ_t² = β_t ("fixedlarge", the sampler's)
        scale = 1.0 / (2.0 * var) if o.distance == "kl" else None
        margin = o.margin
        if o.form == "hinge" and o.margin_schedule == "posterior":
            with torch.no_grad():
                true_mean, _ = s.posterior_mean_variance(step.x0.float(), x_t.float(), t)
                margin = squared_distances(true_mean) * (scale[:, None] if scale is not None else 1.0)
        pcl = diffrop_term(mean, step.y_true, group, t, T=self.T, form=o.form, tau0=o.tau0,
                           temperature=o.temperature, scale=scale, margin=margin)
        pairs = pair_mask(step.y_true, group).sum(1).float()
        return {"diffrop": pcl}, {"diffrop_pairs": pairs}


DIFFROP = Method(
    name="diffrop", section="diffrop", options=DiffROPOptions,
    summary="DiffROP: τ(t)·Σ_j f(‖μ_θ(x_t^i, c_i) − μ_θ(x_t^j, c_j)‖²) over pairs of other classes at a shared (t, ε)",
    paper="Yan et al. (DiffROP), Eq. 7–15 / Alg. 1",
    build=lambda opts, ctx: DiffROPPiece(opts, ctx) if opts.tau0 > 0 else None,  # τ0 = 0 is DDPM
    extra_cost=lambda opts: 1.0,  # the paired view
)
