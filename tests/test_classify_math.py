"""ResNet-32, the classifier-only LT losses, the LDAM-DRW schedule and the classification
metrics, each against its formula on tiny hand-computable inputs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.classify.training import random_crop_flip, to_classifier_input
from models.classify.metrics import classification_metrics, group_std, per_class_accuracy
from models.classify.lt_losses import (RECIPES, ClassifierLoss, EpochSchedule, class_balanced_weights, cross_entropy_loss,
                              ldam_loss, ldam_margins, logit_adjusted_loss)
from models.classify.resnet import count_parameters, resnet32


def test_resnet32_is_the_046m_cifar_network():
    net = resnet32(10, in_channels=3)
    # The LDAM-DRW / akamaster ResNet-32: 31 3x3 convs + BN + a 64->10 linear head, option-A
    # shortcuts without parameters.
    assert count_parameters(net) == 464_154
    assert abs(count_parameters(net) - 0.46e6) < 0.01e6
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 31 and all(m.kernel_size == (3, 3) for m in convs)
    assert [m.out_channels for m in convs].count(16) == 11 and [m.out_channels for m in convs].count(64) == 10
    grey = resnet32(10, in_channels=1)
    assert count_parameters(net) - count_parameters(grey) == 2 * 16 * 9  # only the stem differs
    assert grey(torch.zeros(2, 1, 32, 32)).shape == (2, 10)
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_normed_head_gives_cosine_logits():
    net = resnet32(7, in_channels=1, normed=True).eval()
    with torch.no_grad():
        logits = net(torch.randn(4, 1, 32, 32))
    assert logits.shape == (4, 7) and logits.abs().max() <= 1.0 + 1e-5


def test_cross_entropy_matches_negative_log_softmax():
    logits, y = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]]), torch.tensor([0, 2])
    by_hand = [-(2 - math.log(math.e ** 2 + 1 + math.e ** -1)), -(0 - math.log(2 * math.e ** 0.5 + 1))]
    assert cross_entropy_loss(logits, y).item() == pytest.approx(sum(by_hand) / 2, rel=1e-6)


def test_logit_adjusted_loss_by_hand_and_uniform_prior_is_ce():
    logits, y = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    log_prior = torch.log(torch.tensor([0.75, 0.25]))
    expected = -math.log(0.75 * math.e / (0.75 * math.e + 0.25))  # softmax(f + log π)_y
    assert logit_adjusted_loss(logits, y, log_prior, tau=1.0).item() == pytest.approx(expected, rel=1e-6)
    # τ = 2: f + 2 log π
    expected2 = -math.log(0.75 ** 2 * math.e / (0.75 ** 2 * math.e + 0.25 ** 2))
    assert logit_adjusted_loss(logits, y, log_prior, tau=2.0).item() == pytest.approx(expected2, rel=1e-5)
    uniform = torch.log(torch.full((2,), 0.5))
    z, t = torch.randn(5, 2), torch.randint(0, 2, (5,))
    assert logit_adjusted_loss(z, t, uniform).item() == pytest.approx(F.cross_entropy(z, t).item(), rel=1e-6)


def test_ldam_margins_and_loss_by_hand():
    margins = ldam_margins([16, 1], max_m=0.5)  # n^{-1/4} = [1/2, 1] -> scaled to max 0.5
    assert margins.tolist() == pytest.approx([0.25, 0.5])
    logits, y = torch.tensor([[0.5, 0.1]]), torch.tensor([0])
    expected = -math.log(math.exp(30 * 0.25) / (math.exp(30 * 0.25) + math.exp(30 * 0.1)))
    assert ldam_loss(logits, y, margins, s=30.0).item() == pytest.approx(expected, rel=1e-5)
    # only the label's logit moves: zero margins and s = 1 is plain CE
    z, t = torch.randn(6, 3), torch.randint(0, 3, (6,))
    assert ldam_loss(z, t, torch.zeros(3), s=1.0).item() == pytest.approx(F.cross_entropy(z, t).item(), rel=1e-6)


def test_class_balanced_weights_by_hand():
    w = class_balanced_weights([100, 10], beta=0.9)
    raw = np.array([0.1 / (1 - 0.9 ** 100), 0.1 / (1 - 0.9 ** 10)])
    assert w.tolist() == pytest.approx((raw / raw.sum() * 2).tolist(), rel=1e-6)
    assert class_balanced_weights([5000, 50, 5], beta=0.0).tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_ldam_drw_reweights_only_from_the_drw_epoch():
    schedule = EpochSchedule.scaled(10, 0.1)
    loss = ClassifierLoss(RECIPES["ldam_drw"], [100, 10], schedule, drw_beta=0.9)
    logits, y = torch.tensor([[0.2, 0.1], [0.3, -0.4], [0.0, 0.5]]), torch.tensor([0, 1, 1])
    m = ldam_margins([100, 10])
    plain = ldam_loss(logits, y, m)
    assert loss(logits, y, epoch=schedule.drw_epoch - 1).item() == pytest.approx(plain.item(), rel=1e-6)
    w = class_balanced_weights([100, 10], 0.9)
    per = F.cross_entropy(30 * (logits - F.one_hot(y, 2) * m[y][:, None]), y, reduction="none")
    weighted = (w[y] * per).sum() / w[y].sum()  # torch's weighted mean
    assert loss(logits, y, epoch=schedule.drw_epoch).item() == pytest.approx(weighted.item(), rel=1e-5)


def test_recipes_choose_loss_and_stream():
    assert RECIPES["rs"].resample == "balanced" and RECIPES["rs"].loss == "ce"
    assert RECIPES["ce"].resample == RECIPES["la"].resample == RECIPES["ldam_drw"].resample == "none"
    assert RECIPES["ldam_drw"].normed_head and RECIPES["ldam_drw"].drw


def test_epoch_schedule_is_ldam_drws_and_scales():
    s = EpochSchedule.scaled(200, 0.1)
    assert (s.warmup_epochs, s.decay_epochs, s.drw_epoch) == (5, (160, 180), 160)
    lrs = {e: s.lr_at(e) for e in (0, 4, 5, 159, 160, 179, 180, 199)}
    assert lrs == pytest.approx({0: 0.02, 4: 0.1, 5: 0.1, 159: 0.1, 160: 1e-3, 179: 1e-3, 180: 1e-5, 199: 1e-5})
    assert not s.drw_active(159) and s.drw_active(160)
    small = EpochSchedule.scaled(10, 0.1)
    assert (small.warmup_epochs, small.decay_epochs, small.drw_epoch) == (1, (8, 9), 8)
    assert [small.lr_at(e) for e in range(10)] == pytest.approx([0.1] * 8 + [1e-3, 1e-5])


def test_cosine_schedule_warms_up_per_iteration_and_decays_to_zero():
    s = EpochSchedule.scaled(3, 0.1, kind="cosine")  # 1 warm-up epoch; 10 iterations per epoch
    assert s.lr_at(0, 0, 10) == pytest.approx(0.01) and s.lr_at(0, 9, 10) == pytest.approx(0.1)
    assert s.lr_at(1, 0, 10) == pytest.approx(0.1)  # the cosine starts at lr ...
    assert s.lr_at(2, 0, 10) == pytest.approx(0.05)  # ... is lr/2 half-way through its 20 iterations ...
    assert s.lr_at(2, 9, 10) == pytest.approx(0.05 * (1 + math.cos(math.pi * 19 / 20)))  # ... and ~0 at the last
    assert s.lr_at(2, 99, 10) == s.lr_at(2, 9, 10)  # a longer epoch than expected stays at its last value
    lrs = [s.lr_at(e, i, 10) for e in range(3) for i in range(10)]
    assert all(a > b for a, b in zip(lrs[10:], lrs[11:]))  # strictly decreasing after the warm-up
    assert s.drw_active(2) and not s.drw_active(1)  # DRW still switches per epoch
    assert EpochSchedule.scaled(3, 0.1).lr_at(2, 5, 10) == pytest.approx(1e-3)  # `step` ignores the iteration
    with pytest.raises(ValueError, match="unknown classifier lr schedule 'linear'"):
        EpochSchedule.scaled(3, 0.1, kind="linear")


def test_group_std_reproduces_diffrc_table3():
    # DiffRC Table 3 (ImageNet-LT): many / medium / few -> Std
    assert group_std([66.5, 39.0, 8.6]) == pytest.approx(23.6, abs=0.05)
    assert group_std([65.2, 49.3, 26.9]) == pytest.approx(15.7, abs=0.05)
    assert group_std([63.7, 51.3, 31.1]) == pytest.approx(13.4, abs=0.05)
    # (its last row, 64.3 / 52.1 / 32.5, gives 13.10 against the printed 13.0)


def test_classification_metrics_by_hand():
    from sklearn.metrics import precision_recall_fscore_support

    y_true = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    y_pred = np.array([0, 0, 1, 0, 2, 0, 0, 0])
    assert per_class_accuracy(y_true, y_pred, 4).tolist() == [1.0, 0.5, 0.5, 0.0]
    groups = {"many": [0], "medium": [1, 2], "few": [3]}
    m = classification_metrics(y_true, y_pred, 4, groups)
    assert m["accuracy"] == pytest.approx(4 / 8) and m["balanced_accuracy"] == pytest.approx(0.5)
    assert (m["many_accuracy"], m["medium_accuracy"], m["few_accuracy"]) == (1.0, 0.5, 0.0)
    assert m["group_std"] == pytest.approx(np.std([1.0, 0.5, 0.0]))
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average="macro", zero_division=0)
    assert (m["macro_precision"], m["macro_recall"], m["macro_f1"]) == pytest.approx((p, r, f))
    # precision of class 0 by hand: 2 of its 6 predictions are right
    assert m["macro_precision"] == pytest.approx((2 / 6 + 1 + 1 + 0) / 4)


def test_random_crop_flip_is_a_crop_of_the_padded_image_and_reproducible():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6)
    out = random_crop_flip(x, torch.Generator().manual_seed(3), padding=2)
    again = random_crop_flip(x, torch.Generator().manual_seed(3), padding=2)
    assert torch.equal(out, again) and out.shape == x.shape
    padded = F.pad(x, (2, 2, 2, 2), value=-1.0)
    for b in range(2):
        crops = [padded[b, :, i:i + 6, j:j + 6] for i in range(5) for j in range(5)]
        assert any(torch.equal(out[b], c) or torch.equal(out[b], c.flip(-1)) for c in crops)


def test_classifier_input_centres_small_images_on_black():
    images = torch.full((1, 28, 28, 1), 255, dtype=torch.uint8)
    x = to_classifier_input(images)
    assert x.shape == (1, 1, 32, 32)
    assert x[0, 0, 2:30, 2:30].eq(1.0).all() and x[0, 0, :2].eq(-1.0).all()
