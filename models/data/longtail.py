"""Long-tailed subset construction, as in Cao et al. 2019 (LDAM-DRW) and every paper since.

The CIFAR-10-LT / CIFAR-100-LT benchmarks are defined by this recipe, not by released files,
so it is reproduced exactly: per-class counts from the `exp` or `step` profile with int
truncation, then numpy's legacy global RNG seeded once and, class by class in label order, a
shuffle of that class's indices keeping the first n_c.

Pure NumPy: no torch, no ray.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

PROFILES = ("exp", "step")


def long_tailed_counts(n_max: float, num_classes: int, profile: str, imb_factor: float) -> list[int]:
    """Per-rank image counts, head (rank 0) first.

    `exp`:  n_r = int(n_max * imb_factor ** (r / (C - 1)))      (LDAM-DRW `get_img_num_per_cls`)
    `step`: n_max for the first C // 2 ranks, int(n_max * imb_factor) for the rest.

    The expression order matches the reference code so that int truncation gives the published
    counts (CIFAR-10-LT with imb 0.01: [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]).
    The reference `step` code emits only 2 * (C // 2) counts, silently dropping the last class
    when C is odd; here the tail half gets the extra class instead.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not 0.0 < imb_factor <= 1.0:
        raise ValueError(f"imb_factor must be in (0, 1], got {imb_factor}: use e.g. 0.01 for a 100:1 imbalance")
    if profile not in PROFILES:
        raise ValueError(f"unknown imbalance profile {profile!r}: use one of {', '.join(PROFILES)}")
    if num_classes == 1:
        return [int(n_max)]
    if profile == "exp":
        return [int(n_max * (imb_factor ** (r / (num_classes - 1.0)))) for r in range(num_classes)]
    head = num_classes // 2
    return [int(n_max)] * head + [int(n_max * imb_factor)] * (num_classes - head)


def resolve_class_order(
    class_order: str | Sequence[int | str] | None,
    class_names: Sequence[str],
    seed: int = 0,
) -> list[int]:
    """Labels from most to least frequent.

    None / "label": label order (the papers' default); "reverse": the last label is the head;
    "random": a permutation drawn from `seed`; or an explicit list of all labels or class names
    (the OC paper's shifted-categories table puts Horse, Bird, Frog, ... at the head).
    """
    num_classes = len(class_names)
    if class_order is None or class_order == "label":
        return list(range(num_classes))
    if class_order == "reverse":
        return list(range(num_classes))[::-1]
    if class_order == "random":
        return [int(c) for c in np.random.RandomState(seed).permutation(num_classes)]
    if isinstance(class_order, str):
        raise ValueError(
            f"unknown class_order {class_order!r}: use label, reverse, random, or a list of labels/class names"
        )
    name_to_label = {name: i for i, name in enumerate(class_names)}
    order = []
    for item in class_order:
        if isinstance(item, str) and not item.lstrip("-").isdigit():
            if item not in name_to_label:
                raise ValueError(f"class_order names unknown class {item!r}; classes are {list(class_names)}")
            order.append(name_to_label[item])
        else:
            order.append(int(item))
    if sorted(order) != list(range(num_classes)):
        raise ValueError(
            f"class_order must list each of the {num_classes} classes exactly once, got {list(class_order)}"
        )
    return order


def counts_by_label(rank_counts: Sequence[int], order: Sequence[int]) -> list[int]:
    """Map head-first counts onto labels: label order[r] gets rank_counts[r]."""
    counts = [0] * len(order)
    for rank, label in enumerate(order):
        counts[label] = int(rank_counts[rank])
    return counts


def select_long_tailed(labels: np.ndarray, counts: Sequence[int], seed: int = 0) -> np.ndarray:
    """Indices of the long-tailed subset, grouped by class in label order.

    Exactly the LDAM-DRW `gen_imbalanced_data` draw: `np.random.seed(seed)`, then for each class
    in label order shuffle its indices with the legacy global RNG and keep the first counts[c]
    (all of them when the class has fewer). A private RandomState with the same seed produces the
    identical stream without touching numpy's global state.
    """
    labels = np.asarray(labels, dtype=np.int64)  # (N,)
    rng = np.random.RandomState(seed)
    chosen = []
    for cls, n_c in enumerate(counts):
        idx = np.where(labels == cls)[0]
        rng.shuffle(idx)
        chosen.append(idx[: int(n_c)])
    return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)


def imbalance_ratio(counts: Sequence[int]) -> float:
    """n_max / n_min over the classes that have any images."""
    nonzero = [c for c in counts if c > 0]
    return max(nonzero) / min(nonzero) if nonzero else float("nan")
