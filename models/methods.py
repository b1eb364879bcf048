"""The method registry and composition.

A run's method is a `+`-joined list of registry names (`cbdm`, `t2h+cbdm`, `cbdm+diffrop`), so
the papers' combinations are configs, not code. Each name contributes one piece:
  a target transform  OC (t2h / h2t / oc_full): which clean image the denoiser regresses to;
  a regulariser       CBDM, DiffROP: extra per-sample terms on the same forward's prediction;
  a sample weight     reweight: the DDPM term × w_c ∝ n_c^−p (DiffROP's Table 4 baseline);
  a data stream       rs / rs_sqrt: class-balanced / √-balanced resampling (pipeline side).
`make_loss` turns a spec into a loss with the signature of models/losses.py. With no pieces it
computes exactly `ddpm_loss`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from models.cbdm import LABEL_SETS, cbdm_terms, draw_prime_labels, label_set_probs
from models.diffrop import FORMS, diffrop_term, group_draws
from models.losses import draw_t_noise, per_sample_mse
from models.oc import oc_target


@dataclass(frozen=True)
class MethodSpec:
    name: str
    regularisers: tuple = ()  # "cbdm", "diffrop"
    oc_mode: str | None = None  # t2h | h2t | full
    reweight: bool = False
    resample: str | None = None  # a models/resampling.py mode the data stream must use


@dataclass(frozen=True)
class MethodOptions:
    """Every method knob, with the papers' / released code's defaults."""

    cbdm_tau: float = 1.0  # w_t = τ·t/T (code); the paper's τ = 0.001 on integer t is the same
    cbdm_gamma: float = 0.25
    cbdm_label_set: str = "train"  # train (code, from scratch) | balanced (code, fine-tuning) | sqrt
    cbdm_num_labels: int = 1  # |𝒴|
    cbdm_batched: bool = True  # one forward of (1+|𝒴|)·B instead of 1+|𝒴| forwards of B
    oc_beta: float = 0.0  # β of the q(y)^β-weighted selection (Eq. 7); 0 = plain
    oc_cutoff: int = 1000  # transfer only for t < cutoff; 0 = never (DDPM), T = always
    diffrop_form: str = "reciprocal"
    diffrop_tau0: float = 0.01
    diffrop_temperature: float = 1.0
    diffrop_margin: float = 1.0
    diffrop_group_size: int = 8  # samples sharing one (t, ε), among which pairs are formed
    reweight_power: float = 1.0  # w_c ∝ n_c^−p, normalised to mean 1 over the training data

    def validate(self) -> None:
        if self.cbdm_label_set not in LABEL_SETS:
            raise ValueError(f"unknown CBDM label set {self.cbdm_label_set!r}: use one of {', '.join(LABEL_SETS)}")
        if self.diffrop_form not in FORMS:
            raise ValueError(f"unknown DiffROP form {self.diffrop_form!r}: use one of {', '.join(FORMS)}")
        if self.cbdm_num_labels < 1 or self.diffrop_group_size < 2 or self.diffrop_temperature <= 0:
            raise ValueError("cbdm num_labels >= 1, diffrop group_size >= 2 and temperature > 0 are required")


METHODS: dict[str, MethodSpec] = {
    "ddpm": MethodSpec("ddpm"),
    "cbdm": MethodSpec("cbdm", regularisers=("cbdm",)),
    "t2h": MethodSpec("t2h", oc_mode="t2h"),
    "h2t": MethodSpec("h2t", oc_mode="h2t"),
    "oc_full": MethodSpec("oc_full", oc_mode="full"),
    "diffrop": MethodSpec("diffrop", regularisers=("diffrop",)),
    "reweight": MethodSpec("reweight", reweight=True),
    "rs": MethodSpec("rs", resample="balanced"),
    "rs_sqrt": MethodSpec("rs_sqrt", resample="sqrt"),
}


def get_method(name: str) -> MethodSpec:
    """Parse `a+b+...` into one spec; at most one OC mode and one resampling mode."""
    parts = [p.strip() for p in name.split("+") if p.strip()]
    unknown = [p for p in parts if p not in METHODS]
    if not parts or unknown:
        raise ValueError(f"unknown method {name!r}: compose names from {', '.join(METHODS)} with '+'")
    specs = [METHODS[p] for p in parts]
    oc = {s.oc_mode for s in specs if s.oc_mode}
    rs = {s.resample for s in specs if s.resample}
    if len(oc) > 1 or len(rs) > 1:
        raise ValueError(f"method {name!r} combines {sorted(oc) or sorted(rs)}: use one OC mode and one resampling")
    regs = tuple(dict.fromkeys(r for s in specs for r in s.regularisers))
    return MethodSpec(name, regularisers=regs, oc_mode=next(iter(oc), None),
                      reweight=any(s.reweight for s in specs), resample=next(iter(rs), None))


def class_weights(class_counts: torch.Tensor, power: float) -> torch.Tensor:
    """w_c = n_c^−p · N / Σ_c n_c^(1−p): the data-weighted mean of w is 1. (C,)"""
    n = class_counts.double().clamp(min=1)
    w = n.pow(-power) * n.sum() / (n * n.pow(-power)).sum()
    return w.float()


def _null(net) -> int:
    return (net.module if hasattr(net, "module") else net).null_label


def composed_loss(net, x0: torch.Tensor, y: torch.Tensor, schedule, *, spec: MethodSpec, opts: MethodOptions,
                  class_counts: torch.Tensor, t=None, noise=None, generator=None, y_true=None) -> dict:
    """One step's per-sample terms for `spec`. y: labels fed to the net (null = dropped);
    y_true: the data labels (OC gating, DiffROP pairs, reweighting); defaults to y."""
    y_true = y if y_true is None else y_true
    if t is None and noise is None and "diffrop" in spec.regularisers:
        t, noise = group_draws(x0, schedule.T, opts.diffrop_group_size, generator)
    t, noise = draw_t_noise(x0, schedule, t, noise, generator)
    x_t = schedule.q_sample(x0, t, noise)  # (B, C, H, W)
    counts = class_counts.to(x0.device)
    out: dict[str, torch.Tensor] = {}
    target = noise
    if spec.oc_mode:
        freq = counts.float() / counts.sum()
        target, source, transfer = oc_target(x0, x_t, t, noise, y_true, freq, schedule.alpha_bar, mode=spec.oc_mode,
                                            beta=opts.oc_beta, cutoff=opts.oc_cutoff, generator=generator)
        moved = source != torch.arange(len(source), device=source.device)
        out.update(oc_moved=moved.float(), oc_transfer_prob=transfer)

    eps_prime = None
    if "cbdm" in spec.regularisers:
        K, B = opts.cbdm_num_labels, x0.shape[0]
        y_prime = draw_prime_labels(B, K, label_set_probs(counts, opts.cbdm_label_set), generator, x0.device)
        if opts.cbdm_batched:
            both = net(x_t.repeat(K + 1, 1, 1, 1), t.repeat(K + 1), torch.cat([y, y_prime.reshape(-1)]))
            eps, eps_prime = both[:B], both[B:].reshape(K, *x_t.shape)
        else:
            eps = net(x_t, t, y)
    else:
        eps = net(x_t, t, y)  # (B, C, H, W)

    mse = per_sample_mse(eps, target)
    loss = mse * class_weights(counts, opts.reweight_power)[y_true] if spec.reweight else mse
    out["mse"] = mse.detach()
    if "cbdm" in spec.regularisers:
        terms = cbdm_terms(net, x_t, t, y, eps, y_prime, tau=opts.cbdm_tau, gamma=opts.cbdm_gamma, T=schedule.T,
                           null_label=_null(net), eps_prime=eps_prime)
        loss = loss + terms["cbdm_reg"] + terms["cbdm_commit"]
        out.update({k: v.detach() for k, v in terms.items()})
    if "diffrop" in spec.regularisers:
        mean = schedule.mean_from_eps(x_t, t, eps.float())
        pcl = diffrop_term(mean, y_true, t, noise, T=schedule.T, form=opts.diffrop_form, tau0=opts.diffrop_tau0,
                           temperature=opts.diffrop_temperature, margin=opts.diffrop_margin,
                           valid=y != _null(net))
        loss = loss + pcl
        out["diffrop"] = pcl.detach()
    out["loss"] = loss
    return out


def make_loss(name: str, opts: MethodOptions, class_counts) -> Callable:
    """The loss of a (composed) method name, closed over its options and the class counts."""
    spec = get_method(name)
    opts.validate()
    counts = torch.as_tensor(class_counts, dtype=torch.long)

    def loss(net, x0, y, schedule, **kw):
        return composed_loss(net, x0, y, schedule, spec=spec, opts=opts, class_counts=counts, **kw)

    loss.spec = spec  # type: ignore[attr-defined]
    return loss

