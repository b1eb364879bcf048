"""The classify and report stages on tiny settings: training-set composition against the plan,
a 1-epoch Ray Train run per arm with its metrics and plots, reuse on rerun, the report."""
from __future__ import annotations

import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import REPO, TINY_DDPM
import torch

from models.classify.training import to_classifier_input
from pipeline.common.artifacts import load_classifier
from pipeline.stages.s5_classify import plan_arms, run_classify, synthetic_counts
from pipeline.stages.s1_data import run_data
from pipeline.stages.s6_report import run_report
from pipeline.stages.s2_train import run_train

TINY = [*TINY_DDPM, "sample.steps=3", "sample.batch_size=40", "sample.bf16=false", "classify.epochs=1",
        "classify.batch_size=64", "classify.steps=3", "classify.input_size=8"]  # digits' own 8×8


def test_synthetic_plans_fill_and_per_class(make_config):
    counts = [131, 101, 60, 13]
    fill = make_config("digits_lt", "classify.synthetic=fill")
    assert synthetic_counts(fill, counts) == [0, 30, 71, 118]
    capped = make_config("digits_lt", "classify.synthetic=fill", "classify.fill_to=100")
    assert synthetic_counts(capped, counts) == [0, 0, 40, 87]
    plus = make_config("digits_lt", "classify.synthetic=per_class", "classify.per_class=7")
    assert synthetic_counts(plus, counts) == [7, 7, 7, 7]
    arms = plan_arms(make_config("digits_lt", "classify.baselines=[la,ce]", "train.methods=[ddpm,cbdm]"))
    assert [a.name for a in arms] == ["ce", "la", "syn-ddpm", "syn-cbdm"]
    assert [a.method for a in arms] == [None, None, "ddpm", "cbdm"]
    both = plan_arms(make_config("digits_lt", "classify.baselines=[ce]", "classify.synthetic_recipes=[ce,rs]"))
    assert [(a.name, a.recipe) for a in both] == [("ce", "ce"), ("syn-ddpm", "ce"), ("syn-ddpm-rs", "rs")]
    filtered = plan_arms(make_config("digits_lt", "classify.baselines=[rs]", "classify.filter_min_confidence=0.5"))
    assert [a.name for a in filtered][:2] == ["ce", "rs"]  # the judge trains first


@pytest.fixture(scope="module")
def classified(ray_session, tiny_ddpm_dir):
    from pipeline.config import load_config

    out = tiny_ddpm_dir  # shared with test_evaluate_stage's tiny run: one DDPM fit for both
    cfg = load_config(REPO / "configs" / "digits_lt.yaml",
                      [f"output_dir={out}", *TINY, "classify.baselines=[ce,ldam_drw]", "classify.synthetic=per_class",
                       "classify.per_class=4", "stages=[data,train,classify,report]",
                       "classify.lr_schedule=cosine", "classify.warmup_epochs=0"])  # the lr moves within the epoch
    data = run_data(cfg)
    models = run_train(cfg, data)
    results = run_classify(cfg, data, models)
    return cfg, data, models, results


def test_training_set_composition_matches_the_plan(classified):
    cfg, data, _, results = classified
    art = results["syn-ddpm"]
    comp = art.composition
    assert comp["real"] == data.manifest["class_counts"]
    assert comp["synthetic"] == [4] * data.num_classes and comp["filtered_out"] == [0] * data.num_classes
    table = pq.read_table(cfg.run_dir / "classify" / "sets" / "ddpm" / "shards")
    labels, synthetic = table.column("label").to_numpy(), table.column("synthetic").to_numpy()
    assert np.bincount(labels[~synthetic], minlength=10).tolist() == comp["real"]
    assert np.bincount(labels[synthetic], minlength=10).tolist() == comp["synthetic"]
    seeds = table.column("seed").to_numpy()
    assert (seeds[~synthetic] == -1).all() and len(set(seeds[synthetic])) == synthetic.sum()
    # the synthetic rows are the augmentation samples, not the evaluation ones
    meta = json.loads((cfg.run_dir / "samples" / "ddpm-augment" / "manifest.json").read_text())
    assert meta["counts"] == [4] * 10 and meta["sample"]["steps"] == 3


def test_each_arm_trains_one_epoch_on_ray_train_and_reports(classified):
    cfg, data, _, results = classified
    assert list(results) == ["ce", "ldam_drw", "syn-ddpm"]
    for name, art in results.items():
        m = art.metrics
        last = m["last"]
        for key in ("accuracy", "balanced_accuracy", "macro_precision", "macro_recall", "macro_f1",
                    "many_accuracy", "medium_accuracy", "few_accuracy", "group_std"):
            assert 0.0 <= last[key] <= 1.0, (name, key)
        assert np.array(last["confusion"]).sum() == data.manifest["num_test"]
        assert m["epochs"] == 1 and m["best_epoch"] == 1
        for f in ("model.pt", "metrics.json", "history.csv", "confusion.png", "manifest.json"):
            assert (art.path / f).is_file(), (name, f)
        net, size = load_classifier(art.path / "model.pt")  # the canvas it trained on travels with it
        assert size == 8 and net(torch.zeros(2, 1, size, size)).shape == (2, 10)
    table = (cfg.run_dir / "classify" / "table.md").read_text()
    for name in results:
        assert f"| {name} |" in table
    assert "LDAM-DRW" in table and "LT real + synthetic (ddpm)" in table


