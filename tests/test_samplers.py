"""The few-step solvers (diffusers' schedulers behind the project's signature) against diffusers'
own loop and against an exact toy problem; the sampler registry; guidance wrappers."""
import pytest
import torch

from models.diffusion.guidance import CFGDenoiser, ClassifierGuidance, ImageNoise
from models.diffusion.samplers import SAMPLERS, generate, linspace_timesteps, network_evaluations, sampler_timesteps
from models.diffusion.schedule import NoiseSchedule
from models.diffusion.solvers import ClippedDenoiser, make_scheduler, solver_sample

SCHEDULE = NoiseSchedule()


def _gaussian_eps(mu, s):
    """The exact ε-predictor for data N(mu, s²) (per pixel): E[ε | x_t]."""
    def eps(x, t, y):
        ab = SCHEDULE.alpha_bar[t].reshape(-1, 1, 1, 1)
        return (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * s * s + 1 - ab)
    return eps


def _diffusers_loop(name, eps, seeds, shape, steps):
    """The loop diffusers' pipelines run: set_timesteps(steps), x_T · init_noise_sigma, scale, step."""
    scheduler = make_scheduler(name, SCHEDULE)
    scheduler.set_timesteps(steps)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    x = torch.stack([torch.randn(shape, generator=g) for g in gens]) * scheduler.init_noise_sigma
    y = torch.zeros(len(seeds), dtype=torch.long)
    extra = {"generator": gens} if name == "euler_a" else {}
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t)
        out = eps(inp, torch.full((len(seeds),), int(t)), y)
        x = scheduler.step(out, t, x, return_dict=False, **extra)[0]
    return x.clamp(-1, 1)


@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc", "euler_a"])
def test_solvers_reproduce_diffusers_own_loop_on_its_default_schedule(name):
    eps = _gaussian_eps(0.1, 0.3)
    seeds, steps = [3, 4, 5], 10  # 10 steps: Euler's linspace(0, 999, 10) is integral, as ours
    ours = solver_sample(name, eps, SCHEDULE, ImageNoise(seeds, (1, 2, 2)), torch.zeros(3, dtype=torch.long),
                         sampler_timesteps(name, 1000, steps), clip_x0=False)
    ref = _diffusers_loop(name, eps, seeds, (1, 2, 2), steps)
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()


@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc", "euler_a", "ddim"])
def test_solvers_converge_to_the_data_distribution_with_the_exact_denoiser(name):
    """With many steps every solver recovers N(mu, s²). (With 10–20 steps all of them, DDIM included,
    under-disperse this toy: their last step lands on the posterior mean E[x_0 | x_t], whose spread is
    smaller than s when s is small against σ_t; that is the discretisation, not a bug.)"""
    mu, s, n = 0.1, 0.25, 1500
    x = generate(_gaussian_eps(mu, s), SCHEDULE, ImageNoise(range(n), (1, 1, 1)), torch.zeros(n, dtype=torch.long),
                 sampler=name, steps=250, clip_x0=False)
    assert x.mean().item() == pytest.approx(mu, abs=0.03)
    assert x.std().item() == pytest.approx(s, rel=0.08)


def test_the_caller_owns_the_step_schedule():
    eps = _gaussian_eps(0.0, 0.5)
    noise = lambda: ImageNoise([1, 2], (1, 2, 2))  # noqa: E731
    y = torch.zeros(2, dtype=torch.long)
    visited = []

    def spy(x, t, y_):
        visited.append(int(t[0]))
        return eps(x, t, y_)

    custom = [900, 500, 250, 50]
    generate(spy, SCHEDULE, noise(), y, sampler="dpmpp_2m", steps=0, timesteps=custom, clip_x0=False)
    assert visited == custom
    assert linspace_timesteps(1000, 10) == [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]
    assert sampler_timesteps("ddpm", 1000, 7) == list(range(999, -1, -1))
    assert network_evaluations("ddim", 1000, 50, omega=1.0) == 100 and network_evaluations("unipc", 1000, 5, 0) == 5
    with pytest.raises(ValueError, match="eta"):
        generate(eps, SCHEDULE, noise(), y, sampler="unipc", steps=5, eta=0.5)
    assert set(SAMPLERS) == {"ddpm", "ddim", "dpmpp_2m", "unipc", "euler_a"}


def test_clipped_denoiser_makes_the_clipped_x0():
    eps = lambda x, t, y: torch.full_like(x, -3.0)  # noqa: E731 - x̂_0 far outside [−1, 1]
    x, t = torch.zeros(2, 1, 2, 2), torch.tensor([400, 400])
    wrapped = ClippedDenoiser(eps, SCHEDULE)(x, t, None)
    assert torch.allclose(SCHEDULE.x0_from_eps(x, t, wrapped), torch.ones_like(x), atol=1e-5)


def test_classifier_guidance_moves_eps_along_the_normalised_gradient():
    inner = lambda x, t, y: torch.zeros_like(x)  # noqa: E731
    grad = lambda x, t, y: torch.full_like(x, 5.0)  # noqa: E731 - RMS 5: normalised to 1
    x, t = torch.zeros(2, 1, 2, 2), torch.tensor([100, 900])
    out = ClassifierGuidance(inner, grad, 0.4, SCHEDULE.alpha_bar)(x, t, torch.zeros(2, dtype=torch.long))
    expected = -(1 - SCHEDULE.alpha_bar[t]).sqrt().view(-1, 1, 1, 1) * 0.4
    assert torch.allclose(out, expected.expand_as(out), atol=1e-6)
    off = ClassifierGuidance(inner, grad, 0.0, SCHEDULE.alpha_bar)(x, t, torch.zeros(2, dtype=torch.long))
    assert torch.equal(off, torch.zeros_like(x))
    # unit norm instead: g = 5 on 4 pixels has norm 10, so each pixel is 0.5 and the shift √D = 2× smaller
    l2 = ClassifierGuidance(inner, grad, 0.4, SCHEDULE.alpha_bar, normalise="l2")(x, t, torch.zeros(2, dtype=torch.long))
    assert torch.allclose(l2, expected.expand_as(out) / 2, atol=1e-6)
    assert l2.flatten(1).norm(dim=1).allclose(0.4 * (1 - SCHEDULE.alpha_bar[t]).sqrt())
    raw = ClassifierGuidance(inner, grad, 0.4, SCHEDULE.alpha_bar, normalise=None)(x, t, torch.zeros(2, dtype=torch.long))
    assert torch.allclose(raw, expected.expand_as(out) * 5, atol=1e-6)
    with pytest.raises(ValueError, match="rms, l2"):
        ClassifierGuidance(inner, grad, 0.4, SCHEDULE.alpha_bar, normalise="max")


def test_guidance_wrappers_compose_with_cfg():
    class Net(torch.nn.Module):
        null_label = 2

        def forward(self, x, t, y):
            return x + y.float().view(-1, 1, 1, 1)

    cfg = CFGDenoiser(Net(), 1.0, 2)
    guided = ClassifierGuidance(cfg, lambda x, t, y: torch.ones_like(x), 0.0, SCHEDULE.alpha_bar)
    x, t, y = torch.zeros(1, 1, 2, 2), torch.tensor([10]), torch.tensor([1])
    assert torch.equal(guided(x, t, y), cfg(x, t, y))
    assert torch.allclose(cfg(x, t, y), torch.full_like(x, 2 * 1.0 - 2.0))  # (1+ω)·1 − ω·2
