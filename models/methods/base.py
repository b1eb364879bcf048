"""The method plugin interface: what a long-tail method is to the rest of the project.

A method is one module holding
  * its options dataclass, which *is* its config section (`Method.section`, `Method.options`),
    with `validate()` and each default's provenance (paper / released code) in a comment;
  * a `LossPiece` it builds for a run: hooks into one training step (below);
  * `Needs`: what it asks of the pipeline (a resampling mode for its stream, a frozen source
    model, a sampling-time guidance, a diagnostic curve).
The registry (models/methods/registry.py) lists every method once; composition (`t2h+cbdm`)
stacks their pieces in `DiffusionLoss` (models/methods/compose.py), which with no pieces is
exactly `ddpm_loss`.

Hooks of a `LossPiece`, called in this order within one step (all optional):
  prepare(step)          change the regression target or the per-sample weight of the DDPM
                         term, or draw what the piece needs (y′, a paired view)
  forward_inputs(step)   extra (x, t, y) rows for the net: batched with the main forward into
                         one call (one (1+K)·B forward for CBDM), their output handed back
  terms(step, out)       -> (loss terms, logged terms): dicts of per-sample (B,) tensors
Every random draw comes from `step.generator`, so the same inputs give the same loss.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from models.diffusion.schedule import NoiseSchedule


def draw_t_noise(x0: torch.Tensor, schedule: NoiseSchedule, t=None, noise=None, generator=None):
    """The (t, ε) pair of a DDPM step: passed in, or t ~ U{0..T−1} and ε ~ N(0, I) from `generator`."""
    if t is None:
        t = torch.randint(0, schedule.T, (x0.shape[0],), generator=generator, device=x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return t, noise


def per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """‖a − b‖² / D per sample. (B, ...) -> (B,)."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


def ddpm_loss(net, x0: torch.Tensor, y: torch.Tensor, schedule: NoiseSchedule, *,
              t=None, noise=None, generator=None, y_true=None) -> dict[str, torch.Tensor]:
    """L_simple = ‖ε − ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, t, y)‖² (Ho et al. 2020, Eq. 14).

    The reference every method reduces to; `y_true` (the labels before dropout) is unused here.
    """
    t, noise = draw_t_noise(x0, schedule, t, noise, generator)
    x_t = schedule.q_sample(x0, t, noise)  # (B, C, H, W)
    eps = net(x_t, t, y)
    mse = per_sample_mse(eps, noise)
    return {"loss": mse, "mse": mse.detach()}


@dataclass
class Step:
    """One training step's tensors, shared by the pieces. y: labels fed to the net (the null label
    where dropped for guidance); y_true: the data labels. target / weight: the DDPM term's."""

    net: Any
    schedule: NoiseSchedule
    x0: torch.Tensor  # (B, C, H, W)
    y: torch.Tensor  # (B,)
    y_true: torch.Tensor
    t: torch.Tensor  # (B,) long
    noise: torch.Tensor  # (B, C, H, W)
    x_t: torch.Tensor
    generator: torch.Generator | None
    null_label: int
    target: torch.Tensor  # what ε_θ(x_t, t, y) regresses to; ε unless a piece moves it
    weight: torch.Tensor | None = None  # (B,) weight of the DDPM term; None = 1
    eps: torch.Tensor | None = None  # ε_θ(x_t, t, y), set after the forward
    inputs: dict = field(default_factory=dict)  # extra per-step inputs (e.g. a frozen source net)
    logs: dict = field(default_factory=dict)  # logged terms a piece adds in prepare()

    @property
    def conditional(self) -> torch.Tensor:
        """(B,) bool: samples whose label was not dropped."""
        return self.y != self.null_label


class LossPiece:
    """A method's hooks into one step; see the module docstring. The base class does nothing."""

    batched: bool = True  # forward_inputs rows go into the main forward (False: their own call)

    def prepare(self, step: Step) -> None:
        return None

    def forward_inputs(self, step: Step):
        return None

    def terms(self, step: Step, out: torch.Tensor | None) -> tuple[dict, dict]:
        return {}, {}


@dataclass(frozen=True)
class Needs:
    """What a method asks of the pipeline (merged over a composition)."""

    resample: str | None = None  # a models/data/resampling.py mode its training stream must use
    source_model: bool = False  # a frozen source model (trained first on Method.source_classes),
    #                             passed to the loss as step.inputs["source"]; the model starts from it
    source_steps: int | None = None  # the source model's steps (None = train.steps)
    guidance: str | None = None  # a sampling-time guidance the sample stage wraps around the denoiser
    guidance_steps: int = 0  # training steps of the guidance's network
    guidance_scale: float = 0.0  # its scale s at sampling time (sample.guidance_scale overrides)
    conditional: bool = True  # False: an unconditional backbone (the null label throughout)
    diagnostics: tuple = ()  # names of curves the pipeline plots before training (Method.diagnostic)


@dataclass(frozen=True)
class BuildContext:
    """What a piece may be built from: the training class counts and the schedule length."""

    class_counts: torch.Tensor  # (C,) long
    T: int
    null_label: int | None = None


@dataclass(frozen=True)
class Method:
    """A registry entry. `build(opts, ctx) -> LossPiece | None`; `needs(opts) -> Needs`;
    `diagnostic(name, opts, x0, schedule, generator) -> curve dict` for Needs.diagnostics;
    `source_classes(opts, counts)` for Needs.source_model."""

    name: str
    summary: str  # one line: what it does (README and report tables)
    paper: str  # the paper and equations it follows
    section: str | None = None  # config section = the options dataclass below
    options: type | None = None
    build: Callable[[Any, BuildContext], LossPiece | None] = lambda opts, ctx: None
    needs: Callable[[Any], Needs] = lambda opts: Needs()
    diagnostic: Callable | None = None
    source_classes: Callable | None = None  # (opts, class_counts) -> the classes a source model sees
    extra_cost: Callable[[Any], float] = lambda opts: 0.0  # forward+backward passes per sample beyond DDPM's
    role: str = "loss"  # "loss" (changes the objective), "data" (changes the stream only), "base"

    def knobs(self) -> list[str]:
        """Dotted config keys of its section (for tables and tune-space checks)."""
        import dataclasses

        return [f"{self.section}.{f.name}" for f in dataclasses.fields(self.options)] if self.options else []
