"""`use_gpu: auto` resolution, per-device choices, the progress lines' CI mode, and how worker
errors reach the user (no Ray needed: the logic is tested on its own)."""
import logging
import os

import pytest

from pipeline.common.devices import device_choice, resolve_use_gpu
from pipeline.common.launcher import DeterministicError, is_deterministic, worker_error_line
from pipeline.common.progress import LocalProgress, _Renderer
from pipeline.errors import ConfigError
from fakes import write_tiny_checkpoint


def test_use_gpu_auto_true_false():
    assert resolve_use_gpu("auto", 0, "train") is False
    assert resolve_use_gpu("auto", 2, "train") is True
    assert resolve_use_gpu(False, 8, "sample") is False
    assert resolve_use_gpu(True, 1, "classify") is True
    with pytest.raises(ConfigError, match="train.use_gpu=true but the Ray cluster has no GPU: set train.use_gpu=auto"):
        resolve_use_gpu(True, 0, "train")


def test_device_choices_follow_the_device():
    gpu, cpu = device_choice(True, True), device_choice(False, True)
    assert gpu.channels_last and gpu.fused_optimizer and gpu.bf16
    assert not cpu.channels_last and not cpu.fused_optimizer and cpu.bf16
    assert device_choice(False, False, channels_last=True).channels_last  # an explicit setting wins


