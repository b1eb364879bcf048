"""The method registry: names used by configs, the CLI and Tune spaces -> loss functions.

Each entry follows the signature documented in models/losses.py.
"""
from __future__ import annotations

from typing import Callable

from models.losses import ddpm_loss

METHODS: dict[str, Callable] = {
    "ddpm": ddpm_loss,
}


def get_method(name: str) -> Callable:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: use one of {', '.join(METHODS)}")
    return METHODS[name]
