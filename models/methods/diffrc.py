"""DiffRC (Unlocking the Power of Diffusion Probabilistic Models for Long-tailed Recognition via
Data Synthesis), §3.2–3.3. No public code exists: this follows the paper; every choice it leaves
open is marked "(open)" below.

1. Source model (Eq. 5): the plain ε-loss on the head classes only, D_pre = the H head classes
   (default: the "many" third by count; or every class with at least `head_threshold` images).
2. Target model: initialised from the source, trained on all data with L = L_base + λ·L_pair
   (Eq. 10). For each medium/tail class k in the batch (k ∉ head, Eq. 9) and each of its samples i,
   with x̃_0 = (x_t − √(1−ᾱ_t)·z_θ(x_t, t)) / √ᾱ_t (Eq. 6) from the same x_t and t in the frozen
   source and in the target:
       p_i^sou = softmax_{j≠i} s(x̃0_sou^{k,i}, x̃0_sou^{k,j})                         (Eq. 7)
       p_i^tar = softmax_{j≠i} s(x̃0_tar^{k,i}, x̃0_tar^{k,j}) / (1 + γ^{N_k})           (Eq. 8)
       L_pair  = Σ_k Σ_i KL(p_i^tar ‖ p_i^sou)                                          (Eq. 9)
   s = cosine similarity of the flattened x̃_0; N_k the class's training count.
   `pair_reduction` (open: L_base is a batch mean, Eq. 9 a sum): "mean" (default) averages the KL
   over the batch's contributing samples, "sum" is Eq. 9 as printed (per-sample terms scaled so the
   step's batch mean is that sum). Measured on Fashion-MNIST-LT (batch 64, 42 contributing samples,
   λ = 0.5, grad clip 1.0): with "sum" the step's gradient norm was 4–27 against the DDPM loss's
   0.1–0.2, so the clipped step followed the pair term almost alone, the ε-loss stayed at 0.05–0.06
   (DDPM: 0.036) and the target lost even the head classes (FID 40.0 against DDPM's 4.8; README). It needs two
   or more images of a class in a batch: DiffRC trains on OC's balanced-batch stream (every batch
   holds batch_size // C images of each class). The source is frozen: no gradient, eval mode, its
   forward in the same autocast as the target's.
3. Prototype-contrastive guidance (Eq. 11–13): a time-conditioned feature network f(x_t, t) (the
   UNet's encoder half, as Dhariwal & Nichol's noisy classifier) trained on noisy LT images with
       L_PC = −log[ π_k exp(f·c_k/τ) / Σ_j π_j exp(f·c_j/τ) ]   (Eq. 12, π_k = N_k/N, τ = 0.07)
   and prototypes c_k ← m·c_k + (1 − m)·f(x_t^{k,i}), normalised (Eq. 11, m = 0.999). Sampling adds
   s·∇̂ to the step (Eq. 13; s = 0.2, the paper's start). Eq. 13 prints +∇L_PC, but L_PC *falls* as
   x_t moves toward class y's prototype, so the direction that helps class y is −∇L_PC: that sign
   is used (tests check the guidance raises f's p(y | x_t)). It enters every sampler through the
   ε-form of classifier guidance (models/diffusion/guidance.py, Dhariwal & Nichol Alg. 2); (open)
   the paper's "s changes adaptively during sampling" is not specified, so s is constant.
4. Conditioning: the paper's networks are unconditional (the class enters only through the
   guidance, Fig. 1): `diffrc`. `diffrc_cfg` is the conditional backbone with CFG + the guidance.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from models.diffusion.unet import ResBlock, timestep_embedding
from models.evaluation.metrics import class_groups
from models.methods.base import BuildContext, LossPiece, Method, Needs, Step


@dataclass(frozen=True)
class DiffRCOptions:
    """The `diffrc` config section (shared by diffrc and diffrc_cfg)."""

    head: str = "many"  # (open) H: the "many" third of the classes by count | "threshold"
    head_threshold: Optional[int] = None  # head: threshold -> classes with at least this many images
    lam: float = 0.5  # λ of Eq. 10 (the paper's best, Fig. 3a)
    gamma: float = 0.1  # γ of Eq. 8 (as Cui et al.)
    guidance_scale: float = 0.2  # s of Eq. 13: the paper's start (best 0.6 on ImageNet-LT, Fig. 3b)
    prototype_momentum: float = 0.999  # m of Eq. 11 (MoPro)
    temperature: float = 0.07  # τ of Eq. 12
    feature_dim: int = 128  # (open) f's output size
    feature_ch: int = 32  # (open) width of f, the UNet encoder half
    feature_steps: int = 1000  # (open) training steps of f
    feature_lr: float = 1e-3  # (open)
    source_steps: Optional[int] = None  # the source model's steps (None = train.steps)
    pair_reduction: str = "mean"  # (open) mean over the contributing samples | sum (Eq. 9 as printed: 42× the mean here at B = 64)

    def trained_fields(self, kind: str) -> tuple[str, ...]:
        """The fields that shape a trained model of `kind` (its run key; pipeline/stages/s2_train.py):
        a λ sweep or a new default s retrains neither the feature network nor the target. The source
        model is a plain DDPM on the head classes (its key holds the classes, not this section)."""
        if kind == "features":  # f and its prototypes (Eq. 11-12); feature_steps is a step count
            return ("prototype_momentum", "temperature", "feature_dim", "feature_ch", "feature_lr")
        return ("head", "head_threshold", "lam", "gamma", "pair_reduction")  # the target's loss (Eq. 7-10)

    def validate(self) -> None:
        if self.pair_reduction not in ("mean", "sum"):
            raise ValueError(f"diffrc.pair_reduction={self.pair_reduction!r}: use mean (over the contributing "
                             "samples) or sum (Eq. 9 as printed)")
        if self.head not in ("many", "threshold"):
            raise ValueError(f"diffrc.head={self.head!r}: use many (the top third by count) or threshold")
        if self.head == "threshold" and not self.head_threshold:
            raise ValueError("diffrc.head=threshold needs diffrc.head_threshold (images a head class has at least)")
        if not (0 <= self.lam and 0 < self.gamma < 1 and 0 <= self.prototype_momentum < 1 and self.temperature > 0
                and self.guidance_scale >= 0 and self.feature_steps >= 1):
            raise ValueError("diffrc: lam >= 0, 0 < gamma < 1, 0 <= prototype_momentum < 1, temperature > 0, "
                             "guidance_scale >= 0 and feature_steps >= 1 are required")


def head_classes(opts: DiffRCOptions, counts) -> list[int]:
    """The H head classes of D_pre (Eq. 5)."""
    counts = [int(c) for c in counts]
    if opts.head == "threshold":
        return [c for c, n in enumerate(counts) if n >= opts.head_threshold]
    return class_groups(counts, "thirds")["many"]


def predicted_x0(schedule, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x̃_0 of Eq. 6, flattened to (B, D) in fp32."""
    return schedule.x0_from_eps(x_t.float(), t, eps.float()).flatten(1)


