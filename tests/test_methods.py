"""Each long-tail method against its paper's equation, on tiny tensors and stub nets."""
import math

import pytest
import torch
from torch import nn

import dataclasses

from models.methods.base import ddpm_loss
from models.methods.cbdm import cbdm_terms, label_set_probs
from models.methods.diffrop import (check_shared_draws, diffrop_term, paired_draws, pair_mask, pairwise_penalty,
                                    tau_of_t)
from models.methods.oc import oc_target, selection_logits, transfer_probability_curve
from models.methods.registry import METHODS, default_options, make_loss, method_needs, method_parts, used_sections
from models.methods.reweight import class_weights
from models.diffusion.schedule import NoiseSchedule
from models.diffusion.training import TrainHParams, make_train_state, train_step
from models.diffusion.unet import UNet, UNetConfig

SCHEDULE = NoiseSchedule()


class StubNet(nn.Module):
    """ε_θ(x, t, y) = a[y]·x + b[y]: outputs we choose, gradients we can derive by hand."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.a = nn.Parameter(torch.linspace(0.5, 1.5, num_classes + 1))
        self.b = nn.Parameter(torch.linspace(-0.2, 0.3, num_classes + 1))
        self.null_label = num_classes

    def forward(self, x, t, y):
        return self.a[y].view(-1, 1, 1, 1) * x + self.b[y].view(-1, 1, 1, 1)


def batch(B=6, seed=0, D=4):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(B, 1, D, D, generator=g) * 2 - 1
    t = torch.randint(0, 1000, (B,), generator=g)
    noise = torch.randn(B, 1, D, D, generator=g)
    return x0, t, noise


def options(**kw):
    """Default options of every method section, with `section_field=value` overrides (cbdm_tau=0)."""
    opts = default_options()
    for key, value in kw.items():
        section = next(s for s in opts if key.startswith(s + "_"))
        opts[section] = dataclasses.replace(opts[section], **{key[len(section) + 1:]: value})
    return opts


def loss_of(name, net, x0, y, counts, t, noise, seed=0, inputs=None, **opts):
    fn = make_loss(name, options(**opts), counts)
    return fn(net, x0, y, SCHEDULE, t=t, noise=noise, generator=torch.Generator().manual_seed(seed), **(inputs or {}))


# ---------------------------------------------------------------------------------------------
# DDPM identities


@pytest.mark.parametrize("name, opts", [("ddpm", {}), ("cbdm", {"cbdm_tau": 0.0}), ("t2h", {"oc_cutoff": 0}),
                                        ("h2t", {"oc_cutoff": 0}), ("diffrop", {"diffrop_tau0": 0.0}),
                                        ("cbdm+diffrop", {"cbdm_tau": 0.0, "diffrop_tau0": 0.0}),
                                        ("reweight", {"reweight_power": 0.0})])
def test_disabled_methods_equal_ddpm_exactly(name, opts):
    x0, t, noise = batch()
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    net = StubNet()
    ref = ddpm_loss(net, x0, y, SCHEDULE, t=t, noise=noise)["loss"]
    got = loss_of(name, net, x0, y, [50, 20, 5], t, noise, **opts)["loss"]
    assert torch.equal(got, ref)


# ---------------------------------------------------------------------------------------------
# CBDM (Eq. 4, Alg. 1)


def test_cbdm_matches_equation_4_by_hand():
    x0, t, noise = batch()
    y = torch.tensor([0, 0, 2, 3, 0, 2])  # sample 3 is label-dropped (null = 3)
    net = StubNet()
    counts = [0, 7, 0]  # the train label set then always draws y' = 1
    out = loss_of("cbdm", net, x0, y, counts, t, noise, cbdm_tau=1.0, cbdm_gamma=0.25)
    x_t = SCHEDULE.q_sample(x0, t, noise)
    with torch.no_grad():
        eps_y, eps_p = net(x_t, t, y), net(x_t, t, torch.ones_like(y))
    w = t.float() / 1000 * (y != 3).float()
    mse = (eps_y - noise).pow(2).flatten(1).mean(1)
    gap = (eps_y - eps_p).pow(2).flatten(1).mean(1)
    assert torch.allclose(out["loss"], mse + w * gap + 0.25 * w * gap, atol=1e-6)
    assert out["cbdm_reg"][3] == 0 and out["cbdm_commit"][3] == 0


def test_cbdm_stop_gradients_act_on_the_right_side():
    """d/d a[y]: DDPM + 2w(ε_y − ε_y')·x_t ; d/d a[y']: only γ·2w(ε_y' − ε_y)·x_t (commitment)."""
    x_t = torch.full((1, 1, 1, 1), 0.5)
    t, y, yp = torch.tensor([600]), torch.tensor([0]), torch.tensor([[1]])
    net = StubNet()
    eps = net(x_t, t, y)
    eps_prime = net(x_t, t, yp[0])[None]  # (K=1, B, ...)
    terms = cbdm_terms(eps, eps_prime, t, y != 3, tau=1.0, gamma=0.25, T=1000)
    (terms["cbdm_reg"] + terms["cbdm_commit"]).sum().backward()
    with torch.no_grad():
        e0, e1 = net(x_t, t, y).item(), net(x_t, t, yp[0]).item()
    w = 0.6
    assert net.a.grad[0].item() == pytest.approx(2 * w * (e0 - e1) * 0.5, rel=1e-5)
    assert net.a.grad[1].item() == pytest.approx(0.25 * 2 * w * (e1 - e0) * 0.5, rel=1e-5)


def test_cbdm_batched_and_separate_forwards_agree():
    x0, t, noise = batch()
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    a = loss_of("cbdm", StubNet(), x0, y, [50, 20, 5], t, noise, cbdm_num_labels=3, cbdm_batched=True)
    b = loss_of("cbdm", StubNet(), x0, y, [50, 20, 5], t, noise, cbdm_num_labels=3, cbdm_batched=False)
    assert torch.allclose(a["loss"], b["loss"], atol=1e-6)


def test_cbdm_optimum_is_the_oc_papers_appendix_d_identity():
    """A free ε_θ(x_t, y) trained on L_CBDM converges to (ε + w·mean ε(y')) / (1 + w)."""

    class FreeNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.zeros(4, 1, 2, 2))
            with torch.no_grad():
                self.table[1] = 0.7
                self.table[2] = -0.4
            self.null_label = 3

        def forward(self, x, t, y):
            return self.table[y]

    net = FreeNet()
    eps = torch.tensor([[[[0.3, -1.0], [0.5, 2.0]]]])
    x_t, t, y = torch.zeros(1, 1, 2, 2), torch.tensor([800]), torch.tensor([0])
    yp = torch.tensor([[1], [2]])  # |𝒴| = 2
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(1500):
        opt.zero_grad()
        pred = net(x_t, t, y)
        eps_prime = torch.stack([net(x_t, t, yp[k]) for k in range(2)])
        terms = cbdm_terms(pred, eps_prime, t, y != 3, tau=1.0, gamma=0.0, T=1000)
        ((pred - eps).pow(2).mean() + terms["cbdm_reg"].sum()).backward()
        opt.step()
    w = 0.8
    expected = (eps + w * (net.table[1] + net.table[2]).detach() / 2) / (1 + w)
    assert torch.allclose(net.table[0].detach(), expected[0], atol=1e-3)


