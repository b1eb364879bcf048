"""The diffusion core against its equations: schedule, UNet, guidance, samplers, train step."""
import io

import pytest
import torch

from models.data.images import to_model_space, to_uint8_images
from models.methods.base import ddpm_loss
from models.diffusion.guidance import CFGDenoiser, ImageNoise
from models.diffusion.samplers import SAMPLERS, ddim_sample, ddim_timesteps, ddpm_sample, generate
from models.diffusion.schedule import NoiseSchedule
from models.diffusion.training import (TrainHParams, checkpoint_state, drop_labels, make_train_state, restore_state,
                             train_step)
from models.diffusion.unet import UNet, UNetConfig, build_unet, count_parameters

TINY = dict(ch=32, ch_mult=(1, 2), attn_levels=(1,), num_res_blocks=1, dropout=0.0)


def tiny_net(num_classes=3, cond_drop="sample", seed=0):
    torch.manual_seed(seed)
    return UNet(UNetConfig(in_channels=1, num_classes=num_classes, cond_drop=cond_drop, **TINY))


def test_linear_schedule_matches_ddpm():
    s = NoiseSchedule("linear", 1000)
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    assert s.alpha_bar[-1].item() < 1e-4 and s.alpha_bar[0].item() == pytest.approx(1 - 1e-4)
    cos = NoiseSchedule("cosine", 1000)
    assert torch.all(cos.alpha_bar[1:] < cos.alpha_bar[:-1]) and cos.betas.max() <= 0.999


def test_q_sample_statistics_and_inverses():
    s = NoiseSchedule()
    torch.manual_seed(0)
    x0 = torch.full((20000, 1, 1, 1), 0.7)
    t = torch.full((20000,), 400)
    noise = torch.randn_like(x0)
    xt = s.q_sample(x0, t, noise)
    ab = s.alpha_bar[400].item()
    assert xt.mean().item() == pytest.approx(0.7 * ab ** 0.5, abs=0.02)
    assert xt.var().item() == pytest.approx(1 - ab, rel=0.03)
    assert torch.allclose(s.x0_from_eps(xt, t, noise), x0, atol=1e-4)
    assert torch.allclose(s.eps_from_x0(xt, t, x0), noise, atol=1e-4)
    # μ_θ from ε equals the posterior mean at x̂_0(ε) (DDPM Eq. 7 vs Eq. 11)
    mean_eps = s.mean_from_eps(xt[:50], t[:50], noise[:50])
    mean_post, var = s.posterior_mean_variance(s.x0_from_eps(xt[:50], t[:50], noise[:50]), xt[:50], t[:50])
    assert torch.allclose(mean_eps, mean_post, atol=1e-5)
    assert var[0].item() == pytest.approx(s.posterior_var[400].item())


def test_cifar_unet_is_the_ddpm_network():
    uncond_equivalent = build_unet("cifar", in_channels=3, num_classes=0)
    assert count_parameters(uncond_equivalent) - 512 == 35_746_307  # DDPM CIFAR-10 net: 35.7M
    conditional = build_unet("cifar", in_channels=3, num_classes=10)
    assert count_parameters(conditional) == 35_746_307 + 11 * 512
    small = build_unet("small", in_channels=1, num_classes=10)
    assert 1.0e6 < count_parameters(small) < 1.3e6
    x = torch.randn(2, 1, 32, 32)
    assert small(x, torch.tensor([0, 999]), torch.tensor([3, 10])).shape == x.shape


def test_batch_mode_null_label_adds_no_embedding():
    net = tiny_net(cond_drop="batch").eval()
    with torch.no_grad():
        net.label_emb.weight[:-1].normal_()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 500])
    null = torch.full((2,), net.null_label)
    out = net(x, t, null)
    with torch.no_grad():
        net.label_emb.weight.zero_()
    assert torch.allclose(out, net(x, t, torch.tensor([0, 1])), atol=1e-6)


def test_guidance_matches_its_formula_and_omega_zero_is_conditional():
    net = tiny_net().eval()
    with torch.no_grad():
        net.label_emb.weight.normal_()
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([10, 300, 900]), torch.tensor([0, 1, 2])
    cond = net(x, t, y)
    uncond = net(x, t, torch.full_like(y, net.null_label))
    assert torch.equal(CFGDenoiser(net, 0.0, net.null_label)(x, t, y), cond)
    guided = CFGDenoiser(net, 1.5, net.null_label)(x, t, y)
    assert torch.allclose(guided, 2.5 * cond - 1.5 * uncond, atol=1e-5)


def test_ddim_timesteps_follow_oc_protocol():
    assert ddim_timesteps(1000, 100)[:3] == [990, 980, 970] and ddim_timesteps(1000, 100)[-1] == 0
    assert ddim_timesteps(1000, 1000) == list(range(999, -1, -1))


def _gaussian_eps(schedule, mu, s):
    """The exact ε-predictor for 1-D data N(mu, s²): E[ε | x_t]."""
    def eps(x, t, y):
        ab = schedule.alpha_bar[t].reshape(-1, 1, 1, 1)
        return (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * s * s + 1 - ab)
    return eps


class BatchNoise:
    """ImageNoise's interface from one generator for the whole batch: the samplers' math on many
    samples without 2,000 per-image generators per step (per-image streams:
    test_same_seed_same_image_at_any_batch_size)."""

    def __init__(self, seed: int, n: int, shape=(1, 1, 1)):
        self.generator, self.n, self.shape = torch.Generator().manual_seed(seed), n, tuple(shape)

    def __len__(self) -> int:
        return self.n

    def draw(self) -> torch.Tensor:
        return torch.randn((self.n, *self.shape), generator=self.generator)


