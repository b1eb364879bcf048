"""All metrics of one generated set from its features, the one place this arithmetic lives
(the evaluate stage and the sampling sweeps both call it).

Whole-set: FID, KID, improved precision / recall (k = `prc_neighborhood`) and IS through
torch-fidelity's feature-level functions, PRD F_8 / F_1/8 (Sajjadi et al.), all against the
balanced reference features. Per class: FID against the class's reference images (n/a below
`min_per_class` samples) and the diversity (mean pairwise feature distance between distinct
images of the class; the real reference images' value beside it). Per group (`thirds` and
`absolute` conventions): FID and the memorisation rate; per `thirds` group the mean of its
classes' diversities. Memorisation: nearest LT-training image in feature space closer than the
`memorization_quantile` of held-out real images' nearest distances.
"""
from __future__ import annotations

import numpy as np
import torch

from models.evaluation.artefacts import class_fidelity, rate_with_interval, speckle_fraction
from models.evaluation.intervals import bootstrap_indices, fid_interval, gaussian_stats, percentile_interval, wilson_interval
from models.evaluation.metrics import (ClassDistances, class_diversity, class_groups, frechet_distance, group_mean, memorization_rate,
                                       memorization_threshold)
from models.evaluation.prd import max_f_beta_pair, prd_from_features


def group_fids(feats: np.ndarray, labels: np.ndarray, ref: np.ndarray, ref_labels: np.ndarray, counts,
               convention: str = "thirds", min_samples: int = 2, many_above: int = 100,
               few_below: int = 20) -> dict[str, float | None]:
    """FID of each many / medium / few group against that group's reference images."""
    out = {}
    for group, classes in class_groups(counts, convention, many_above, few_below).items():
        g, r = np.isin(labels, classes), np.isin(ref_labels, classes)
        out[group] = frechet_distance(feats[g], ref[r]) if g.sum() >= min_samples and r.sum() >= 2 else None
    return out


def per_class_fids(feats: np.ndarray, labels: np.ndarray, ref: np.ndarray, ref_labels: np.ndarray,
                   num_classes: int, min_samples: int = 2) -> list[float | None]:
    counts = np.bincount(labels, minlength=num_classes)
    return [frechet_distance(feats[labels == c], ref[ref_labels == c]) if counts[c] >= min_samples else None
            for c in range(num_classes)]


def diversity_metrics(gen_feats: np.ndarray, gen_labels: np.ndarray, ref: np.ndarray, ref_labels: np.ndarray,
                      counts, *, seed: int = 0, bootstrap: int = 0, reference_per_class: int = 500) -> dict:
    """Within-class diversity: per class the mean pairwise feature distance between distinct
    generated images, and per `thirds` group the mean over its classes; `real_*` the same on up to
    `reference_per_class` reference images per class (a fixed random subset: the statistic's
    expectation does not depend on the set's size). With `bootstrap`, 95% intervals of the group
    values (images resampled within classes; pairs of two copies of one image left out)."""
    C = len(counts)
    rng = np.random.default_rng(seed)
    ref_idx = np.concatenate([rng.permutation(np.flatnonzero(ref_labels == c))[:reference_per_class] for c in range(C)])
    per_class = class_diversity(gen_feats, gen_labels, C)
    real = class_diversity(ref[ref_idx], ref_labels[ref_idx], C)
    out = {"per_class": per_class, "real_per_class": real}
    groups = class_groups(counts, "thirds")
    for group, classes in groups.items():
        out[group], out[f"real_{group}"] = group_mean(per_class, classes), group_mean(real, classes)
    out["all"], out["real_all"] = group_mean(per_class, range(C)), group_mean(real, range(C))
    if bootstrap:
        dist = ClassDistances(gen_feats, gen_labels, C)
        draws = [dist.diversity(i) for i in bootstrap_indices(len(gen_labels), bootstrap, seed, strata=gen_labels)]
        for group, classes in [*groups.items(), ("all", range(C))]:
            out[f"{group}_interval"] = list(percentile_interval([group_mean(d, classes) for d in draws],
                                                                point=out[group]))
    return out