def test_cbdm_label_sets():
    counts = torch.tensor([100, 25, 4])
    assert torch.allclose(label_set_probs(counts, "train"), torch.tensor([100, 25, 4]) / 129.0)
    assert torch.allclose(label_set_probs(counts, "balanced"), torch.full((3,), 1 / 3))
    assert torch.allclose(label_set_probs(counts, "sqrt"), torch.tensor([10.0, 5.0, 2.0]) / 17)


# ---------------------------------------------------------------------------------------------
# OC (Eq. 6–8, Alg. 1)


def test_selection_probabilities_by_hand():
    x0 = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]).view(3, 1, 1, 2)
    t = torch.tensor([500, 500, 500])
    x_t = torch.tensor([[0.1, 0.2], [0.5, -0.3], [0.0, 1.0]]).view(3, 1, 1, 2)
    ab = SCHEDULE.alpha_bar[500].item()
    logits = selection_logits(x0, x_t, t, SCHEDULE.alpha_bar)
    for i in range(3):
        for z in range(3):
            d = ((x_t[i] - math.sqrt(ab) * x0[z]) ** 2).sum().item()
            assert logits[i, z].item() == pytest.approx(-d / (2 * (1 - ab)), rel=1e-4, abs=1e-5)
    log_q = torch.tensor([0.5, 0.3, 0.2]).log()
    weighted = selection_logits(x0, x_t, t, SCHEDULE.alpha_bar, log_q, beta=1.0)
    assert torch.allclose(weighted - logits, log_q.expand(3, 3), atol=1e-5)


