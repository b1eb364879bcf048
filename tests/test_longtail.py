"""Long-tailed construction against the CIFAR-LT recipe (LDAM-DRW) and the published counts."""
import numpy as np
import pytest

from models.data.longtail import (
    counts_by_label,
    long_tailed_counts,
    resolve_class_order,
    select_long_tailed,
)

CIFAR10_LT = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
FMNIST_LT = [6000, 3596, 2156, 1292, 774, 464, 278, 166, 100, 60]


def test_exp_counts_match_published_benchmarks():
    assert long_tailed_counts(5000, 10, "exp", 0.01) == CIFAR10_LT
    assert sum(CIFAR10_LT) == 12406
    assert long_tailed_counts(6000, 10, "exp", 0.01) == FMNIST_LT
    cifar100 = long_tailed_counts(500, 100, "exp", 0.01)
    assert (cifar100[0], cifar100[-1], sum(cifar100)) == (500, 5, 10847)


def test_exp_counts_are_the_reference_expression_truncated():
    # n_c = int(n_max * imb ** (c / (C - 1))), term by term, for another imbalance
    expected = [int(5000 * (0.1 ** (c / 9.0))) for c in range(10)]
    assert long_tailed_counts(5000, 10, "exp", 0.1) == expected
    assert expected[-1] == 500


def test_step_profile_and_balanced_limit():
    assert long_tailed_counts(5000, 10, "step", 0.01) == [5000] * 5 + [50] * 5
    assert long_tailed_counts(5000, 10, "exp", 1.0) == [5000] * 10
    # odd C: the tail half gets the extra class (the reference code silently drops it)
    assert long_tailed_counts(100, 5, "step", 0.1) == [100, 100, 10, 10, 10]


@pytest.mark.parametrize("imb", [0.0, -0.5, 1.5])
def test_imb_factor_outside_unit_interval_is_rejected(imb):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        long_tailed_counts(100, 10, "exp", imb)


def _ldam_reference(targets, img_num_per_cls, seed=0):
    """The LDAM-DRW IMBALANCECIFAR10.gen_imbalanced_data loop, written out as released."""
    np.random.seed(seed)
    targets_np = np.array(targets, dtype=np.int64)
    selected = []
    for the_class, the_img_num in zip(np.unique(targets_np), img_num_per_cls):
        idx = np.where(targets_np == the_class)[0]
        np.random.shuffle(idx)
        selected.append(idx[:the_img_num])
    return np.concatenate(selected)


def test_selection_reproduces_the_reference_draw():
    rng = np.random.default_rng(5)
    labels = rng.permutation(np.repeat(np.arange(10), 500))  # balanced, shuffled like CIFAR
    counts = long_tailed_counts(500, 10, "exp", 0.01)
    ours = select_long_tailed(labels, counts, seed=0)
    assert np.array_equal(ours, _ldam_reference(labels, counts, seed=0))
    assert np.bincount(labels[ours], minlength=10).tolist() == counts
    state = np.random.get_state()
    select_long_tailed(labels, counts, seed=0)
    assert np.array_equal(np.random.get_state()[1], state[1])  # global RNG untouched


def test_class_order_moves_the_tail():
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert resolve_class_order(None, names) == list(range(10))
    assert resolve_class_order("reverse", names) == list(range(10))[::-1]
    shifted = ["horse", "bird", "frog", "deer", "dog", "cat", "truck", "airplane", "automobile", "ship"]
    order = resolve_class_order(shifted, names)  # the OC paper's shifted-categories table
    assert order == [7, 2, 6, 4, 5, 3, 9, 0, 1, 8]
    by_label = counts_by_label(CIFAR10_LT, order)
    assert by_label[7] == 5000 and by_label[8] == 50 and sorted(by_label, reverse=True) == CIFAR10_LT
    random_order = resolve_class_order("random", names, seed=3)
    assert sorted(random_order) == list(range(10)) and random_order == resolve_class_order("random", names, seed=3)


@pytest.mark.parametrize("bad", [["horse"], [0, 0, 1, 2, 3, 4, 5, 6, 7, 8], ["zebra"] + list(range(9)), "sideways"])
def test_class_order_rejects_incomplete_or_unknown(bad):
    with pytest.raises(ValueError, match="class"):
        resolve_class_order(bad, [str(i) for i in range(10)])