def generation_metrics(gen_feats: np.ndarray, gen_logits: np.ndarray, gen_labels: np.ndarray, real: dict, counts,
                       *, seed: int = 0, kid_subset_size: int = 1000, prc_neighborhood: int = 5,
                       prd_clusters_per_class: int = 20, prd_runs: int = 10, memorization_quantile: float = 0.01,
                       min_per_class: int = 2, many_above: int = 100, few_below: int = 20,
                       images: np.ndarray | None = None, logits_are_classes: bool = False,
                       bootstrap: int = 0, prc_reference: int = 10000) -> dict:
    """`real`: reference_feats / reference_labels / train_feats / test_feats. With `images`, the
    speckle fraction; with `logits_are_classes` (a domain classifier's logits), class fidelity per
    class; with `bootstrap` > 0, 95% bootstrap intervals of the whole-set and group FIDs (generated
    images resampled within classes, reference fixed). Each rate carries its Wilson interval.
    Returns the metrics, plus `_nearest` / `_dist` (each sample's nearest training image)."""
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    C = len(counts)
    ref, ref_labels = real["reference_feats"], real["reference_labels"]
    gen_t, ref_t = torch.from_numpy(gen_feats), torch.from_numpy(ref)
    subset = min(kid_subset_size, len(gen_feats), len(ref))
    out = {"fid": frechet_distance(gen_feats, ref), "num_samples": int(len(gen_feats))}
    out.update(kid_features_to_metric(gen_t, ref_t, kid_subsets=100, kid_subset_size=subset, verbose=False,
                                      rng_seed=seed, kid_kernel="poly", kid_degree=3, kid_gamma=None, kid_coef0=1))
    # precision / recall against a fixed random subset of the reference: the k-NN radii of all 60k
    # reference images cost minutes on a CPU; Kynkäänniemi et al. compare sets of equal size
    prc_idx = np.random.default_rng(seed).permutation(len(ref))[:max(prc_reference, len(gen_feats))]
    out.update(prc_features_to_metric(gen_t.float(), ref_t[prc_idx].float(), prc_neighborhood=prc_neighborhood,
                                      prc_batch_size=10000, save_cpu_ram=True, verbose=False))
    out["prc_reference_images"] = int(len(prc_idx))
    out.update(isc_features_to_metric(torch.from_numpy(gen_logits), splits=10, rng_seed=seed))
    ref_sub = ref[np.random.default_rng(seed).permutation(len(ref))[:max(len(gen_feats), 2)]]
    out["prd_f8"], out["prd_f1_8"] = max_f_beta_pair(*prd_from_features(
        gen_feats, ref_sub, num_clusters=min(prd_clusters_per_class * C, len(gen_feats) - 1, len(ref_sub) - 1),
        num_runs=prd_runs, seed=seed))
    out["per_class_fid"] = per_class_fids(gen_feats, gen_labels, ref, ref_labels, C, min_per_class)
    out["per_class_samples"] = np.bincount(gen_labels, minlength=C).tolist()
    threshold = memorization_threshold(real["test_feats"], real["train_feats"], memorization_quantile)
    rate, dist, nearest = memorization_rate(gen_feats, real["train_feats"], threshold)
    out["memorization"] = {"threshold": threshold, "quantile": memorization_quantile, "all": rate}
    for convention in ("thirds", "absolute"):
        fids = group_fids(gen_feats, gen_labels, ref, ref_labels, counts, convention, min_per_class, many_above,
                          few_below)
        for group, classes in class_groups(counts, convention, many_above, few_below).items():
            g = np.isin(gen_labels, classes)
            out[f"fid_{convention}_{group}"] = fids[group]
            out["memorization"][f"{convention}_{group}"] = float((dist[g] < threshold).mean()) if g.any() else None
    n_all = len(dist)
    out["memorization"]["all_interval"] = list(wilson_interval(int((dist < threshold).sum()), n_all))
    if images is not None:
        out["speckle"] = speckle_fraction(images)
    if logits_are_classes:
        pred = gen_logits.argmax(1)
        out["class_fidelity"] = class_fidelity(pred, gen_labels, C)
        for group, classes in class_groups(counts, "thirds").items():
            g = np.isin(gen_labels, classes)
            out["class_fidelity"][group] = rate_with_interval(pred[g] == gen_labels[g])
    if bootstrap:
        ref_stats = gaussian_stats(ref)
        out["fid_interval"] = list(fid_interval(gen_feats, ref_stats, bootstrap, seed, strata=gen_labels))
        for group, classes in class_groups(counts, "thirds").items():
            g, r = np.isin(gen_labels, classes), np.isin(ref_labels, classes)
            if g.sum() >= min_per_class:
                out[f"fid_thirds_{group}_interval"] = list(fid_interval(gen_feats[g], gaussian_stats(ref[r]), bootstrap,
                                                                        seed, strata=gen_labels[g]))
    out["diversity"] = diversity_metrics(gen_feats, gen_labels, ref, ref_labels, counts, seed=seed, bootstrap=bootstrap)
    out["_nearest"], out["_dist"] = nearest, dist
    return out