def _oc_runs(mode, trials=40):
    counts = torch.tensor([60, 20, 5, 1])
    freq = counts.float() / counts.sum()
    for seed in range(trials):
        x0, _, noise = batch(B=8, seed=seed)
        t = torch.randint(600, 1000, (8,), generator=torch.Generator().manual_seed(seed))
        y = torch.randint(0, 4, (8,), generator=torch.Generator().manual_seed(100 + seed))
        x_t = SCHEDULE.q_sample(x0, t, noise)
        target, z, _ = oc_target(x0, x_t, t, noise, y, freq, SCHEDULE.alpha_bar, mode=mode,
                                 generator=torch.Generator().manual_seed(seed))
        yield x0, x_t, t, noise, y, freq, target, z


def test_t2h_never_takes_a_rarer_target_and_h2t_never_a_more_frequent_one():
    moved = {"t2h": 0, "h2t": 0}
    for mode in moved:
        for x0, x_t, t, noise, y, freq, target, z in _oc_runs(mode):
            if mode == "t2h":
                assert (freq[y[z]] >= freq[y]).all()
            else:
                assert (freq[y[z]] <= freq[y]).all()
            moved[mode] += int((z != torch.arange(8)).sum())
            # the new target makes x_0^(z) the clean image of x_t
            ab = SCHEDULE.alpha_bar[t].view(-1, 1, 1, 1)
            assert torch.allclose(target, (x_t - ab.sqrt() * x0[z]) / (1 - ab).sqrt(), atol=1e-4)
    assert moved["t2h"] > 0 and moved["h2t"] > 0  # the test exercised real transfers


def test_oc_keeps_the_own_target_as_sigma_goes_to_zero_and_below_the_cutoff():
    x0, _, noise = batch(B=8)
    y = torch.arange(8) % 4
    freq = torch.full((4,), 0.25)
    t = torch.zeros(8, dtype=torch.long)  # σ_t² = 1 − ᾱ_0 = 1e-4
    x_t = SCHEDULE.q_sample(x0, t, noise)
    target, z, _ = oc_target(x0, x_t, t, noise, y, freq, SCHEDULE.alpha_bar, mode="full")
    assert torch.equal(z, torch.arange(8)) and torch.equal(target, noise)
    t = torch.full((8,), 999)
    x_t = SCHEDULE.q_sample(x0, t, noise)
    target, z, p = oc_target(x0, x_t, t, noise, y, freq, SCHEDULE.alpha_bar, mode="full", cutoff=999)
    assert torch.equal(z, torch.arange(8)) and p.min() > 0.5  # transfer was likely, the cutoff forbade it


def test_oc_targets_carry_no_gradient():
    x0, t, noise = batch()
    x0.requires_grad_(True)
    x_t = SCHEDULE.q_sample(x0, t, noise)
    target, _, _ = oc_target(x0, x_t, t, noise, torch.zeros(6, dtype=torch.long), torch.ones(1), SCHEDULE.alpha_bar)
    assert not target.requires_grad