def test_sampling_is_nhwc_on_cuda_and_on_an_fp32_cpu_and_gives_the_same_images():
    """Sampling's layout rule (1.40x on an AVX2 CPU in fp32, benchmarks/bench_sample_layout.py) is only
    a speed choice: the NHWC network's CFG sample equals the NCHW one's from the same seeds."""
    import copy

    import torch

    from models.diffusion.guidance import CFGDenoiser, ImageNoise
    from models.diffusion.samplers import generate
    from models.diffusion.schedule import NoiseSchedule
    from models.diffusion.unet import build_unet
    from pipeline.common.devices import conv_channels_last as rule  # sampling's and the classifier's (1.19x there)

    assert rule("cuda", True) and rule("cuda", False)
    assert rule("cpu", False) and not rule("cpu", True)
    torch.manual_seed(0)
    net = build_unet("small", in_channels=1, num_classes=4, cond_drop="sample").eval()
    with torch.no_grad():  # non-trivial weights: the output layers start at gain 1e-5, i.e. an almost-zero output
        for p in net.parameters():
            p.normal_(0.0, 0.05)
    nhwc = copy.deepcopy(net).to(memory_format=torch.channels_last)
    conv = next(m for m in nhwc.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    schedule, y = NoiseSchedule("linear", 1000), torch.tensor([0, 1, 2, 3])
    with torch.inference_mode():
        a, b = (generate(CFGDenoiser(n, 2.0, n.null_label), schedule, ImageNoise([5, 6, 7, 8], (1, 28, 28), "cpu"),
                         y, sampler="euler_a", steps=3) for n in (net, nhwc))
    assert a.std() > 0.1 and torch.allclose(a, b, atol=1e-4), (float(a.std()), float((a - b).abs().max()))


def test_sample_compile_auto_compiles_only_large_fp32_cpu_shares(make_config):
    from models.diffusion.samplers import network_evaluations
    from pipeline.common.devices import COMPILE_MIN_EVALUATIONS as N, resolve_compile
    from pipeline.common.generation import sample_compile
    from pipeline.config.validate import validate

    assert resolve_compile("auto", "cpu", False, N) and not resolve_compile("auto", "cpu", False, N - 1)
    assert not resolve_compile("auto", "cpu", True, 10 * N)  # CPU bf16: not measured, stays eager
    assert not resolve_compile("auto", "cuda", False, 10 * N)  # CUDA: not measured (no GPU lent), stays eager
    assert resolve_compile(True, "cpu", True, 1) and not resolve_compile(False, "cpu", False, 10 * N)
    with pytest.raises(ValueError, match="use auto, true or false"):
        resolve_compile("fast", "cpu", False, N)
    assert make_config("fmnist_lt").sample.compile is False  # opt-in: no stage-level gain shown (devices.py)
    cfg = make_config("fmnist_lt", "sample.compile=auto")
    s = cfg.sample.for_method("ddpm")
    assert s.compile == "auto" and network_evaluations(s.sampler, cfg.model.timesteps, s.steps, s.omega) == 30
    bf16 = resolve_bf16_cpu()
    assert sample_compile(cfg, s, 1000, use_gpu=False) is (not bf16)  # a 1,000-image evaluation set
    assert not sample_compile(cfg, s, 999, use_gpu=False)
    two = make_config("fmnist_lt", "sample.compile=auto", "sample.num_actors=2").sample.for_method("ddpm")
    assert not sample_compile(cfg, two, 1000, use_gpu=False)  # 500 images per actor
    assert not sample_compile(make_config("fmnist_lt"), make_config("fmnist_lt").sample, 10**6, use_gpu=False)
    with pytest.raises(ConfigError, match=r"sample.compile='fast': use auto, true or false"):
        validate(make_config("fmnist_lt", "sample.compile=fast"))


def resolve_bf16_cpu() -> bool:
    from models.precision import resolve_bf16

    return resolve_bf16("auto", "cpu")


def _set_spec(weights, compile_net=False, setting="auto", batch_size=6, omega=2.0) -> dict:
    cfg = {"sampler": "euler_a", "steps": 3, "eta": 0.0, "clip_x0": None, "omega": omega, "bf16": False,
           "guidance_scale": None, "guidance_norm": "rms", "batch_size": batch_size, "compile": setting}
    return {"weights": str(weights), "sample_cfg": cfg, "compile_net": compile_net}


def _rows(rows=4, set_id=0, first_seed=100):
    import numpy as np

    return {"seed": np.arange(first_seed, first_seed + rows), "label": np.arange(rows) % 10, "k": np.arange(rows),
            "set": np.full(rows, set_id)}


def _actor_images(weights, compile_net, setting, rows=4, batch_size=6):
    from pipeline.common.generation import SamplerActor

    actor = SamplerActor({0: _set_spec(weights, compile_net, setting, batch_size)}, threads=2, use_gpu=False)
    return actor, actor(_rows(rows))["image"]


def test_one_sampling_actor_serves_several_sets_as_each_alone(tmp_path):
    """The sets of one generate_sets call share the actor pool: an actor holding three sets (two
    models, one of them at two ω; only two kept loaded) gives each batch the images that set's own actor
    gives, also for a batch of rows from two sets."""
    import numpy as np

    from pipeline.common.generation import SamplerActor

    a, b = write_tiny_checkpoint(tmp_path / "a.pt", seed=1), write_tiny_checkpoint(tmp_path / "b.pt", seed=2)
    specs = {0: _set_spec(a), 1: _set_spec(b), 2: _set_spec(a, omega=0.0)}
    alone = {i: SamplerActor({i: spec}, threads=2, use_gpu=False)(_rows(4, i))["image"] for i, spec in specs.items()}
    assert not np.array_equal(alone[0], alone[1]) and not np.array_equal(alone[0], alone[2])
    shared = SamplerActor(specs, threads=2, use_gpu=False)
    for i in (0, 1, 2, 0):  # the third set evicts the first, which is loaded again
        out = shared(_rows(4, i))
        assert np.array_equal(out["image"], alone[i]) and (out["set"] == i).all()
    assert list(shared.loaded) == [2, 0]
    mixed = {k: np.concatenate([_rows(4, 1)[k], _rows(4, 2)[k]]) for k in ("seed", "label", "k", "set")}
    assert np.array_equal(shared(mixed)["image"], np.concatenate([alone[1], alone[2]]))


def test_a_compiled_sampling_actor_pads_to_one_shape_and_gives_the_same_images(tmp_path):
    """sample.compile is a speed choice only: a compiled actor's images (its batch of 4 padded to 6, the
    padding dropped) equal the eager actor's from the same seeds, up to float rounding in a uint8 pixel."""
    import numpy as np

    weights = write_tiny_checkpoint(tmp_path / "model.pt")
    _, eager = _actor_images(weights, False, "auto")
    actor, compiled = _actor_images(weights, True, "auto")
    assert actor.loaded[0]["compiled"] and compiled.shape == eager.shape == (4, 8, 8, 1)
    diff = np.abs(compiled.astype(int) - eager.astype(int))
    assert eager.std() > 10 and diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


def test_a_compile_that_fails_falls_back_to_eager_under_auto_only(tmp_path, monkeypatch, caplog):
    """A node whose inductor cannot build (no C++ compiler; simulated: the compiled call raises) samples
    eagerly under `auto`, with one warning; `compile: true` stops with the error."""
    import numpy as np
    import torch

    class Broken(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net
            self.null_label = net.null_label

        def forward(self, *args):
            raise RuntimeError("InductorError: CppCompileError: no C++ compiler found")

    weights = write_tiny_checkpoint(tmp_path / "model.pt")
    _, eager = _actor_images(weights, False, "auto")
    monkeypatch.setattr(torch, "compile", lambda net: Broken(net))
    caplog.set_level(logging.WARNING, logger="taildiff.sample")
    actor, images = _actor_images(weights, True, "auto")
    assert not actor.loaded[0]["compiled"] and np.array_equal(images, eager)
    assert "torch.compile failed on this node (InductorError: CppCompileError" in caplog.text
    with pytest.raises(RuntimeError, match="CppCompileError"):
        _actor_images(weights, True, True)


def test_every_section_defaults_to_auto(make_config):
    cfg = make_config("fmnist_lt")
    assert {getattr(cfg, s).use_gpu for s in ("train", "sample", "evaluate", "classify")} == {"auto"}
    with pytest.raises(ConfigError, match="use auto, true or false"):
        make_config("fmnist_lt", "train.use_gpu=maybe")


def test_bf16_auto_follows_the_cpus_bf16_kernels(make_config, monkeypatch):
    """`bf16: auto` (every preset's default) asks torch whether this CPU has bf16 kernels: on an
    AVX2-only CPU bf16 autocast is ~10x slower than fp32, so auto must say no there."""
    import torch

    from models.precision import native_bf16, resolve_bf16

    cfg = make_config("fmnist_lt")
    assert {cfg.train.bf16, cfg.sample.bf16, cfg.classify.bf16} == {"auto"}
    assert resolve_bf16("auto", "cpu") == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) == native_bf16("cpu")
    assert resolve_bf16(True, "cpu") is True and resolve_bf16(False, "cuda") is False  # explicit settings win
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)  # an AVX2-only CPU
    assert resolve_bf16("auto", "cpu") is False
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)  # AVX512 / AMX
    assert resolve_bf16("auto", torch.device("cpu")) is True
    with pytest.raises(ConfigError, match="train.bf16='fast': use auto, true or false"):
        make_config("fmnist_lt", "train.bf16=fast")
    with pytest.raises(ValueError, match="use auto, true or false"):
        resolve_bf16("fast", "cpu")


