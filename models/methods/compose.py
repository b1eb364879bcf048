"""`DiffusionLoss`: the pieces of a (composed) method stacked on the DDPM term.

    loss(net, x0, y, schedule, *, t=None, noise=None, generator=None, y_true=None, **inputs)
        -> {"loss": (B,) per-sample objective, "mse": ..., <each piece's terms>}

One step: draw (t, ε) -> x_t -> every piece's `prepare` (targets, weights, its own draws) ->
one batched forward of the main rows and every piece's extra rows -> the DDPM term
w·‖target − ε_θ‖² plus every piece's loss terms. With no pieces this is `ddpm_loss`, the same
draws from the same generator giving the same number.
"""
from __future__ import annotations

import torch

from models.methods.base import LossPiece, Step, draw_t_noise, per_sample_mse


def _null(net) -> int:
    return (net.module if hasattr(net, "module") else net).null_label


def batched_forward(net, main: tuple, extras: list) -> tuple[torch.Tensor, list]:
    """net on the main (x, t, y) rows and every non-None extra, concatenated into one call."""
    rows = [main] + [e for e in extras if e is not None]
    if len(rows) == 1:
        return net(*main), [None] * len(extras)
    out = net(torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows]), torch.cat([r[2] for r in rows]))
    sizes = [r[0].shape[0] for r in rows]
    parts = list(out.split(sizes))
    main_out, rest = parts[0], iter(parts[1:])
    return main_out, [next(rest) if e is not None else None for e in extras]


class DiffusionLoss:
    """The loss of a composed method: its pieces in registry-name order."""

    def __init__(self, pieces: list[LossPiece], name: str = "ddpm"):
        self.pieces, self.name = [p for p in pieces if p is not None], name

    def __call__(self, net, x0: torch.Tensor, y: torch.Tensor, schedule, *, t=None, noise=None, generator=None,
                 y_true=None, keep_graph: bool = False, **inputs) -> dict[str, torch.Tensor]:
        """`keep_graph`: also return "_ddpm" (the weighted DDPM term) and "_terms" (the pieces' loss
        terms) with their graphs, to measure each part's gradient (benchmarks/bench_methods.py)."""
        y_true = y if y_true is None else y_true
        t, noise = draw_t_noise(x0, schedule, t, noise, generator)
        x_t = schedule.q_sample(x0, t, noise)  # (B, C, H, W)
        step = Step(net=net, schedule=schedule, x0=x0, y=y, y_true=y_true, t=t, noise=noise, x_t=x_t,
                    generator=generator, null_label=_null(net), target=noise, inputs=inputs)
        for piece in self.pieces:
            piece.prepare(step)
        extras = [p.forward_inputs(step) for p in self.pieces]
        together = [e if p.batched else None for p, e in zip(self.pieces, extras)]
        step.eps, outs = batched_forward(net, (step.x_t, step.t, step.y), together)  # pieces may relabel (DiffRC)
        outs = [o if p.batched else (net(*e) if e is not None else None) for p, e, o in zip(self.pieces, extras, outs)]
        mse = per_sample_mse(step.eps, step.target)
        loss = mse if step.weight is None else mse * step.weight
        result = {"mse": mse.detach(), **{k: v.detach() for k, v in step.logs.items()}}
        raw = {"_ddpm": loss, "_terms": {}}
        for piece, out in zip(self.pieces, outs):
            loss_terms, logged = piece.terms(step, out)
            for name, value in loss_terms.items():
                loss = loss + value
                result[name] = value.detach()
                raw["_terms"][name] = value
            result.update({k: v.detach() for k, v in logged.items()})
        result["loss"] = loss
        if keep_graph:
            result.update(raw)
        return result