def test_transfer_probability_rises_with_t():
    x0 = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    curve = transfer_probability_curve(x0, SCHEDULE.alpha_bar, [0, 100, 900, 999],
                                       generator=torch.Generator().manual_seed(0))
    assert curve[0] < 0.01 and curve[-1] > 0.9
    assert all(b >= a - 0.01 for a, b in zip(curve, curve[1:]))  # saturated near T: allow noise


# ---------------------------------------------------------------------------------------------
# DiffROP (Eq. 7–15, Alg. 1)


def _view(B, groups, seed=3, D=4):
    """Caller-given paired-view draws: group ids, one (t, ε) per group."""
    group = torch.tensor(groups)
    g = torch.Generator().manual_seed(seed)
    t_g = torch.randint(0, 1000, (int(group.max()) + 1,), generator=g)
    e_g = torch.randn(int(group.max()) + 1, 1, D, D, generator=g)
    return group, t_g[group], e_g[group]


def test_diffrop_sums_over_partners_of_other_classes_in_the_group():
    mean = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    y, group = torch.tensor([0, 1, 2, 1, 0]), torch.tensor([0, 0, 0, 0, 1])
    t = torch.full((5,), 300)
    term = diffrop_term(mean, y, group, t, T=1000, form="reciprocal", tau0=1.0, temperature=1.0)
    d = lambda i, j: (mean[i] - mean[j]).pow(2).sum().item()  # noqa: E731 - summed over pixels (Alg. 1)
    tau = math.exp(-0.3)
    assert term[0].item() == pytest.approx(tau * (1 / (1 + d(0, 1)) + 1 / (1 + d(0, 2)) + 1 / (1 + d(0, 3))), rel=1e-5)
    assert term[1].item() == pytest.approx(tau * (1 / (1 + d(1, 0)) + 1 / (1 + d(1, 2))), rel=1e-5)  # not 3: same class
    assert term[4] == 0  # alone in its group


@pytest.mark.parametrize("form, f", [("neg_l2", lambda d: -d), ("hinge", lambda d: max(0.0, 2.0 - d)),
                                     ("reciprocal", lambda d: 1 / (1 + d)), ("exponential", lambda d: math.exp(-d))])
def test_diffrop_forms_and_tau_by_hand_through_the_loss(form, f):
    x0, t, noise = batch(B=2)
    group, tp, ep = _view(2, [0, 0])
    y = torch.tensor([0, 2])
    net = StubNet()
    out = loss_of("diffrop", net, x0, y, [5, 5, 5], t, noise, inputs={"diffrop_pairs": (group, tp, ep)},
                  diffrop_form=form, diffrop_tau0=0.5, diffrop_temperature=0.25, diffrop_margin=2.0)
    x_t = SCHEDULE.q_sample(x0, tp, ep)
    eps = net(x_t, tp, y)
    s = int(tp[0])
    a_t, b_t, ab = 1 - SCHEDULE.betas[s], SCHEDULE.betas[s], SCHEDULE.alpha_bar[s]
    mu = (x_t - b_t / (1 - ab).sqrt() * eps) / a_t.sqrt()  # Eq. 9
    d = (mu[0] - mu[1]).pow(2).sum().item()
    tau = 0.5 * math.exp(-(s / 1000) / 0.25)
    assert out["diffrop"][0].item() == pytest.approx(tau * f(d), rel=1e-4, abs=1e-7)
    assert tau_of_t(torch.tensor([0]), 1000, 0.5, 0.25).item() == pytest.approx(0.5)
    # the DDPM term keeps the main view's own independent draws
    assert torch.allclose(out["mse"], ddpm_loss(net, x0, y, SCHEDULE, t=t, noise=noise)["mse"])