def test_the_cosine_schedule_sets_the_lr_per_iteration(classified):
    from models.classify.lt_losses import EpochSchedule

    cfg, _, _, results = classified
    c = cfg.classify
    schedule = EpochSchedule.scaled(c.epochs, c.lr, c.warmup_epochs, c.decay_epochs, c.drw_epoch, "cosine")
    for name, art in results.items():
        steps = sum(art.composition["real"]) + sum(art.composition["synthetic"])
        steps //= c.batch_size
        lines = (art.path / "history.csv").read_text().splitlines()
        lr = float(lines[-1].split(",")[lines[0].split(",").index("lr")])  # one epoch: the cosine's last value
        assert lr == pytest.approx(schedule.lr_at(0, steps - 1, steps), rel=1e-4), name
        assert lr < 0.5 * c.lr  # not the per-epoch value


def test_an_unknown_lr_schedule_is_one_line(make_config):
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=r"unknown classify.lr_schedule 'linear': use one of step, cosine$"):
        make_config("digits_lt", "classify.lr_schedule=linear")


def test_input_size_smaller_than_the_images_is_one_line(make_config):
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="classify.input_size=4 is too small"):
        make_config("digits_lt", "classify.input_size=4")
    images = torch.randint(0, 256, (3, 28, 28, 1), dtype=torch.uint8)
    x = to_classifier_input(images, augment=True, generator=torch.Generator().manual_seed(0), size=28,
                            channels_last=True)
    assert x.shape == (3, 1, 28, 28) and x.is_contiguous(memory_format=torch.channels_last)
    assert to_classifier_input(images).shape == (3, 1, 32, 32)  # the recipe's canvas by default


def test_rerun_reuses_every_arm(classified):
    cfg, data, models, results = classified
    again = run_classify(cfg, data, models)
    assert all(art.skipped for art in again.values())
    assert again["ce"].metrics["last"] == results["ce"].metrics["last"]


def test_report_contains_every_table_and_image(classified):
    cfg, data, models, results = classified
    path = run_report(cfg, {"data": data, "train": models, "classify": results})
    text = path.read_text()
    for heading in ("## Dataset", "## Training", "## Classification"):
        assert heading in text
    assert "| arm | training set |" in text and "Training-set composition" in text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links, "the report shows no images"
    for link in links:
        assert (path.parent / link).is_file(), link
    for name in results:
        assert f"classify/{name}/confusion.png" in links
    assert "train/ddpm/loss.png" in links


def test_confidence_filter_keeps_what_the_real_data_classifier_believes(tmp_path):
    import torch

    from models.classify.resnet import resnet32
    from pipeline.stages.s5_classify import confidence_filter

    net = resnet32(3, in_channels=1)
    with torch.no_grad():  # a classifier sure of class 0 (p ≈ 0.88) whatever the image
        net.head.weight.zero_()
        net.head.bias.copy_(torch.tensor([3.0, 1.0, 0.0]))
    torch.save({"net": net.state_dict(), "recipe": "ce", "num_classes": 3, "in_channels": 1, "epoch": 1},
               tmp_path / "model.pt")
    images = np.random.default_rng(0).integers(0, 256, (6, 28, 28, 1), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2])
    p = np.exp([3.0, 1.0, 0.0]) / np.exp([3.0, 1.0, 0.0]).sum()
    assert confidence_filter(tmp_path / "model.pt", images, labels, 0.5).tolist() == [True, False, False] * 2
    keep_two = confidence_filter(tmp_path / "model.pt", images, labels, float(p[1]) - 1e-4)
    assert keep_two.tolist() == [True, True, False] * 2


def test_report_html_of_a_real_run(classified):
    """report.html of a real tiny run: one self-contained page embedding every confusion matrix."""
    import base64

    cfg, data, models, results = classified
    run_report(cfg, {"data": data, "train": models, "classify": results})
    text = (cfg.run_dir / "report.html").read_text()
    assert "http://" not in text and "https://" not in text
    for attr, value in re.findall(r'\b(src|href)\s*=\s*"([^"]*)"', text):
        assert value.startswith("data:image/") if attr == "src" else value.startswith("#"), (attr, value[:60])
    for name, art in results.items():
        tag = re.search(rf'<img src="data:image/png;base64,([^"]+)" alt="{re.escape(name)} confusion matrix">', text)
        assert tag, name
        assert base64.b64decode(tag.group(1)) == (art.path / "confusion.png").read_bytes(), name
    assert text.count("<img ") == len(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (cfg.run_dir / "report.md").read_text()))