def pair_members(labels: torch.Tensor, head: list[int]) -> torch.Tensor:
    """The samples L_pair sums over: not a head class, and at least one other sample of the class. (B,) bool."""
    same = labels[:, None] == labels[None, :]
    head_mask = torch.isin(labels, torch.as_tensor(head, dtype=labels.dtype, device=labels.device))
    return (same.sum(1) >= 2) & ~head_mask


@torch.autocast("cuda", enabled=False)
@torch.autocast("cpu", enabled=False)
def pair_kl(x0_tar: torch.Tensor, x0_sou: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor,
            head: list[int], gamma: float) -> torch.Tensor:
    """Per-sample KL(p_i^tar ‖ p_i^sou) of Eq. 7–9 (0 for head classes and singletons). (B,)."""
    out = torch.zeros(len(labels), device=x0_tar.device)
    tar, sou = F.normalize(x0_tar.float(), dim=1), F.normalize(x0_sou.float(), dim=1)
    for k in labels.unique().tolist():
        idx = (labels == k).nonzero().flatten()
        if k in head or len(idx) < 2:
            continue
        n = len(idx)
        off = ~torch.eye(n, dtype=torch.bool, device=idx.device)  # j ≠ i
        s_tar = (tar[idx] @ tar[idx].T)[off].view(n, n - 1) / (1.0 + gamma ** float(counts[k]))  # (n, n−1)
        s_sou = (sou[idx] @ sou[idx].T)[off].view(n, n - 1)
        log_tar, log_sou = s_tar.log_softmax(1), s_sou.log_softmax(1)
        out[idx] = (log_tar.exp() * (log_tar - log_sou)).sum(1)
    return out


