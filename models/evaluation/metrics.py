"""Evaluation arithmetic on extracted features: class groups, per-class Fréchet distance, the
within-class diversity (mean pairwise feature distance) and the tail memorisation rate. (Feature extraction and the whole-set metrics go through torch-fidelity.)
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

GROUP_CONVENTIONS = ("thirds", "absolute")


def class_groups(counts: Sequence[int], convention: str = "thirds", many_above: int = 100,
                 few_below: int = 20) -> dict[str, list[int]]:
    """Labels of the many / medium / few groups.

    `thirds` (DiffROP's per-group FID): classes sorted by training count, the top ⌊C/3⌋ are
    many, the bottom ⌊C/3⌋ few, the rest medium (CIFAR-10 3/4/3, CIFAR-100 33/34/33); ties keep
    label order. `absolute` (the recognition literature): > many_above, [few_below, many_above],
    < few_below training images.
    """
    counts = [int(c) for c in counts]
    if convention == "thirds":
        order = sorted(range(len(counts)), key=lambda c: (-counts[c], c))
        k = len(counts) // 3
        return {"many": sorted(order[:k]), "medium": sorted(order[k:len(order) - k]), "few": sorted(order[len(order) - k:])}
    if convention == "absolute":
        return {"many": [c for c, n in enumerate(counts) if n > many_above],
                "medium": [c for c, n in enumerate(counts) if few_below <= n <= many_above],
                "few": [c for c, n in enumerate(counts) if n < few_below]}
    raise ValueError(f"unknown group convention {convention!r}: use one of {', '.join(GROUP_CONVENTIONS)}")


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """FID between two feature sets, with torch-fidelity's statistics and matrix square root."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    stats_a = fid_features_to_statistics(torch.as_tensor(feats_a, dtype=torch.float64))
    stats_b = fid_features_to_statistics(torch.as_tensor(feats_b, dtype=torch.float64))
    return float(fid_statistics_to_metric(stats_a, stats_b, verbose=False)["frechet_inception_distance"])


def nearest_distances(queries: np.ndarray, reference: np.ndarray, batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distance from each query to its nearest reference row, and that row. (N,), (N,)."""
    ref = torch.as_tensor(reference, dtype=torch.float64)  # float64: copies must come out at ~0
    ref_sq = (ref * ref).sum(1)
    dists, index = [], []
    for start in range(0, len(queries), batch):
        q = torch.as_tensor(queries[start:start + batch], dtype=torch.float64)
        d2 = (q * q).sum(1, keepdim=True) + ref_sq[None, :] - 2 * q @ ref.T  # (b, M)
        best = d2.min(dim=1)
        dists.append(best.values.clamp(min=0).sqrt().numpy())
        index.append(best.indices.numpy())
    if not dists:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    return np.concatenate(dists), np.concatenate(index)


def memorization_threshold(heldout_feats: np.ndarray, train_feats: np.ndarray, quantile: float = 0.01) -> float:
    """Distance below which an image counts as a copy: the `quantile` of held-out real images'
    nearest-training-image distances (so real unseen images are flagged at that rate)."""
    d, _ = nearest_distances(heldout_feats, train_feats)
    return float(np.quantile(d, quantile))


def memorization_rate(gen_feats: np.ndarray, train_feats: np.ndarray, threshold: float) -> tuple[float, np.ndarray, np.ndarray]:
    """Fraction of generated images closer than `threshold` to a training image, with each
    image's nearest distance and nearest training index."""
    d, idx = nearest_distances(gen_feats, train_feats)
    return (float((d < threshold).mean()) if len(d) else float("nan")), d, idx


def _mean_distinct(d: torch.Tensor, ids: torch.Tensor) -> float | None:
    """Mean of a distance matrix over its unordered pairs of two different images (ids differ)."""
    keep = torch.ones_like(d, dtype=torch.bool).triu(1) & (ids[:, None] != ids[None, :])
    return float(d[keep].mean()) if keep.any() else None


def mean_pairwise_distance(feats: np.ndarray, index: np.ndarray | None = None) -> float | None:
    """Mean Euclidean distance over the pairs of distinct images of a set (each unordered pair
    once: an unbiased U-statistic, so its expectation does not depend on the set's size). With
    `index` (the original indices of a bootstrap draw, one per row) the pairs of two copies of one
    image are left out, so resampling does not pull the value toward 0. None below two images."""
    x = torch.as_tensor(np.asarray(feats), dtype=torch.float64)
    if len(x) < 2:
        return None
    ids = torch.arange(len(x)) if index is None else torch.as_tensor(np.asarray(index))
    return _mean_distinct(torch.cdist(x, x), ids)


def class_diversity(feats: np.ndarray, labels: np.ndarray, num_classes: int,
                    index: np.ndarray | None = None) -> list[float | None]:
    """mean_pairwise_distance within each class (None where a class has fewer than two images)."""
    labels = np.asarray(labels)
    return [mean_pairwise_distance(feats[labels == c], None if index is None else np.asarray(index)[labels == c])
            for c in range(num_classes)]


class ClassDistances:
    """Each class's pairwise feature distances, computed once, so the diversity of a set's bootstrap
    draws (resampled within classes: `bootstrap_indices(..., strata=labels)`) indexes them instead
    of recomputing them per draw. `diversity(draw)` equals class_diversity(feats[draw], labels[draw],
    C, index=draw); `diversity()` equals class_diversity(feats, labels, C)."""

    def __init__(self, feats: np.ndarray, labels: np.ndarray, num_classes: int):
        labels = np.asarray(labels)
        x = torch.as_tensor(np.asarray(feats), dtype=torch.float64)
        self.members = [np.flatnonzero(labels == c) for c in range(num_classes)]
        self.dist = [torch.cdist(x[m], x[m]) for m in self.members]
        self.local = np.zeros(len(labels), dtype=np.int64)  # an image's position within its class
        for m in self.members:
            self.local[m] = np.arange(len(m))

    def diversity(self, draw: np.ndarray | None = None) -> list[float | None]:
        out = []
        for m, d in zip(self.members, self.dist):
            if len(m) < 2:
                out.append(None)
                continue
            ids = torch.as_tensor(self.local[m if draw is None else np.asarray(draw)[m]])
            out.append(_mean_distinct(d[ids][:, ids], ids))
        return out


def group_mean(per_class: Sequence[float | None], classes: Sequence[int]) -> float | None:
    """Unweighted mean over a group's classes of a per-class value (classes without one skipped)."""
    values = [per_class[c] for c in classes if per_class[c] is not None]
    return float(np.mean(values)) if values else None
