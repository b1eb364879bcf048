"""Ray Train stage: 2-worker DDP on CPU, checkpoints, resume on rerun, non-finite loss; then sampling."""
import json
import logging

import numpy as np
import pytest
import torch

from conftest import REPO
from models.diffusion.guidance import CFGDenoiser, ImageNoise
from models.diffusion.samplers import generate
from models.data.images import to_uint8_images
from pipeline.config import load_config
from pipeline.stages.s1_data import run_data
from pipeline.errors import TaildiffError
from pipeline.stages.s3_sample import plan_counts, run_sample
from pipeline.common.shards import column_to_numpy
from pipeline.common.launcher import latest_progress
from pipeline.common.artifacts import load_model, make_schedule, model_extras
from pipeline.stages.s2_train import run_train

TINY = ["model.image_size=8", "train.batch_size=16", "train.num_workers=2", "train.cpus_per_worker=0.5",
        "train.log_every=3", "train.checkpoint_every=3", "train.bf16=false", "sample.per_class=2",
        "sample.steps=5", "sample.batch_size=7", "sample.omega=1.5", "sample.bf16=false"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("trainstage")


def cfg_for(workdir, *extra):
    return load_config(REPO / "configs" / "digits_lt.yaml", [f"output_dir={workdir}", *TINY, *extra])


def test_two_worker_run_checkpoints_and_resumes(ray_session, workdir, caplog):
    caplog.set_level(logging.INFO, logger="taildiff")
    cfg = cfg_for(workdir, "train.steps=6")
    data = run_data(cfg)
    art = run_train(cfg, data)["ddpm"]
    assert art.metrics["step"] == 6 and np.isfinite(art.metrics["loss"]) and not art.skipped
    storage = next((cfg.run_dir / "train" / "ray").iterdir())
    assert latest_progress(storage)["step"] == 6
    assert len([p for p in storage.glob("checkpoint_*") if p.is_dir()]) == 2  # steps 3, 6 (keep 2)
    blob = torch.load(art.weights, weights_only=True)
    assert blob["step"] == 6 and "ema" in blob

    again = run_train(cfg, data)["ddpm"]  # same command: finished stage is skipped
    assert again.skipped

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(cfg.run_dir / "tensorboard" / "ddpm")).Reload()
    tags = events.Tags()
    for tag in ("train/loss", "train/mse", "train/lr", "train/grad_norm", "train/images_per_second",
                "train/data_wait_fraction"):
        assert tag in tags["scalars"], tag
    assert [e.step for e in events.Scalars("train/loss")] == [3, 6]
    assert "samples/ema" in tags["images"]  # the per-class grid at each checkpoint

    longer = cfg_for(workdir, "train.steps=9")  # the same run, trained further: resumes at step 6
    resumed = run_train(longer, data)["ddpm"]
    assert resumed.metrics["step"] == 9 and not resumed.skipped
    assert "resuming from step 6" in caplog.text
    steps = [int(line.split(",")[0]) for line in (art.path / "loss.csv").read_text().splitlines()[1:]]
    assert steps == [3, 6, 9]
    assert (art.path / "loss.png").stat().st_size > 0

    (art.path / "manifest.json").unlink()
    art.weights.unlink()  # as if the process died between the last checkpoint and the export
    recovered = run_train(longer, data)["ddpm"]  # the finished checkpoint is exported, nothing retrained
    assert recovered.metrics["step"] == 9 and recovered.weights.is_file() and not recovered.skipped
    steps = [int(line.split(",")[0]) for line in (art.path / "loss.csv").read_text().splitlines()[1:]]
    assert steps == [3, 6, 9]