def test_progress_lines_in_ci_every_ten_percent(caplog):
    caplog.set_level(logging.INFO, logger="taildiff.progress")
    renderer = _Renderer(live=False, every_percent=10)
    for done in range(0, 101, 5):
        renderer.draw({"train/ddpm": (done, 100, "step", 0.0, 10.0 + done)})
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 11 and lines[-1].startswith("train/ddpm: 100/100 step (100%)")
    assert "step/s" in lines[3] and "ETA" in lines[3]
    local = LocalProgress("sample/ddpm", 40, "img", live=False)
    local.update(40)
    assert any("sample/ddpm: 40/40 img" in r.getMessage() for r in caplog.records)


def test_worker_errors_keep_their_own_message():
    class Wrapped(Exception):
        def __init__(self, cause):
            super().__init__("Training failed due to worker errors:\n...")
            self.worker_failures = {0: cause}

    bad_init = DeterministicError("train.init_from: cannot read /x/model.pt (UnpicklingError: bad); give a model.pt")
    line = worker_error_line(Wrapped(bad_init))
    assert line.startswith("DeterministicError: train.init_from: cannot read /x/model.pt")
    assert is_deterministic(Wrapped(bad_init))
    assert not is_deterministic(Wrapped(RuntimeError("The actor died unexpectedly before finishing this task")))
    trace = "Traceback (most recent call last):\n  File x\n    raise NonFiniteLossError(f'...')\nNonFiniteLossError: loss nan"
    assert worker_error_line(RuntimeError(trace)) == "NonFiniteLossError: loss nan"


def test_a_local_ray_start_is_retried_after_a_timeout_and_runs_no_preemption_watcher(monkeypatch, caplog):
    """Ray gives its raylet a fixed 30 s to register; on a busy 2-core machine that sometimes is not
    enough. The start is retried (after shutting the half-started node down); other errors are not.
    Ray Train's preemption watcher is off for the local node (no autoscaler can drain it)."""
    import ray

    from pipeline.common import ray_setup

    calls, shutdowns = [], []
    monkeypatch.delenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", raising=False)  # (the session's Ray set it)

    def fake_init(**kwargs):
        calls.append(kwargs)
        # set before the node starts, so that its processes (the Train controllers) inherit it
        assert os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER") == "0"
        if len(calls) == 1:
            raise Exception("The current node timed out during startup. This could happen because ...")

    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(ray, "shutdown", lambda: shutdowns.append(1))
    caplog.set_level(logging.WARNING, logger="taildiff.ray")
    ray_setup.start_local_ray(num_cpus=2)
    assert len(calls) == 2 and len(shutdowns) == 1 and calls[1] == {"address": "local", "log_to_driver": False,
                                                                     "num_cpus": 2}
    assert "starting it again (attempt 2 of 3)" in caplog.text

    def broken(**kwargs):
        raise ValueError("bad argument")

    monkeypatch.setattr(ray, "init", broken)
    with pytest.raises(ValueError, match="bad argument"):
        ray_setup.start_local_ray()