def test_ddim_eta_one_is_ancestral_ddpm():
    """DDIM with η = 1 over all T steps is DDPM with the posterior variance, path by path, and
    both samplers recover the data marginals of a toy problem with the exact ε-predictor."""
    schedule, mu, s, n = NoiseSchedule(), 0.1, 0.25, 2000  # inside [−1, 1]: samplers clip their output
    eps = _gaussian_eps(schedule, mu, s)
    y = torch.zeros(n, dtype=torch.long)
    small = ddpm_sample(eps, schedule, BatchNoise(0, n), y, variance="fixedsmall")
    ddim = ddim_sample(eps, schedule, BatchNoise(0, n), y, ddim_timesteps(1000, 1000), eta=1.0, clip_x0=False)
    assert torch.allclose(small, ddim, atol=1e-3)
    large = ddpm_sample(eps, schedule, BatchNoise(1, n), y)
    ddim100 = ddim_sample(eps, schedule, BatchNoise(2, n), y, ddim_timesteps(1000, 100), eta=1.0, clip_x0=False)
    # Discrete reverse steps carry a known variance bias, small with all T steps: fixedsmall
    # (= DDIM η=1) under-, fixedlarge over-disperses; 100 strided steps under-disperse more.
    for samples, rel in ((large, 0.03), (small, 0.06), (ddim, 0.06), (ddim100, 0.12)):
        assert samples.mean().item() == pytest.approx(mu, abs=0.02)
        assert samples.std().item() == pytest.approx(s, rel=rel)


def test_same_seed_same_image_at_any_batch_size():
    net = tiny_net().eval()
    schedule = NoiseSchedule(T=20)  # DDPM walks all T steps, 9 times here
    den = CFGDenoiser(net, 1.0, net.null_label)
    seeds, labels = list(range(100, 108)), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    for sampler in SAMPLERS:
        kw = dict(sampler=sampler, steps=10, eta=0.5 if sampler == "ddim" else 0.0)
        batch8 = generate(den, schedule, ImageNoise(seeds, (1, 8, 8)), labels, **kw)
        singles = torch.cat([generate(den, schedule, ImageNoise([sd], (1, 8, 8)), labels[i:i + 1], **kw)
                             for i, sd in enumerate(seeds)])
        assert torch.allclose(batch8, singles, atol=1e-4), sampler


def test_images_round_trip_through_model_space():
    imgs = torch.randint(0, 256, (4, 28, 28, 1), dtype=torch.uint8)
    x = to_model_space(imgs, 32)
    assert x.shape == (4, 1, 32, 32) and x[:, :, 0, 0].eq(-1).all()
    assert torch.equal(to_uint8_images(x, 28, 28), imgs)
    flipped = to_model_space(imgs, 32, hflip=True, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(f, o) or torch.equal(f, o.flip(-1)) for f, o in zip(flipped, x))


def test_label_dropout_modes():
    g = torch.Generator().manual_seed(0)
    y = torch.zeros(10000, dtype=torch.long)
    dropped = drop_labels(y, 0.1, "sample", 7, g)
    assert (dropped == 7).float().mean().item() == pytest.approx(0.1, abs=0.01)
    batches = [drop_labels(y[:16], 0.3, "batch", 7, g) for _ in range(2000)]
    assert all(b.eq(7).all() or b.eq(0).all() for b in batches)
    assert sum(b.eq(7).all().item() for b in batches) / 2000 == pytest.approx(0.3, abs=0.03)


def _images(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.arange(n) % 3


def test_tiny_model_overfits_eight_images():
    x0, y = _images()
    hp = TrainHParams(lr=2e-3, warmup_steps=10, ema_decay=0.99, p_uncond=0.0)
    state = make_train_state(tiny_net(), hp, seed=0)
    schedule = NoiseSchedule(T=100)
    losses = [train_step(state, x0, y, ddpm_loss, schedule, hp)["loss"].item() for _ in range(300)]
    assert sum(losses[-30:]) / 30 < 0.35 * sum(losses[:30]) / 30
    # the EMA follows the net
    assert any(not torch.equal(a, b) for a, b in zip(state.ema.parameters(), tiny_net().parameters()))


def test_checkpoint_resume_reproduces_the_uninterrupted_run():
    x0, y = _images()
    hp = TrainHParams(lr=1e-3, warmup_steps=5, ema_decay=0.9, p_uncond=0.2)
    schedule = NoiseSchedule(T=100)

    def fresh(init_seed, gen_seed):
        torch.manual_seed(init_seed)
        net = UNet(UNetConfig(in_channels=1, num_classes=3, **{**TINY, "dropout": 0.1}))  # dropout uses torch RNG
        return make_train_state(net, hp, seed=gen_seed)

    straight = fresh(0, 5)
    torch.manual_seed(1)
    for _ in range(6):
        train_step(straight, x0, y, ddpm_loss, schedule, hp)

    first = fresh(0, 5)
    torch.manual_seed(1)
    for _ in range(3):
        train_step(first, x0, y, ddpm_loss, schedule, hp)
    buf = io.BytesIO()
    torch.save(checkpoint_state(first, {"note": "test"}), buf)
    buf.seek(0)
    blob = torch.load(buf, weights_only=True)  # checkpoints hold only tensors, numbers and strings

    resumed = fresh(42, 99)  # a new process: other init, other RNG state
    restore_state(resumed, blob)
    for _ in range(3):
        train_step(resumed, x0, y, ddpm_loss, schedule, hp)
    assert resumed.step == straight.step == 6
    for part in ("net", "ema"):
        for a, b in zip(getattr(straight, part).state_dict().values(), getattr(resumed, part).state_dict().values()):
            assert torch.equal(a, b)
    assert torch.equal(straight.opt.state_dict()["state"][0]["exp_avg"], resumed.opt.state_dict()["state"][0]["exp_avg"])
