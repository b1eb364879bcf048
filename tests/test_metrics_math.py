"""Evaluation arithmetic: group splits, PRD, Fréchet distance, memorisation — on constructed cases."""
import numpy as np
import pytest

from models.data.longtail import long_tailed_counts
from models.evaluation.metrics import (ClassDistances, class_diversity, class_groups, frechet_distance, group_mean, mean_pairwise_distance,
                                       memorization_rate, memorization_threshold)
from models.evaluation.prd import max_f_beta_pair, prd_curve, prd_from_features


def test_thirds_groups_for_cifar10_and_cifar100():
    g10 = class_groups(long_tailed_counts(5000, 10, "exp", 0.01), "thirds")
    assert (g10["many"], g10["medium"], g10["few"]) == ([0, 1, 2], [3, 4, 5, 6], [7, 8, 9])
    g100 = class_groups(long_tailed_counts(500, 100, "exp", 0.01), "thirds")
    assert [len(g100[k]) for k in ("many", "medium", "few")] == [33, 34, 33]
    shifted = class_groups([5, 500, 50], "thirds")  # sorted by count, not by label
    assert shifted == {"many": [1], "medium": [2], "few": [0]}


def test_absolute_groups():
    g = class_groups([5000, 101, 100, 20, 19, 3], "absolute")
    assert g == {"many": [0, 1], "medium": [2, 3], "few": [4, 5]}


def test_prd_curve_by_hand():
    # P = (0.5, 0.5), Q = (1, 0): precision(λ) = min(λ/2, 1) + min(λ/2, 0)
    p, r = prd_curve(np.array([1.0, 0.0]), np.array([0.5, 0.5]), num_angles=5)
    slopes = np.tan(np.linspace(1e-10, np.pi / 2 - 1e-10, 5))
    assert np.allclose(p, np.clip(np.minimum(slopes / 2, 1), 0, 1))
    assert np.allclose(r, np.clip(p / slopes, 0, 1))


def test_prd_identical_and_disjoint_distributions():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(600, 4))
    same = prd_from_features(a[:300], a[300:], num_clusters=10, num_runs=3)
    f8, f18 = max_f_beta_pair(*same)
    assert f8 > 0.9 and f18 > 0.9
    far = prd_from_features(a[:300], a[300:] + 50.0, num_clusters=10, num_runs=3)
    f8, f18 = max_f_beta_pair(*far)
    assert f8 < 0.05 and f18 < 0.05


def test_frechet_distance_is_zero_on_itself_and_grows_with_noise():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(2000, 8))
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-6)
    values = [frechet_distance(feats, feats + rng.normal(scale=s, size=feats.shape)) for s in (0.1, 0.5, 1.0, 2.0)]
    assert values == sorted(values) and values[0] > 0
    # two Gaussians with known means and equal covariance: FID = ‖μ1 − μ2‖² (+ sampling error)
    shifted = rng.normal(size=(20000, 2)) + np.array([3.0, 4.0])
    assert frechet_distance(rng.normal(size=(20000, 2)), shifted) == pytest.approx(25.0, rel=0.02)


def test_memorization_is_one_for_copies_and_near_zero_for_heldout():
    rng = np.random.default_rng(2)
    train, heldout, fresh = rng.normal(size=(500, 16)), rng.normal(size=(300, 16)), rng.normal(size=(300, 16))
    threshold = memorization_threshold(heldout, train, quantile=0.01)
    copies = train[rng.integers(0, 500, 200)]
    rate, dist, idx = memorization_rate(copies, train, threshold)
    assert rate == 1.0 and np.allclose(dist, 0, atol=1e-3) and np.array_equal(train[idx], copies)
    assert memorization_rate(fresh, train, threshold)[0] < 0.05


