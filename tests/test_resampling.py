"""Epoch plans: target frequencies, exactness, reproducibility, minimal repetition, balanced batches."""
import numpy as np
import pytest

from models.data.longtail import long_tailed_counts
from models.data.resampling import MODES, allocate, class_probabilities, epoch_plan

FMNIST_LT = long_tailed_counts(6000, 10, "exp", 0.01)  # 14,886 rows


def _labels(counts, seed=0):
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(len(counts)), counts))


def test_class_probabilities_follow_the_power_law():
    n = np.array(FMNIST_LT, dtype=float)
    assert np.allclose(class_probabilities(n, "none"), n / n.sum())
    assert np.allclose(class_probabilities(n, "balanced"), 0.1)
    assert np.allclose(class_probabilities(n, "sqrt"), np.sqrt(n) / np.sqrt(n).sum())
    assert np.allclose(class_probabilities(n, "power", 0.5), class_probabilities(n, "sqrt"))
    assert np.allclose(class_probabilities(n, "power", 0.0), class_probabilities(n, "balanced"))
    assert np.allclose(class_probabilities(n, "balanced_batch"), 0.1)
    # an empty class gets no mass and the rest share it
    assert class_probabilities([10, 0, 30], "balanced").tolist() == [0.5, 0.0, 0.5]


def test_allocate_is_exact_and_unbiased():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    rng = np.random.default_rng(0)
    draws = np.stack([allocate(101, probs, rng) for _ in range(4000)])  # (4000, 4)
    assert (draws.sum(1) == 101).all()
    assert (np.abs(draws - 101 * probs) < 1).all()
    assert np.allclose(draws.mean(0), 101 * probs, atol=0.02)


@pytest.mark.parametrize("mode", ["none", "balanced", "sqrt", "power"])
def test_epoch_frequencies_match_target(mode):
    labels = _labels(FMNIST_LT)
    plan = epoch_plan(labels, mode, seed=1, epoch=0, power=0.3, epoch_size=20000)
    assert len(plan) == 20000 and plan.min() >= 0 and plan.max() < len(labels)
    freq = np.bincount(labels[plan], minlength=10) / len(plan)
    target = class_probabilities(FMNIST_LT, mode, 0.3)
    assert np.abs(freq - target).max() < 1.0 / len(plan) + 1e-12


def test_none_mode_is_a_permutation():
    labels = _labels(FMNIST_LT)
    plan = epoch_plan(labels, "none", seed=0, epoch=0)
    assert np.array_equal(np.sort(plan), np.arange(len(labels)))


def test_plans_are_reproducible_and_differ_per_epoch():
    labels = _labels(FMNIST_LT)
    a0 = epoch_plan(labels, "balanced", seed=7, epoch=0)
    assert np.array_equal(a0, epoch_plan(labels, "balanced", seed=7, epoch=0))
    assert not np.array_equal(a0, epoch_plan(labels, "balanced", seed=7, epoch=1))
    assert not np.array_equal(a0, epoch_plan(labels, "balanced", seed=8, epoch=0))


def test_rows_repeat_as_little_as_possible():
    labels = _labels(FMNIST_LT)
    plan = epoch_plan(labels, "balanced", seed=0, epoch=3)
    reps = np.bincount(plan, minlength=len(labels))
    tail_rows = np.flatnonzero(labels == 9)  # 60 rows asked for ~1489 draws: 24 or 25 each
    assert set(reps[tail_rows]) <= {24, 25}
    head_rows = np.flatnonzero(labels == 0)  # 6000 rows, ~1489 draws: none twice
    assert reps[head_rows].max() == 1


@pytest.mark.parametrize("batch_size", [100, 64])
def test_balanced_batches_are_balanced(batch_size):
    labels = _labels(FMNIST_LT)
    plan = epoch_plan(labels, "balanced_batch", seed=0, epoch=0, batch_size=batch_size)
    assert len(plan) == (len(labels) // batch_size) * batch_size
    per_batch = np.stack([np.bincount(labels[b], minlength=10) for b in plan.reshape(-1, batch_size)])
    base = batch_size // 10
    assert per_batch.min() >= base and per_batch.max() <= base + 1
    totals = per_batch.sum(0)
    assert totals.max() - totals.min() <= 1  # the remainder slots are spread evenly


def test_bad_plans_are_rejected():
    with pytest.raises(ValueError, match="batch_size"):
        epoch_plan(np.array([0, 1]), "balanced_batch", seed=0, epoch=0)
    with pytest.raises(ValueError, match="unknown resample mode"):
        epoch_plan(np.array([0, 1]), "uniformish", seed=0, epoch=0)
    with pytest.raises(ValueError, match="no rows"):
        epoch_plan(np.array([], dtype=int), "none", seed=0, epoch=0)
    assert set(MODES) == {"none", "balanced", "sqrt", "power", "balanced_batch"}
