"""Class-rebalanced epoch plans: which training rows an epoch visits, and in what order.

Modes (the papers' baselines, CBDM Table 1 and DiffROP Table 4):
  none            every row once per epoch (plain shuffling), class frequency ∝ n_c
  balanced        RS: class frequency uniform over the classes that have images
  sqrt            RS-SQRT: class frequency ∝ sqrt(n_c)
  power           class frequency ∝ n_c ** p, the family containing the three above
  balanced_batch  OC's "batch re-sample": every batch of `batch_size` rows holds
                  batch_size // C rows of each class, the remainder spread evenly over batches

A plan is drawn per (seed, epoch), so an epoch is reproducible on its own (a resumed run gets
the same epoch it would have had) and differs from every other epoch. Class totals are
allocated exactly (largest remainder, ties drawn at random) and rows within a class are drawn
with minimal repetition (whole permutations of the class, then a prefix of one more), which
has lower variance than i.i.d. draws with the same expected frequencies.

Pure NumPy: no torch, no ray.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

MODES = ("none", "balanced", "sqrt", "power", "balanced_batch")
_EXPONENT = {"none": 1.0, "balanced": 0.0, "sqrt": 0.5, "balanced_batch": 0.0}


def class_exponent(mode: str, power: float = 1.0) -> float:
    """The p in frequency ∝ n_c ** p for a resampling mode."""
    if mode not in MODES:
        raise ValueError(f"unknown resample mode {mode!r}: use one of {', '.join(MODES)}")
    return float(power) if mode == "power" else _EXPONENT[mode]


def class_probabilities(counts: Sequence[int], mode: str, power: float = 1.0) -> np.ndarray:
    """Target class frequencies π_c ∝ n_c ** p (0 for classes with no rows). Shape (C,)."""
    counts = np.asarray(counts, dtype=np.float64)  # (C,)
    p = class_exponent(mode, power)
    weights = np.where(counts > 0, np.power(np.maximum(counts, 1.0), p), 0.0)
    total = weights.sum()
    if total <= 0:
        raise ValueError("cannot resample a split with no rows")
    return weights / total


def allocate(total: int, probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Integer class totals summing to `total` with |m_c − total·π_c| < 1.

    Floors, then the leftover units by systematic sampling over the fractional parts (in a
    random class order): class c gets one more with probability exactly its fractional part, so
    over many epochs E[m_c] = total·π_c.
    """
    exact = total * probs  # (C,)
    base = np.floor(exact).astype(np.int64)
    left = int(round(total - base.sum()))
    if left > 0:
        order = rng.permutation(len(probs))
        edges = np.cumsum((exact - base)[order])  # ends at `left`; each interval is shorter than 1
        hits = np.searchsorted(edges, rng.random() + np.arange(left), side="right")
        base[order[np.minimum(hits, len(order) - 1)]] += 1
    return base


def _draw_rows(rows: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    """m rows of one class: whole random permutations, then a prefix of one more."""
    if m <= 0 or len(rows) == 0:
        return np.zeros(0, dtype=np.int64)
    reps = -(-m // len(rows))
    return np.concatenate([rng.permutation(rows) for _ in range(reps)])[:m]


def epoch_plan(
    labels: np.ndarray,
    mode: str,
    *,
    seed: int,
    epoch: int,
    power: float = 1.0,
    epoch_size: int | None = None,
    batch_size: int | None = None,
) -> np.ndarray:
    """Row ids (positions into `labels`) that one epoch visits, in visiting order. Shape (M,).

    M = epoch_size (default: len(labels)); in `balanced_batch` mode M is rounded down to a
    whole number of batches and consecutive blocks of `batch_size` rows are class-balanced.
    """
    labels = np.asarray(labels, dtype=np.int64)  # (N,)
    if len(labels) == 0:
        raise ValueError("cannot resample a split with no rows")
    epoch_size = len(labels) if epoch_size is None else int(epoch_size)
    if epoch_size <= 0:
        raise ValueError(f"epoch_size must be positive, got {epoch_size}")
    rng = np.random.default_rng([int(seed), int(epoch), 0x7A11])
    num_classes = int(labels.max()) + 1
    rows_of = [np.flatnonzero(labels == c) for c in range(num_classes)]
    counts = np.array([len(r) for r in rows_of])

    if mode == "balanced_batch":
        return _balanced_batch_plan(rows_of, counts, epoch_size, batch_size, rng)

    totals = allocate(epoch_size, class_probabilities(counts, mode, power), rng)  # (C,)
    plan = np.concatenate([_draw_rows(rows_of[c], int(totals[c]), rng) for c in range(num_classes)])
    rng.shuffle(plan)
    return plan


def _balanced_batch_plan(rows_of, counts, epoch_size, batch_size, rng) -> np.ndarray:
    if not batch_size or batch_size <= 0:
        raise ValueError("balanced_batch resampling needs a positive batch_size")
    present = np.flatnonzero(counts > 0)  # classes that can fill a slot
    num_batches = epoch_size // batch_size
    if num_batches == 0:
        raise ValueError(f"epoch_size {epoch_size} is smaller than one batch of {batch_size}")
    per_class, extra = divmod(batch_size, len(present))
    # Class of every slot: per_class of each class per batch, plus `extra` classes per batch
    # dealt from a deck that is reshuffled only when empty, so extras differ by at most one.
    deck = np.zeros(0, dtype=np.int64)
    slot_classes = np.empty((num_batches, batch_size), dtype=np.int64)  # (num_batches, B)
    base = np.repeat(present, per_class)
    for b in range(num_batches):
        if len(deck) < extra:
            fresh = rng.permutation(present)
            # classes still in the old deck go last, so no batch gets the same extra class twice
            fresh = np.concatenate([fresh[~np.isin(fresh, deck)], fresh[np.isin(fresh, deck)]])
            deck = np.concatenate([deck, fresh])
        slot_classes[b] = np.concatenate([base, deck[:extra]])
        deck = deck[extra:]
    plan = np.empty_like(slot_classes)
    for c in present:
        mask = slot_classes == c
        plan[mask] = _draw_rows(rows_of[c], int(mask.sum()), rng)
    plan = rng.permuted(plan, axis=1)  # shuffle inside each batch, keep batches balanced
    return plan.reshape(-1)