def test_kid_and_precision_recall_through_torch_fidelity_on_constructed_sets():
    import torch
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    rng = np.random.default_rng(3)
    a = torch.from_numpy(rng.normal(size=(400, 6)))
    b = torch.from_numpy(rng.normal(size=(400, 6)))
    kw = dict(kid_subsets=50, kid_subset_size=200, verbose=False, rng_seed=0, kid_kernel="poly", kid_degree=3,
              kid_gamma=None, kid_coef0=1)
    same = kid_features_to_metric(a, b, **kw)["kernel_inception_distance_mean"]
    shifted = kid_features_to_metric(a, b + 1.0, **kw)["kernel_inception_distance_mean"]
    assert abs(same) < 0.02 and shifted > 10 * max(abs(same), 1e-3)
    # generated = a subset of a tight cluster inside the real spread: precision 1, recall < 1
    real = torch.from_numpy(rng.normal(size=(500, 2))).float()
    gen = real[real.norm(dim=1) < 0.5][:100]
    pr = prc_features_to_metric(gen, real, prc_neighborhood=5, prc_batch_size=1000, save_cpu_ram=True, verbose=False)
    assert pr["precision"] == 1.0 and pr["recall"] < 0.5


def test_frechet_from_stats_equals_scipys_sqrtm_route():
    """The eigenvalue route of the bootstrap intervals against torch-fidelity's formula (scipy sqrtm),
    on random full-rank and rank-deficient covariances, and a hand case: 1-D N(0, 4) vs N(1, 1):
    (0−1)² + 4 + 1 − 2·√4 = 2."""
    from scipy import linalg

    from models.evaluation.intervals import frechet_from_stats

    rng = np.random.default_rng(0)
    for n, d in ((500, 16), (40, 64)):  # n < d: singular covariances, as per-class FIDs meet
        a, b = rng.normal(size=(n, d)), rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3 + 0.2
        mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
        covmean = linalg.sqrtm(s1 @ s2).real
        ref = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
        assert frechet_from_stats(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-6, abs=1e-6)
    assert frechet_from_stats(np.zeros(1), np.array([[4.0]]), np.ones(1), np.array([[1.0]])) == pytest.approx(2.0)


def test_mean_pairwise_distance_by_hand_and_copies_left_out():
    # three points on a line: pairs (0,1)=1, (0,2)=3, (1,2)=2 -> mean 2
    x = np.array([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    assert mean_pairwise_distance(x) == pytest.approx(2.0)
    assert mean_pairwise_distance(x[:1]) is None
    # a bootstrap draw that repeats image 0: the (0, 0') pair is left out, the value stays unbiased
    draw = np.array([0, 0, 2])
    assert mean_pairwise_distance(x[draw], index=draw) == pytest.approx(3.0)  # pairs (0,2), (0',2)
    assert mean_pairwise_distance(x[draw]) == pytest.approx(2.0)  # with the copy pair: (0 + 3 + 3) / 3
    assert mean_pairwise_distance(x[[1, 1]], index=np.array([1, 1])) is None


def test_class_diversity_grows_with_spread_and_group_mean_skips_missing():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 200)
    scale = np.array([0.5, 1.0, 2.0])[labels][:, None]
    feats = rng.normal(size=(600, 16)) * scale
    div = class_diversity(feats, labels, 4)
    assert div[3] is None and div[0] < div[1] < div[2]
    # E‖a − b‖ for two N(0, σ² I_16) vectors ≈ σ·√(2·16): the U-statistic does not depend on n
    assert div[1] == pytest.approx(np.sqrt(32), rel=0.05)
    assert class_diversity(feats[:60], labels[:60], 1)[0] == pytest.approx(0.5 * np.sqrt(32), rel=0.1)
    assert group_mean(div, [1, 2, 3]) == pytest.approx((div[1] + div[2]) / 2)
    assert group_mean(div, [3]) is None


def test_class_distances_equal_class_diversity_on_the_set_and_on_bootstrap_draws():
    from models.evaluation.intervals import bootstrap_indices

    rng = np.random.default_rng(0)
    feats, labels = rng.normal(size=(300, 8)), rng.integers(0, 4, 300)
    dist = ClassDistances(feats, labels, 5)  # class 4 is empty
    whole, want = dist.diversity(), class_diversity(feats, labels, 5)
    assert whole[4] is None and want[4] is None and whole[:4] == pytest.approx(want[:4], rel=1e-12)
    for draw in bootstrap_indices(300, 5, 0, strata=labels):
        got, want = dist.diversity(draw), class_diversity(feats[draw], labels[draw], 5, index=draw)
        assert got[4] is None and want[4] is None and got[:4] == pytest.approx(want[:4], rel=1e-12)