class DiffRCPiece(LossPiece):
    """λ·L_pair against the frozen source (step.inputs["source"]); the unconditional variant
    feeds the null label throughout (the class enters only through the sampling guidance)."""

    def __init__(self, opts: DiffRCOptions, ctx: BuildContext, conditional: bool):
        self.opts, self.conditional = opts, conditional
        self.counts = ctx.class_counts
        self.head = head_classes(opts, ctx.class_counts.tolist())

    def prepare(self, step: Step) -> None:
        if not self.conditional:
            step.y = torch.full_like(step.y, step.null_label)
        source = step.inputs.get("source")
        if source is None:
            raise ValueError("DiffRC's pair loss needs the frozen source model (step input 'source')")
        with torch.no_grad():
            eps_sou = source(step.x_t, step.t, step.y)
        step.inputs["diffrc_x0_source"] = predicted_x0(step.schedule, step.x_t, step.t, eps_sou)

    def terms(self, step: Step, out):
        x0_tar = predicted_x0(step.schedule, step.x_t, step.t, step.eps)
        kl = pair_kl(x0_tar, step.inputs["diffrc_x0_source"], step.y_true, self.counts.to(x0_tar.device), self.head,
                     self.opts.gamma)
        if self.opts.pair_reduction == "sum":
            scale = len(kl)  # the batch mean of the per-sample terms is Σ_i KL
        else:
            scale = len(kl) / pair_members(step.y_true, self.head).sum().clamp(min=1)  # ... the mean over members (no host sync)
        return {"diffrc_pair": self.opts.lam * kl * scale}, {}


# ---------------------------------------------------------------------------------------------
# The prototype-contrastive guidance (Eq. 11–13)


class PrototypeNet(nn.Module):
    """f(x_t, t): the UNet's encoder half (time-conditioned ResBlocks and downsampling), global
    average pooling and a linear map to `dim` L2-normalised features; prototypes as a buffer."""

    def __init__(self, in_channels: int, num_classes: int, ch: int = 32, dim: int = 128,
                 ch_mult: tuple = (1, 2, 2), groups: int = 8):
        super().__init__()
        self.ch, tdim = ch, 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.head = nn.Conv2d(in_channels, ch, 3, padding=1)
        layers, now = [], ch
        for level, mult in enumerate(ch_mult):
            layers.append(ResBlock(now, ch * mult, tdim, 0.0, attn=False, groups=groups))
            now = ch * mult
            if level != len(ch_mult) - 1:
                layers.append(nn.Conv2d(now, now, 3, stride=2, padding=1))
        self.down = nn.ModuleList(layers)
        self.out = nn.Sequential(nn.GroupNorm(groups, now), nn.SiLU())
        self.proj = nn.Linear(now, dim)
        self.register_buffer("prototypes", F.normalize(torch.randn(num_classes, dim), dim=1))
        self.register_buffer("prior", torch.full((num_classes,), 1.0 / num_classes))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.time_mlp(timestep_embedding(t, self.ch))
        h = self.head(x)
        for layer in self.down:
            h = layer(h, temb) if isinstance(layer, ResBlock) else layer(h)
        return F.normalize(self.proj(self.out(h).mean(dim=(2, 3))), dim=1)  # (B, dim)


def prototype_logits(feats: torch.Tensor, prototypes: torch.Tensor, prior: torch.Tensor, tau: float) -> torch.Tensor:
    """log π_j + f·c_j / τ: the logits of Eq. 12's softmax. (B, C)."""
    return feats @ prototypes.T / tau + prior.clamp(min=1e-12).log()[None]


def prototype_contrastive_loss(feats, labels, prototypes, prior, tau: float) -> torch.Tensor:
    """L_PC of Eq. 12 per sample. (B,)."""
    return F.cross_entropy(prototype_logits(feats, prototypes, prior, tau), labels, reduction="none")


