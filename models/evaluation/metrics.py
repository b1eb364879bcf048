"""Evaluation arithmetic on extracted features: class groups, per-class Fréchet distance, and the
tail memorisation rate. (Feature extraction and the whole-set metrics go through torch-fidelity.)
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
