"""DiffRC (Eq. 5–13) on hand-computable inputs: the pair-wise diversity loss, the prototype
contrastive loss and its EMA prototypes, and the guidance on every sampler."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.diffusion.guidance import CFGDenoiser, ClassifierGuidance, ImageNoise
from models.diffusion.samplers import SAMPLERS, generate
from models.diffusion.schedule import NoiseSchedule
from models.methods.diffrc import (DiffRCOptions, PrototypeNet, guidance_direction, head_classes, pair_kl,
                                   prototype_contrastive_loss, prototype_logits, update_prototypes)
from models.methods.registry import default_options, make_loss, method_needs

SCHEDULE = NoiseSchedule()


class StubNet(nn.Module):
    def __init__(self, scale=1.0, num_classes=4):
        super().__init__()
        self.a = nn.Parameter(torch.full((num_classes + 1,), float(scale)))
        self.null_label = num_classes

    def forward(self, x, t, y):
        return self.a[y].view(-1, 1, 1, 1) * x + 0.1 * torch.sin(x * 3)


def test_pair_loss_is_zero_when_the_target_is_the_source():
    x0 = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([3, 3, 3, 2, 2, 0])
    kl = pair_kl(x0, x0, labels, torch.tensor([100, 50, 10, 1]), head=[0], gamma=0.1)
    # γ^{N_k} scales only the target's logits: equal inputs differ by the 1/(1+γ^N) factor alone
    assert kl[5] == 0  # head class
    assert kl[:5].abs().max() < 1e-3  # 0.1^10 ≈ 0 and 0.1^1 = 0.1 for class 3: small but not exact
    exact = pair_kl(x0, x0, labels, torch.tensor([100, 50, 10, 1000]), head=[0], gamma=0.1)
    assert exact.abs().max() < 1e-6


def test_pair_loss_by_hand_on_three_samples_with_gamma_scaling():
    tar = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    sou = torch.tensor([[1.0, 0.2], [0.1, 1.0], [1.0, -1.0]])
    labels, counts = torch.tensor([1, 1, 1]), torch.tensor([500, 2])
    kl = pair_kl(tar, sou, labels, counts, head=[0], gamma=0.1)
    scale = 1 / (1 + 0.1 ** 2)
    cos = lambda a, b: F.cosine_similarity(a[None], b[None]).item()  # noqa: E731
    for i in range(3):
        js = [j for j in range(3) if j != i]
        p_t = torch.tensor([cos(tar[i], tar[j]) * scale for j in js]).softmax(0)
        p_s = torch.tensor([cos(sou[i], sou[j]) for j in js]).softmax(0)
        assert kl[i].item() == pytest.approx((p_t * (p_t / p_s).log()).sum().item(), rel=1e-5)  # KL(p_tar ‖ p_sou)
    reverse = pair_kl(sou, tar, labels, counts, head=[0], gamma=0.1)
    assert not torch.allclose(kl, reverse)  # the direction matters


def test_head_classes_never_contribute_and_head_is_the_many_third():
    opts = DiffRCOptions()
    assert head_classes(opts, [6000, 3596, 2156, 1292, 774, 464, 278, 166, 100, 60]) == [0, 1, 2]
    assert head_classes(dataclasses.replace(opts, head="threshold", head_threshold=1000), [1200, 999, 3000]) == [0, 2]
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    kl = pair_kl(x, x.flip(0), torch.tensor([0, 0, 1, 1]), torch.tensor([9, 9]), head=[0, 1], gamma=0.1)
    assert torch.equal(kl, torch.zeros(4))


def test_source_gets_no_gradient_and_the_loss_trains_the_target():
    opts = default_options()
    loss = make_loss("diffrc_cfg", opts, [100, 50, 10, 5])
    target, source = StubNet(1.0), StubNet(0.7)
    x0 = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([2, 2, 2, 3, 3, 3, 0, 1])
    out = loss(target, x0, y, SCHEDULE, generator=torch.Generator().manual_seed(0), source=source)
    out["loss"].mean().backward()
    assert source.a.grad is None and target.a.grad is not None
    assert out["diffrc_pair"][6:].abs().sum() == 0 and out["diffrc_pair"][:6].abs().sum() > 0
    assert method_needs("diffrc", opts).resample == "balanced_batch" and not method_needs("diffrc", opts).conditional
    with pytest.raises(ValueError, match="source"):
        loss(target, x0, y, SCHEDULE, generator=torch.Generator().manual_seed(0))


def test_pair_kl_runs_in_fp32_under_bf16_autocast():
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([1, 1, 1, 2, 2, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the train step's forward on a bf16 CPU
        kl = pair_kl(x, x.flip(0), labels, torch.tensor([9, 9, 9]), head=[0], gamma=0.1)
    assert kl.dtype == torch.float32 and torch.allclose(kl, pair_kl(x, x.flip(0), labels, torch.tensor([9, 9, 9]),
                                                                    head=[0], gamma=0.1))


def test_pair_reduction_mean_averages_over_members_and_sum_is_eq9():
    from models.methods.diffrc import pair_members

    y = torch.tensor([2, 2, 2, 3, 3, 3, 0, 1])  # 6 members: classes 2 and 3; 0 is head, 1 a singleton
    assert pair_members(y, [0]).tolist() == [True] * 6 + [False, False]
    x0 = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    terms = {}
    for reduction in ("mean", "sum"):
        opts = default_options()
        opts["diffrc"] = dataclasses.replace(opts["diffrc"], pair_reduction=reduction)
        loss = make_loss("diffrc_cfg", opts, [100, 50, 10, 5])
        out = loss(StubNet(1.0), x0, y, SCHEDULE, generator=torch.Generator().manual_seed(0), source=StubNet(0.7))
        terms[reduction] = out["diffrc_pair"]
    kl_sum = terms["sum"].mean()  # Σ_i λ·KL_i (Eq. 9)
    assert terms["mean"].mean() == pytest.approx(kl_sum.item() / 6, rel=1e-5)  # λ·mean over the 6 members
    with pytest.raises(ValueError, match="pair_reduction"):
        dataclasses.replace(default_options()["diffrc"], pair_reduction="max").validate()


def test_unconditional_diffrc_feeds_the_null_label():
    seen = []

    class Spy(StubNet):
        def forward(self, x, t, y):
            seen.append(y.clone())
            return super().forward(x, t, y)

    loss = make_loss("diffrc", default_options(), [100, 50, 10, 5])
    x0 = torch.randn(4, 1, 2, 2)
    loss(Spy(), x0, torch.tensor([2, 2, 3, 3]), SCHEDULE, generator=torch.Generator().manual_seed(0), source=Spy())
    assert all(bool((y == 4).all()) for y in seen)


def test_prototype_contrastive_loss_is_equation_12_by_hand():
    feats = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=1)
    protos = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]), dim=1)
    prior = torch.tensor([0.7, 0.2, 0.1])
    labels = torch.tensor([0, 1])
    got = prototype_contrastive_loss(feats, labels, protos, prior, 0.5)  # τ = 0.07 saturates these inputs
    for i in range(2):
        num = prior[labels[i]] * math.exp(float(feats[i] @ protos[labels[i]]) / 0.5)
        den = sum(prior[j] * math.exp(float(feats[i] @ protos[j]) / 0.5) for j in range(3))
        assert got[i].item() == pytest.approx(-math.log(num / den), rel=1e-5)
    assert prototype_logits(feats, protos, prior, 0.07).shape == (2, 3)


def test_prototype_ema_update_and_normalisation():
    protos = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=1)
    f = F.normalize(torch.tensor([[0.0, 1.0]]), dim=1)
    update_prototypes(protos, f, torch.tensor([0]), momentum=0.9)
    expected = F.normalize(torch.tensor([0.9, 0.1]), dim=0)
    assert torch.allclose(protos[0], expected) and torch.allclose(protos[1], torch.tensor([0.0, 1.0]))
    assert protos.norm(dim=1).sub(1).abs().max() < 1e-6


def _features_net(seed=0):
    torch.manual_seed(seed)
    net = PrototypeNet(1, 3, ch=16, dim=8, ch_mult=(1, 2), groups=4).eval()
    return net


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_guidance_scale_zero_is_the_plain_sampler_bit_for_bit(sampler):
    net = _features_net()
    eps_net = StubNet(0.5, num_classes=3)
    schedule = NoiseSchedule(T=50)
    den = CFGDenoiser(eps_net, 1.0, 3)
    y = torch.tensor([0, 1, 2])
    plain = generate(den, schedule, ImageNoise([1, 2, 3], (1, 8, 8)), y, sampler=sampler, steps=5)
    guided = ClassifierGuidance(den, guidance_direction(net, 0.07), 0.0, schedule.alpha_bar)
    again = generate(guided, schedule, ImageNoise([1, 2, 3], (1, 8, 8)), y, sampler=sampler, steps=5)
    assert torch.equal(plain, again)


def test_guidance_gradient_is_normalised_and_raises_p_y_given_x():
    """−∇L_PC (the sign used) moves x_t toward class y's prototype: f's p(y | x_t) rises."""
    net = _features_net(3)
    with torch.no_grad():
        net.prototypes.copy_(F.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(4)), dim=1))
    grad_fn = guidance_direction(net, 0.07)
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    t, y = torch.full((6,), 300), torch.tensor([0, 1, 2, 0, 1, 2])
    p = lambda z: prototype_logits(net(z, t), net.prototypes, net.prior, 0.07).softmax(1)[torch.arange(6), y]  # noqa
    g = grad_fn(x, t, y)
    g_hat = g / g.flatten(1).pow(2).mean(1).sqrt().view(-1, 1, 1, 1)
    with torch.no_grad():
        assert (p(x + 0.05 * g_hat) > p(x)).all()
    wrapped = ClassifierGuidance(lambda a, b, c: torch.zeros_like(a), grad_fn, 1.0, SCHEDULE.alpha_bar)
    shift = wrapped(x, t, y) / -(1 - SCHEDULE.alpha_bar[300]).sqrt()
    assert torch.allclose(shift.flatten(1).pow(2).mean(1), torch.ones(6), atol=1e-4)  # ∇̂: unit RMS per image


def test_pcg_is_the_ddpm_loss_plus_the_guidance_and_plans_its_feature_network(make_config, tmp_path):
    """`pcg` ("DDPM + guidance alone", DiffRC's ablation baseline): exactly the DDPM loss, the
    prototype guidance with DiffRC's knobs, no source model; the train stage plans its feature
    network (and no source) whether it trains from scratch or is fine-tuned."""
    from pipeline.common.artifacts import DatasetArtifact
    from pipeline.stages.s2_train import plan_specs

    opts = {**default_options(), "diffrc": DiffRCOptions(guidance_scale=0.4, feature_steps=7)}
    torch.manual_seed(0)
    net, x0, y = StubNet(), torch.randn(6, 1, 4, 4), torch.tensor([0, 0, 1, 1, 2, 3])
    t, noise = torch.randint(0, 1000, (6,)), torch.randn(6, 1, 4, 4)
    pcg = make_loss("pcg", opts, [40, 20, 5, 3])(net, x0, y, SCHEDULE, t=t, noise=noise)
    ddpm = make_loss("ddpm", opts, [40, 20, 5, 3])(net, x0, y, SCHEDULE, t=t, noise=noise)
    assert torch.equal(pcg["loss"], ddpm["loss"])
    needs = method_needs("pcg", opts)
    assert (needs.guidance, needs.guidance_steps, needs.guidance_scale) == ("prototype", 7, 0.4)
    assert not needs.source_model and needs.conditional and needs.resample is None
    assert method_needs("cbdm+pcg", opts).guidance == "prototype"
    with pytest.raises(ValueError, match="two source models or two guidances"):
        method_needs("diffrc+pcg", opts)
    data = DatasetArtifact(tmp_path, {"class_names": list("abcd"), "class_counts": [40, 20, 5, 3],
                                      "image_shape": [8, 8, 1]}, False)
    scratch = plan_specs(make_config("digits_lt", "train.methods=[pcg]", "diffrc.feature_steps=7"), data)
    assert [[(s.name, s.kind, s.steps) for s in w] for w in scratch] == [[("pcg-features", "features", 7),
                                                                            ("pcg", "diffusion", scratch[0][1].steps)]]
    tuned = plan_specs(make_config("digits_lt", "train.methods=[ddpm,pcg]", "train.init_from=ddpm"), data)
    assert [[s.name for s in w] for w in tuned] == [["ddpm", "pcg-features"], ["pcg"]]
    assert tuned[1][0].init == "ddpm" and tuned[1][0].source is None


def test_run_keys_hold_only_what_shapes_each_model(make_config, tmp_path):
    """A λ sweep retrains the target only; s (a sampling knob) retrains nothing; the feature network's
    knobs retrain the feature network only; the head choice retrains the source (and so the target)."""
    from pipeline.common.artifacts import DatasetArtifact
    from pipeline.stages.s2_train import plan_specs, run_key

    data = DatasetArtifact(tmp_path, {"class_names": list("abcd"), "class_counts": [40, 20, 5, 3],
                                      "image_shape": [8, 8, 1], "config_hash": "x"}, False)

    def keys(*sets):
        cfg = make_config("digits_lt", "train.methods=[diffrc_cfg]", *sets)
        weights = cfg.run_dir / "train" / "diffrc_cfg-source" / "model.pt"  # the target's key stamps its source
        weights.parent.mkdir(parents=True, exist_ok=True)
        weights.write_bytes(b"source")
        return {s.name: run_key(cfg, data, s) for wave in plan_specs(cfg, data) for s in wave}

    base = keys()
    assert set(base) == {"diffrc_cfg-source", "diffrc_cfg-features", "diffrc_cfg"}
    changed = lambda other: {n for n in base if other[n] != base[n]}  # noqa: E731
    assert changed(keys("diffrc.lam=0.1")) == {"diffrc_cfg"}
    assert changed(keys("diffrc.guidance_scale=0.6")) == set()
    assert changed(keys("diffrc.temperature=0.1")) == {"diffrc_cfg-features"}
    assert "diffrc_cfg-source" in changed(keys("diffrc.head=threshold", "diffrc.head_threshold=10"))
