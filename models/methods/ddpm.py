"""DDPM with classifier-free guidance (Ho et al. 2020, Eq. 14; Ho & Salimans 2022): the base
objective every method adds to. It contributes no piece: `DiffusionLoss([])` is `ddpm_loss`."""
from __future__ import annotations

from models.methods.base import Method

DDPM = Method(name="ddpm", summary="L_simple = ‖ε − ε_θ(x_t, t, y)‖² with classifier-free guidance",
              paper="Ho et al. 2020 Eq. 14; Ho & Salimans 2022", role="base")
