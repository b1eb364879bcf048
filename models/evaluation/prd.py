"""Precision and recall for distributions, PRD (Sajjadi et al., NeurIPS 2018), and its F_8 / F_1/8.

The union of real and generated features is clustered (k-means); the two cluster histograms
P (reference) and Q (generated) give, for slopes λ = tan(θ), θ ∈ (0, π/2),
    α(λ) = Σ_ω min(λ P(ω), Q(ω))   (precision),   β(λ) = α(λ) / λ   (recall),
averaged over `num_runs` clusterings. F_8 (recall-weighted) and F_1/8 (precision-weighted) are
the maxima of F_b = (1 + b²)αβ / (b²α + β) along the curve, as reported by CBDM and DiffROP with
20 × #classes clusters and 10 runs.
"""
from __future__ import annotations

import numpy as np


def prd_curve(eval_dist: np.ndarray, ref_dist: np.ndarray, num_angles: int = 1001, epsilon: float = 1e-10):
    """(precision, recall) along the PRD curve for two histograms over the same bins."""
    slopes = np.tan(np.linspace(epsilon, np.pi / 2 - epsilon, num=num_angles))[:, None]  # (A, 1)
    precision = np.minimum(ref_dist[None, :] * slopes, eval_dist[None, :]).sum(axis=1)
    recall = precision / slopes[:, 0]
    return np.clip(precision, 0, 1), np.clip(recall, 0, 1)


def cluster_histograms(eval_feats: np.ndarray, ref_feats: np.ndarray, num_clusters: int, seed: int):
    """Cluster the union with k-means; normalised cluster histograms of each set. (K,), (K,)."""
    from sklearn.cluster import MiniBatchKMeans

    data = np.vstack([eval_feats, ref_feats]).astype(np.float64)
    labels = MiniBatchKMeans(n_clusters=num_clusters, n_init=10, random_state=seed).fit(data).labels_
    eval_hist = np.bincount(labels[:len(eval_feats)], minlength=num_clusters) / len(eval_feats)
    ref_hist = np.bincount(labels[len(eval_feats):], minlength=num_clusters) / len(ref_feats)
    return eval_hist, ref_hist


def prd_from_features(eval_feats: np.ndarray, ref_feats: np.ndarray, num_clusters: int = 20,
                      num_angles: int = 1001, num_runs: int = 10, seed: int = 0):
    """The PRD curve averaged over `num_runs` clusterings. Features: (N, D), (M, D)."""
    precisions, recalls = [], []
    for run in range(num_runs):
        eval_hist, ref_hist = cluster_histograms(eval_feats, ref_feats, num_clusters, seed + run)
        p, r = prd_curve(eval_hist, ref_hist, num_angles)
        precisions.append(p)
        recalls.append(r)
    return np.mean(precisions, axis=0), np.mean(recalls, axis=0)


def f_beta(precision: np.ndarray, recall: np.ndarray, beta: float, epsilon: float = 1e-10) -> np.ndarray:
    return (1 + beta**2) * precision * recall / (beta**2 * precision + recall + epsilon)


def max_f_beta_pair(precision: np.ndarray, recall: np.ndarray, beta: float = 8.0) -> tuple[float, float]:
    """(F_β, F_1/β) maxima along the curve: F_8 tracks recall, F_1/8 precision."""
    return float(f_beta(precision, recall, beta).max()), float(f_beta(precision, recall, 1.0 / beta).max())