def test_diffrop_kl_distance_carries_eq8s_one_over_two_sigma_squared():
    x0, t, noise = batch(B=2)
    view = _view(2, [0, 0])
    net = StubNet()
    kw = dict(inputs={"diffrop_pairs": view}, diffrop_form="neg_l2", diffrop_tau0=1.0)
    l2 = loss_of("diffrop", net, x0, torch.tensor([0, 1]), [5, 5, 5], t, noise, **kw)["diffrop"]
    kl = loss_of("diffrop", net, x0, torch.tensor([0, 1]), [5, 5, 5], t, noise, diffrop_distance="kl", **kw)["diffrop"]
    beta = SCHEDULE.betas[view[1][0]].item()
    assert torch.allclose(kl, l2 / (2 * beta), rtol=1e-4)


def test_diffrop_posterior_margin_is_inactive_when_the_model_is_the_data():
    """Eq. 15's D_t from the true posteriors: a model whose means equal them pays nothing."""
    x0, t, noise = batch(B=4)
    group, tp, ep = _view(4, [0, 0, 1, 1])

    class Oracle(nn.Module):  # predicts the true ε of the paired view's x_t
        null_label = 3

        def forward(self, x, t_, y):
            ab = SCHEDULE.alpha_bar[t_].view(-1, 1, 1, 1)
            return (x - ab.sqrt() * x0.repeat(len(x) // len(x0), 1, 1, 1)) / (1 - ab).sqrt()

    out = loss_of("diffrop", Oracle(), x0, torch.tensor([0, 1, 2, 0]), [5, 5, 5], tp, ep,
                  inputs={"diffrop_pairs": (group, tp, ep)}, diffrop_form="hinge", diffrop_margin_schedule="posterior")
    assert out["diffrop"].abs().max().item() < 1e-3
    assert (out["diffrop_pairs"] > 0).all()


def test_diffrop_refuses_pairs_that_do_not_share_t_and_noise():
    group, t, noise = _view(4, [0, 0, 1, 1])
    check_shared_draws(group, t, noise)
    iid_t = t.clone()
    iid_t[1] = (iid_t[1] + 1) % 1000  # i.i.d. draws inside a group: Eq. 12's pairs do not exist
    with pytest.raises(ValueError, match="share t and"):
        check_shared_draws(group, iid_t, noise)
    x0, _, _ = batch(B=1)
    with pytest.raises(ValueError, match="at least 2"):
        paired_draws(x0, 1000, 8)


def test_paired_draws_share_t_and_noise_within_random_groups():
    x0 = torch.zeros(10, 1, 2, 2)
    group, t, noise = paired_draws(x0, 1000, 4, torch.Generator().manual_seed(0))
    assert torch.bincount(group).tolist() == [4, 4, 2]
    for g in range(3):
        idx = (group == g).nonzero().flatten()
        assert (t[idx] == t[idx[0]]).all() and all(torch.equal(noise[i], noise[idx[0]]) for i in idx)
    assert group.tolist() != sorted(group.tolist())  # the grouping is drawn, not the batch order
    assert pair_mask(torch.tensor([0, 0, 1]), torch.tensor([0, 0, 0])).sum() == 4


def test_diffrop_negative_l2_pushes_means_apart():
    mean = torch.tensor([[0.0], [0.1]], requires_grad=True)
    term = diffrop_term(mean, torch.tensor([0, 1]), torch.tensor([0, 0]), torch.tensor([0, 0]), T=1000, form="neg_l2")
    term.sum().backward()
    assert mean.grad[0].item() > 0 and mean.grad[1].item() < 0  # descent moves them apart
    assert pairwise_penalty(torch.tensor([3.0]), "hinge", 2.0).item() == 0.0


# ---------------------------------------------------------------------------------------------
# Reweighting, registry, composition


def test_reweighting_is_inverse_frequency_with_unit_mean():
    counts = torch.tensor([600, 100, 40])
    w = class_weights(counts, 1.0)
    assert torch.allclose(w * counts, torch.full((3,), counts.sum() / 3.0), rtol=1e-5)
    assert (w * counts).sum().item() / counts.sum().item() == pytest.approx(1.0)
    x0, t, noise = batch(B=3)
    y = torch.tensor([0, 1, 2])
    net = StubNet()
    out = loss_of("reweight", net, x0, y, counts.tolist(), t, noise)
    assert torch.allclose(out["loss"], w * out["mse"], atol=1e-6)


def test_composition_and_bad_combinations():
    opts = default_options()
    assert [m.name for m in method_parts("t2h+cbdm")] == ["t2h", "cbdm"]
    assert used_sections("t2h+cbdm") == {"oc", "cbdm"} and used_sections("rs") == set()
    assert method_needs("cbdm+diffrop+rs", opts).resample == "balanced"
    assert method_needs("t2h", {**opts, "oc": dataclasses.replace(opts["oc"], batch_resample=True)}).resample == \
        "balanced_batch"
    for bad in ("t2h+h2t", "rs+rs_sqrt", "cbdm+magic", ""):
        with pytest.raises(ValueError):
            make_loss(bad, opts, [3, 2, 1])


@pytest.mark.parametrize("name", sorted(METHODS) + ["t2h+cbdm", "cbdm+diffrop"])
def test_every_method_trains_two_steps_through_train_step(name):
    torch.manual_seed(0)
    net = UNet(UNetConfig(in_channels=1, num_classes=3, ch=32, ch_mult=(1, 2), attn_levels=(1,), num_res_blocks=1))
    hp = TrainHParams(lr=1e-3, warmup_steps=1, p_uncond=0.2)
    state = make_train_state(net, hp, seed=0)
    loss_fn = make_loss(name, options(diffrop_group_size=4), [40, 10, 3], T=100)
    x0 = torch.rand(8, 1, 8, 8) * 2 - 1
    y = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    inputs = {}
    if method_needs(name, default_options()).source_model:  # DiffRC: a frozen copy as the source
        import copy

        inputs["source"] = copy.deepcopy(state.net).eval().requires_grad_(False)
    before = [p.detach().clone() for p in state.net.parameters()]
    logs = [train_step(state, x0, y, loss_fn, NoiseSchedule(T=100), hp, **inputs) for _ in range(2)]
    assert state.step == 2 and all(torch.isfinite(v).all() for log in logs for v in log.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, state.net.parameters()))


def test_unconditional_oc_gates_on_the_data_labels():
    """Unconditional training feeds the null label; T2H still gates by the samples' true classes."""
    counts = torch.tensor([60, 20, 5, 1])
    fn = make_loss("t2h", default_options(), counts.tolist())
    net = StubNet(num_classes=4)
    moved = 0
    for seed in range(20):
        x0, _, noise = batch(B=8, seed=seed)
        t = torch.full((8,), 900)
        y_true = torch.randint(0, 4, (8,), generator=torch.Generator().manual_seed(seed))
        y_null = torch.full((8,), net.null_label)
        out = fn(net, x0, y_null, SCHEDULE, t=t, noise=noise, y_true=y_true,
                 generator=torch.Generator().manual_seed(seed))
        x_t = SCHEDULE.q_sample(x0, t, noise)
        target, z, _ = oc_target(x0, x_t, t, noise, y_true, counts.float() / counts.sum(), SCHEDULE.alpha_bar,
                                 mode="t2h", generator=torch.Generator().manual_seed(seed))
        expected = (net(x_t, t, y_null) - target).pow(2).flatten(1).mean(1)
        assert torch.allclose(out["mse"], expected.detach(), atol=1e-6)
        assert (counts[y_true[z]] >= counts[y_true]).all()
        moved += int(out["oc_moved"].sum())
    assert moved > 0


def test_oc_selection_stays_fp32_under_bf16_autocast():
    x0, t, noise = batch(B=8, D=16)
    t = torch.full((8,), 500)
    x_t = SCHEDULE.q_sample(x0, t, noise)
    plain = selection_logits(x0, x_t, t, SCHEDULE.alpha_bar)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = selection_logits(x0, x_t, t, SCHEDULE.alpha_bar)
    assert under.dtype == torch.float32 and torch.allclose(plain, under)
