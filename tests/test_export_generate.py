"""Export to diffusers (the same ε̂, the same DDIM trajectory) and the export/generate commands."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import REPO
from fakes import DIGIT_NAMES, write_tiny_checkpoint
from models.diffusion.diffusers_export import build_scheduler, scheduler_config, to_diffusers, unet2d_config
from models.diffusion.guidance import ImageNoise
from models.diffusion.samplers import ddim_sample, ddim_timesteps
from models.diffusion.schedule import NoiseSchedule
from models.diffusion.unet import UNet, UNetConfig, build_unet, timestep_embedding

TINY = dict(in_channels=1, num_classes=3, ch=32, ch_mult=(1, 2), attn_levels=(1,), num_res_blocks=1, norm_groups=8)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)  # the nets' own initialisation draws from the global generator


def _perturbed(net: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Random offsets on every weight: no layer stays zero (biases) or near zero (the 1e-5 gains)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return net.eval()


def _inputs(num_classes: int, batch: int = 6, size: int = 8, channels: int = 1, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=g)
    t = torch.cat([torch.tensor([0, 999]), torch.randint(0, 1000, (batch - 2,), generator=g)])
    y = torch.cat([torch.tensor([num_classes]), torch.randint(0, num_classes + 1, (batch - 1,), generator=g)])
    return x, t, y  # y[0] is the null label


def test_sinusoid_matches_diffusers_after_the_permutation():
    from diffusers.models.embeddings import get_timestep_embedding

    from models.diffusion.diffusers_export import _sinusoid_permutation

    t = torch.tensor([0, 1, 17, 500, 999])
    ours = timestep_embedding(t, 128)
    theirs = get_timestep_embedding(t, 128, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert torch.equal(ours[:, _sinusoid_permutation(128)], theirs)  # same frequencies, bit for bit


@pytest.mark.parametrize("cond_drop", ["sample", "batch"])
def test_exported_unet_gives_our_eps(tmp_path, cond_drop):
    from diffusers import UNet2DModel

    net = _perturbed(UNet(UNetConfig(**TINY, cond_drop=cond_drop)))
    to_diffusers(net, sample_size=8).save_pretrained(tmp_path / "unet")
    loaded = UNet2DModel.from_pretrained(tmp_path / "unet", low_cpu_mem_usage=False).eval()
    assert loaded.config.num_class_embeds == 4 and loaded.config.norm_num_groups == 8
    null_row = loaded.class_embedding.weight[3]
    assert (null_row == 0).all() == (cond_drop == "batch")  # batch: our forward adds nothing for ∅
    x, t, y = _inputs(3)
    with torch.no_grad():
        ours, theirs = net(x, t, y), loaded(x, t, class_labels=y).sample
    assert ours.abs().mean() > 0.1  # a non-trivial output
    assert (ours - theirs).abs().max() < 1e-5


@pytest.mark.parametrize("preset", ["small", "cifar"])
def test_presets_map_to_unet2dmodel(preset):
    net = _perturbed(build_unet(preset, in_channels=3, num_classes=10), scale=0.02)
    cfg = unet2d_config(net.cfg)
    assert cfg["norm_num_groups"] == net.cfg.norm_groups
    assert [b.startswith("Attn") for b in cfg["down_block_types"]] == [i in net.cfg.attn_levels
                                                                      for i in range(len(net.cfg.ch_mult))]
    model = to_diffusers(net)
    heads = {m.heads for m in model.modules() if type(m).__name__ == "Attention"}
    assert heads == {1}
    x, t, y = _inputs(10, batch=2, channels=3)  # 8×8: every preset's levels still divide it
    with torch.no_grad():
        ours, theirs = net(x, t, y), model(x, t, class_labels=y).sample
    assert (ours - theirs).abs().max() < 1e-4 * max(1.0, ours.abs().max().item())


def test_first_level_wider_than_ch_is_refused():
    with pytest.raises(ValueError, match="ch_mult"):
        unet2d_config(UNetConfig(**{**TINY, "ch_mult": (2, 2)}))


def test_diffusers_ddim_loop_reproduces_ddim_sample(tmp_path):
    from diffusers import DDIMScheduler, UNet2DModel

    schedule = NoiseSchedule("linear", 1000)
    net = _perturbed(UNet(UNetConfig(**TINY)))
    to_diffusers(net).save_pretrained(tmp_path / "unet")
    build_scheduler(schedule, "ddim").save_pretrained(tmp_path / "scheduler")
    unet = UNet2DModel.from_pretrained(tmp_path / "unet", low_cpu_mem_usage=False).eval()
    sched = DDIMScheduler.from_pretrained(tmp_path / "scheduler")
    assert torch.equal(sched.betas, schedule.betas)
    assert sched.config.clip_sample and sched.config.set_alpha_to_one

    seeds, y = [11, 12, 13, 14], torch.tensor([0, 1, 2, 3])  # label 3 = null
    visited = []  # our x_t at every step: unclipped, unlike the final x̂_0 of a random net

    def recording(x, t, y):
        visited.append(x.clone())
        return net(x, t, y)

    ours = ddim_sample(recording, schedule, ImageNoise(seeds, (1, 8, 8)), y, ddim_timesteps(1000, 10))
    x = ImageNoise(seeds, (1, 8, 8)).draw()
    sched.set_timesteps(10)
    assert sched.timesteps.tolist() == ddim_timesteps(1000, 10)
    d_eps = d_xt = 0.0
    with torch.no_grad():
        for step, t in enumerate(sched.timesteps):
            d_xt = max(d_xt, (x - visited[step]).abs().max().item())
            eps = unet(x, t, class_labels=y).sample
            d_eps = max(d_eps, (eps - net(x, torch.full((4,), int(t)), y)).abs().max().item())
            x = sched.step(eps, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    d_x0 = (x - ours).abs().max().item()
    print(f"diffusers DDIM vs ddim_sample (10 steps): max |Δε| = {d_eps:.2e}, max |Δx_t| = {d_xt:.2e}, "
          f"max |Δx0| = {d_x0:.2e}")
    assert d_eps < 1e-5 and d_xt < 1e-4 and d_x0 < 1e-4


def test_diffusers_ddpm_step_is_our_ancestral_step():
    schedule = NoiseSchedule("linear", 1000)
    sched = build_scheduler(schedule, "ddpm")
    sched.set_timesteps(1000)
    g = torch.Generator().manual_seed(3)
    x, eps = torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, 1, 8, 8, generator=g)
    for t in (999, 500, 10, 1, 0):
        got = sched.step(eps, t, x, generator=torch.Generator().manual_seed(7)).prev_sample
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))  # diffusers' draw, on CPU
        mean = schedule.mean_from_eps(x, torch.full((2,), t), eps)
        want = mean + schedule.fixedlarge_var[t].sqrt() * z if t > 0 else mean
        assert (got - want).abs().max() < 1e-3, t  # float32 ᾱ ratios in diffusers: ~1e-4 at t = 1


def test_scheduler_config_carries_the_betas():
    schedule = NoiseSchedule("cosine", 100)
    cfg = scheduler_config(schedule, "ddpm")
    assert cfg["_class_name"] == "DDPMScheduler" and len(cfg["trained_betas"]) == 100
    assert torch.equal(build_scheduler(schedule, "ddpm").betas, schedule.betas)
    with pytest.raises(ValueError, match="ddim"):
        scheduler_config(schedule, "euler")


# --- the commands, on a tiny checkpoint written the way the train stage writes model.pt ---

NAMES = DIGIT_NAMES


@pytest.fixture
def checkpoint(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "runs" / "x" / "train" / "ddpm" / "model.pt")
    metrics = path.parent.parent.parent / "evaluation" / "ddpm" / "metrics.json"
    metrics.parent.mkdir(parents=True)
    metrics.write_text(json.dumps({"fid": 12.3456, "fid_interval": [11.0, 13.5], "num_samples": 50,
                                   "precision": 0.5, "recall": 0.25, "extractor": {"extractor": "domain"}}))
    return path


def _one_error_line(capsys, *words) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for word in words:
        assert word in err[0], err[0]


def test_export_command_writes_a_loadable_diffusers_folder(checkpoint, tmp_path, capsys):
    from diffusers import DDIMScheduler, UNet2DModel

    from pipeline.common.artifacts import load_model
    from pipeline.tools.export import main

    out = tmp_path / "export"
    assert main(["--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    assert (out / "unet" / "config.json").is_file() and (out / "scheduler" / "scheduler_config.json").is_file()
    card = (out / "README.md").read_text()
    for text in ("digits", "exp", "digit9", "| 10 | (null: no label)", "(1+ω)", "300 steps", "12.35 [11.00, 13.50]"):
        assert text in card, text
    assert json.loads((out / "taildiff.json").read_text())["null_label"] == 10
    assert not list(tmp_path.glob(".tmp-*"))

    net, _, _ = load_model(checkpoint)
    unet = UNet2DModel.from_pretrained(out, subfolder="unet", low_cpu_mem_usage=False).eval()
    assert unet.config.sample_size == 8
    DDIMScheduler.from_pretrained(out, subfolder="scheduler")
    x, t, y = _inputs(10)
    with torch.no_grad():
        assert (net(x, t, y) - unet(x, t, class_labels=y).sample).abs().max() < 1e-5

    capsys.readouterr()
    assert main(["--checkpoint", str(checkpoint), "--out", str(out)]) == 2  # not empty
    _one_error_line(capsys, "not an empty folder", "--out")


def test_export_rejects_missing_and_foreign_checkpoints(tmp_path, capsys):
    from pipeline.tools.export import main

    assert main(["--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path / "a")]) == 2
    _one_error_line(capsys, "not found", "model.pt")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    assert main(["--checkpoint", str(foreign), "--out", str(tmp_path / "a")]) == 2
    _one_error_line(capsys, "model.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    assert main(["--checkpoint", str(garbage), "--out", str(tmp_path / "a")]) == 2
    _one_error_line(capsys, "model.pt")
    assert not (tmp_path / "a").exists()


def _folder_images(folder):
    import pyarrow.parquet as pq

    from pipeline.common.shards import column_to_numpy

    table = pq.read_table(folder / "images" / "part-00000.parquet")
    return (column_to_numpy(table.column("image"), (8, 8, 1)), table.column("label").to_numpy(),
            table.column("k").to_numpy(), table.column("seed").to_numpy())


def test_generate_command_outputs_and_per_image_seeds(checkpoint, tmp_path):
    from models.seeding import derive_seed
    from pipeline.tools.generate import main

    common = ["--checkpoint", str(checkpoint), "--sampler", "ddim", "--steps", "4", "--omega", "1.5",
              "--seed", "5", "--device", "cpu"]
    grid = tmp_path / "pics" / "grid.png"
    assert main([*common, "--classes", "7,9", "--n", "2", "--out", str(grid)]) == 0
    assert grid.is_file()
    record = json.loads(grid.with_suffix(".json").read_text())
    assert [(i["class"], i["k"]) for i in record["images"]] == [(7, 0), (7, 1), (9, 0), (9, 1)]
    assert record["images"][1]["seed"] == derive_seed(5, "generate", 7, 1)

    one, four = tmp_path / "one", tmp_path / "four"
    assert main([*common, "--classes", "8", "--n", "1", "--out", str(one)]) == 0
    assert main([*common, "--classes", "9,8", "--n", "4", "--batch-size", "3", "--out", str(four)]) == 0
    for name in ("grid.png", "generate.json", "png/c8_k0.png", "png/c9_k3.png"):
        assert (four / name).is_file(), name
    images1, labels1, ks1, seeds1 = _folder_images(one)
    images4, labels4, ks4, seeds4 = _folder_images(four)
    assert images4.dtype == np.uint8 and images4.shape == (8, 8, 8, 1) and len(set(map(bytes, images4))) == 8
    first8 = np.flatnonzero((labels4 == 8) & (ks4 == 0))[0]
    assert seeds4[first8] == seeds1[0] == derive_seed(5, "generate", 8, 0)
    np.testing.assert_array_equal(images4[first8], images1[0])  # same seed, same image, whatever --n
    meta = json.loads((four / "generate.json").read_text())
    assert meta["sampler"] == "ddim" and meta["steps"] == 4 and meta["omega"] == 1.5 and meta["seed"] == 5
    assert [i["seed"] for i in meta["images"]] == seeds4.tolist()

    from PIL import Image

    png = np.asarray(Image.open(four / "png" / "c8_k0.png"))
    np.testing.assert_array_equal(png, images4[first8][..., 0])


@pytest.mark.parametrize("argv, words", [
    (["--classes", "3,10"], ["[10]", "[0, 10)", "9=digit9"]),
    (["--classes", "-1"], ["[-1]", "[0, 10)"]),
    (["--classes", "a,b"], ["--classes"]),
    (["--sampler", "plms"], ["plms", "ddim"]),
    (["--n", "0"], ["--n"]),
    (["--steps", "5000"], ["--steps"]),
])
def test_generate_bad_input_is_one_line(checkpoint, tmp_path, capsys, argv, words):
    from pipeline.tools.generate import main

    out = tmp_path / "bad"
    assert main(["--checkpoint", str(checkpoint), "--device", "cpu", "--out", str(out), *argv]) == 2
    _one_error_line(capsys, *words)
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))


def test_generate_rejects_missing_checkpoint(tmp_path, capsys):
    from pipeline.tools.generate import main

    assert main(["--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "g.png")]) == 2
    _one_error_line(capsys, "not found", "model.pt")


def test_run_py_routes_the_subcommands():
    from pipeline.run import SUBCOMMANDS

    assert SUBCOMMANDS["export"] == "pipeline.tools.export:main"
    assert SUBCOMMANDS["generate"] == "pipeline.tools.generate:main"