def test_sampling_stage_writes_reproducible_images(ray_session, workdir):
    # the method's own ω (sample.omega_by_method) is what its actors sample with, not sample.omega
    cfg = cfg_for(workdir, "train.steps=9", "sample.omega=0.5", "sample.omega_by_method={ddpm: 1.5}")
    data = run_data(cfg)
    models = run_train(cfg, data)
    out = run_sample(cfg, data, models)["ddpm"]
    assert out.num_images == 20 and (out.path / "grid.png").stat().st_size > 0
    assert json.loads((out.path / "manifest.json").read_text())["sample"]["omega"] == 1.5
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.concat_tables([pq.read_table(f) for f in sorted(out.images_dir.glob("*.parquet"))])
    images = column_to_numpy(table.column("image"), (8, 8, 1))
    labels, seeds = table.column("label").to_numpy(), table.column("seed").to_numpy()
    assert sorted(np.bincount(labels).tolist()) == [2] * 10 and len(set(seeds.tolist())) == 20
    # any image is reproduced from its own seed alone, outside the actor pool and at batch size 1
    net, run_cfg, manifest = load_model(models["ddpm"].weights)
    den = CFGDenoiser(net, 1.5, net.null_label)
    i = 13
    x = generate(den, make_schedule(run_cfg), ImageNoise([int(seeds[i])], (1, 8, 8)),
                 torch.tensor([int(labels[i])]), sampler="ddim", steps=5)
    assert np.abs(to_uint8_images(x, 8, 8)[0].numpy().astype(int) - images[i].astype(int)).max() <= 1
    assert run_sample(cfg, data, models)["ddpm"].skipped  # rerun skips


def test_sample_plans(workdir):
    cfg = cfg_for(workdir)
    manifest = {"class_counts": [50, 20, 5]}
    assert plan_counts(cfg, manifest) == [2, 2, 2]
    fill = cfg_for(workdir, "sample.plan=fill")
    assert plan_counts(fill, manifest) == [0, 30, 45]
    explicit = cfg_for(workdir, "sample.plan=counts", "sample.counts=[1,0,4]")
    assert plan_counts(explicit, manifest) == [1, 0, 4]