@torch.no_grad()
def update_prototypes(prototypes: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor, momentum: float) -> None:
    """Eq. 11, sample by sample in batch order, then renormalised (MoPro)."""
    for f, k in zip(feats, labels.tolist()):
        prototypes[k] = F.normalize(momentum * prototypes[k] + (1 - momentum) * f, dim=0)


def feature_train_step(net: PrototypeNet, opt, x0: torch.Tensor, y: torch.Tensor, schedule, opts: DiffRCOptions,
                       generator=None) -> torch.Tensor:
    """One step of f on noisy images: L_PC with the current prototypes, then the prototype EMA."""
    t = torch.randint(0, schedule.T, (x0.shape[0],), generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    feats = net(schedule.q_sample(x0, t, noise), t)
    loss = prototype_contrastive_loss(feats, y, net.prototypes, net.prior, opts.temperature).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    update_prototypes(net.prototypes, feats.detach(), y, opts.prototype_momentum)
    return loss.detach()


def guidance_direction(net: PrototypeNet, tau: float):
    """grad_fn(x_t, t, y) = −∇_{x_t} L_PC(x_t, y): the direction that raises f's p(y | x_t)."""
    def grad_fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x.detach().float().requires_grad_(True)
        with torch.autocast(x.device.type, enabled=False):
            loss = prototype_contrastive_loss(net(x, t), y, net.prototypes, net.prior, tau).sum()
        (grad,) = torch.autograd.grad(loss, x)
        return -grad
    return grad_fn


def _needs(opts: DiffRCOptions, conditional: bool) -> Needs:
    opts = opts or DiffRCOptions()
    return Needs(resample="balanced_batch", source_model=True, source_steps=opts.source_steps, guidance="prototype",
                 guidance_steps=opts.feature_steps, guidance_scale=opts.guidance_scale, conditional=conditional)


DIFFRC = Method(
    name="diffrc", section="diffrc", options=DiffRCOptions,
    summary="DiffRC: head-class source model, λ·KL pair-wise diversity loss for the tail (unconditional), "
            "prototype-contrastive guided sampling",
    paper="DiffRC §3.2–3.3, Eq. 5–13",
    build=lambda opts, ctx: DiffRCPiece(opts, ctx, conditional=False), needs=lambda opts: _needs(opts, False),
    source_classes=head_classes, extra_cost=lambda opts: 1 / 3)  # the frozen source's forward, no backward
DIFFRC_CFG = Method(
    name="diffrc_cfg", section="diffrc", options=DiffRCOptions,
    summary="DiffRC on the conditional backbone: pair-wise diversity loss + CFG + prototype guidance",
    paper="DiffRC §3.2–3.3, with the project's conditional backbone",
    build=lambda opts, ctx: DiffRCPiece(opts, ctx, conditional=True), needs=lambda opts: _needs(opts, True),
    source_classes=head_classes, extra_cost=lambda opts: 1 / 3)

PCG = Method(
    name="pcg", section="diffrc", options=DiffRCOptions,
    summary="DiffRC's prototype-contrastive guidance alone (Eq. 11–13) on the method's own training: `pcg` is "
            "DDPM + guidance (no source model, no pair loss), `cbdm+pcg` CBDM + guidance",
    paper="DiffRC §3.3, Eq. 11–13 (the guidance without §3.2's pair loss: its ablation baseline)",
    build=lambda opts, ctx: None,  # the DDPM loss: pcg adds no training term
    needs=lambda opts: Needs(guidance="prototype", guidance_steps=(opts or DiffRCOptions()).feature_steps,
                             guidance_scale=(opts or DiffRCOptions()).guidance_scale),
    extra_cost=lambda opts: 0.0)  # nothing per diffusion step; its feature network is its own short job


def load_prototype_guidance(path, device="cpu"):
    """grad_fn of a features.pt written by the train stage's feature job (weights_only load)."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    net = PrototypeNet(blob["in_channels"], blob["num_classes"], ch=blob["ch"], dim=blob["dim"])
    net.load_state_dict(blob["net"])
    net = net.to(device).eval().requires_grad_(False)
    return guidance_direction(net, float(blob["temperature"]))