def test_non_finite_loss_stops_with_a_clear_error(ray_session, tmp_path):
    cfg = load_config(REPO / "configs" / "digits_lt.yaml", [
        f"output_dir={tmp_path}", *TINY, "train.num_workers=1", "train.steps=40", "train.log_every=1",
        "train.checkpoint_every=1", "train.lr=1e12", "train.warmup_steps=0", "train.grad_clip=1e30",
        "train.max_failures=0", "tracking.grid_per_class=0"])
    data = run_data(cfg)
    with pytest.raises(TaildiffError, match=r"diverged: loss (nan|inf|-inf) .*last good checkpoint \(ddpm, step \d+\) is kept"):
        run_train(cfg, data)
    storage = next((cfg.run_dir / "train" / "ray").iterdir())
    good = latest_progress(storage)
    assert good is not None and good["step"] >= 1
    ckpt = sorted(p for p in storage.glob("checkpoint_*") if p.is_dir())[-1]
    blob = torch.load(ckpt / "state.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in blob["net"].values())


def test_composed_methods_and_fine_tuning_through_ray_train(ray_session, tmp_path):
    overrides = [f"output_dir={tmp_path}", *TINY, "train.num_workers=1", "train.steps=3", "train.log_every=1",
                 "train.methods=[ddpm,cbdm+diffrop,t2h,diffrc,pcg]", "train.init_from=ddpm", "diffrop.group_size=4",
                 "oc.batch_resample=true", "oc.cutoff=800", "diffrc.source_steps=3", "diffrc.feature_steps=3",
                 "tracking.grid_per_class=0"]
    cfg = load_config(REPO / "configs" / "digits_lt.yaml", overrides)
    data = run_data(cfg)
    models = run_train(cfg, data)
    for method in ("ddpm", "cbdm+diffrop", "t2h", "diffrc", "pcg"):
        assert models[method].metrics["step"] == 3
    # DiffRC: its head-class source model and feature network trained first, the target from the
    # source; pcg (DDPM + the guidance alone): a feature network, fine-tuned from the DDPM, no source
    train_dir = cfg.run_dir / "train"
    assert {"diffrc-source", "diffrc-features", "pcg-features"} <= {p.name for p in train_dir.iterdir()}
    assert not (train_dir / "pcg-source").exists()
    assert json.loads((models["diffrc"].path / "manifest.json").read_text())["init_from"].endswith("diffrc-source/model.pt")
    assert json.loads((models["pcg"].path / "manifest.json").read_text())["init_from"].endswith("ddpm/model.pt")
    assert "diffrc_pair" in (models["diffrc"].path / "loss.csv").read_text().splitlines()[0].split(",")
    for method in ("diffrc", "pcg"):
        guidance = model_extras(models[method].weights)["guidance"]
        assert guidance["kind"] == "prototype" and guidance["weights"].endswith(f"{method}-features/features.pt")
    guided = run_sample(cfg, data, {m: models[m] for m in ("diffrc", "pcg")})  # through the guided denoiser
    assert {m: a.num_images for m, a in guided.items()} == {"diffrc": 2 * data.num_classes, "pcg": 2 * data.num_classes}
    # companion grids: DiffRC's frozen source and both models without their guidance, from the
    # evaluation set's noises (the same seeds), not evaluated
    samples = cfg.run_dir / "samples"
    assert {"diffrc-source", "diffrc-unguided", "pcg-unguided"} <= {p.name for p in samples.iterdir()}
    assert not (samples / "pcg-source").exists()
    import pyarrow.parquet as pq

    def images(folder):
        table = pq.read_table(samples / folder / "images").to_pydict()
        return {(lab, k): (seed, np.asarray(img)) for lab, k, seed, img in
                zip(table["label"], table["k"], table["seed"], table["image"])}

    guided_imgs, plain_imgs = images("diffrc"), images("diffrc-unguided")
    assert (samples / "diffrc-unguided" / "grid.png").stat().st_size > 0
    common = set(guided_imgs) & set(plain_imgs)
    assert len(common) == 2 * data.num_classes and all(guided_imgs[i][0] == plain_imgs[i][0] for i in common)
    header = (models["cbdm+diffrop"].path / "loss.csv").read_text().splitlines()[0].split(",")
    assert {"cbdm_reg", "cbdm_commit", "diffrop", "mse"} <= set(header)
    t2h = models["t2h"].path
    assert {"oc_moved", "oc_transfer_prob"} <= set((t2h / "loss.csv").read_text().splitlines()[0].split(","))
    assert (t2h / "oc_transfer.png").stat().st_size > 0
    curve = [float(line.split(",")[1]) for line in (t2h / "oc_transfer.csv").read_text().splitlines()[1:]]
    assert curve[-1] > curve[0] + 0.3  # (repeated tail rows in a balanced batch transfer even at t=0)
    manifest = json.loads((t2h / "manifest.json").read_text())
    assert manifest["init_from"].endswith("ddpm/model.pt") and manifest["resample"] == "balanced_batch"

    # DiffRC through the stages after sampling (what `train.methods=[diffrc]` runs): its evaluation,
    # its real + synthetic classifier arm (augmentation images from the guided denoiser) and the
    # report, which shows the source and unguided companion grids
    from pipeline.stages.s4_evaluate import run_evaluate
    from pipeline.stages.s5_classify import run_classify
    from pipeline.stages.s6_report import run_report

    rc = load_config(REPO / "configs" / "digits_lt.yaml", [
        *overrides, "train.methods=[diffrc]", "train.init_from=null", "classify.baselines=[ce]", "classify.epochs=1", "classify.batch_size=32",
        "classify.input_size=8", "classify.synthetic=per_class", "classify.per_class=5"])
    evaluated = run_evaluate(rc, data, {"diffrc": guided["diffrc"]})
    metrics = json.loads((evaluated["diffrc"].path / "metrics.json").read_text())
    assert metrics["fid"] > 0 and "diversity" in metrics
    arms = run_classify(rc, data, {"diffrc": models["diffrc"]})
    assert set(arms) == {"ce", "syn-diffrc"}
    table = (rc.run_dir / "classify" / "table.md").read_text()
    assert "| syn-diffrc |" in table and "| ce |" in table
    report = run_report(rc, {"data": data, "train": {"diffrc": models["diffrc"]}, "sample": {"diffrc": guided["diffrc"]},
                             "evaluate": evaluated, "classify": arms}).read_text()
    assert "diffrc-source" in report and "samples/diffrc-source/grid.png" in report

