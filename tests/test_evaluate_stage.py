"""The evaluate stage on a tiny trained digits model: metrics, caches, table, plots, bad input."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO, TINY_DDPM
from pipeline.config import load_config
from pipeline.stages.s1_data import run_data
from pipeline.errors import DataError, TaildiffError
from pipeline.stages.s4_evaluate import run_evaluate
from pipeline.stages.s3_sample import run_sample
from pipeline.common.shards import tensor_array
from pipeline.stages.s2_train import run_train

SETTINGS = [*TINY_DDPM, "sample.per_class=6", "sample.steps=4",
            "sample.batch_size=30", "sample.bf16=false", "evaluate.domain_epochs=4", "evaluate.kid_subset_size=20",
            "evaluate.prd_runs=2", "evaluate.prd_clusters_per_class=2"]


@pytest.fixture(scope="module")
def tiny_run(ray_session, tiny_ddpm_dir):
    out = tiny_ddpm_dir  # test_classify_stage's tiny DDPM (same training settings) is reused, not retrained
    cfg = load_config(REPO / "configs" / "digits_lt.yaml", [f"output_dir={out}", *SETTINGS])
    data = run_data(cfg)
    samples = run_sample(cfg, data, run_train(cfg, data))
    return cfg, data, samples


def test_evaluation_writes_metrics_table_and_plots(tiny_run):
    cfg, data, samples = tiny_run
    result = run_evaluate(cfg, data, samples)["ddpm"]
    m = result.metrics
    for key in ("fid", "kernel_inception_distance_mean", "precision", "recall", "inception_score_mean", "prd_f8",
                "prd_f1_8", "fid_thirds_few", "fid_absolute_many"):
        assert key in m
    assert m["extractor"]["extractor"] == "domain" and m["extractor"]["test_accuracy"] > 0.8
    assert len(m["per_class_fid"]) == 10 and m["per_class_samples"] == [6] * 10
    assert 0.0 <= m["memorization"]["all"] <= 1.0 and m["fid"] > 0
    div = m["diversity"]  # within-class mean pairwise feature distance, generated and real
    assert len(div["per_class"]) == 10 and all(v > 0 for v in div["per_class"] + div["real_per_class"])
    assert div["few"] > 0 and div["real_few"] > 0
    if cfg.evaluate.bootstrap:
        assert div["few_interval"][0] <= div["few_interval"][1]
    table = (cfg.run_dir / "evaluation" / "table.md").read_text()
    assert "| ddpm |" in table and "domain" in table and "diversity few (real)" in table
    fidelity = m["class_fidelity"]["per_class"]  # each class: a rate with its Wilson interval
    assert len(fidelity) == 10 and all(0 <= f["low"] <= f["rate"] <= f["high"] <= 1 for f in fidelity)
    rows = [ln for ln in table.splitlines() if ln.startswith("| ") and ln.count("|") == 5]
    names = data.manifest["class_names"]
    assert [r.split("|")[1].strip() for r in rows[1:]] == list(names)  # a row per class, after the header
    real = m["extractor"]["per_class_accuracy"]
    assert rows[1].split("|")[3].strip() == f"{100 * real[0]:.1f}"  # beside the real-image ceiling
    for png in ("per_class_fid.png", "memorization.png"):
        assert (result.path / png).stat().st_size > 0
    again = run_evaluate(cfg, data, samples)["ddpm"]
    assert again.skipped and again.metrics["fid"] == m["fid"]
    caches = list((cfg.run_dir.parent.parent / "extractors" / data.path.name).glob("features-domain-*.npz"))
    assert len(caches) == 1


def test_real_images_score_as_real(tiny_run):
    """The same code on real held-out images: low FID, and no memorisation beyond the calibration rate."""
    cfg, data, samples = tiny_run
    from pipeline.common.features import Extractor, real_features
    from models.evaluation.summary import generation_metrics
    from pipeline.stages.s4_evaluate import metric_settings

    ext = Extractor(cfg, data)
    real = real_features(ext, cfg, data)
    m = generation_metrics(real["test_feats"], real["test_logits"], real["test_labels"], real,
                           data.manifest["class_counts"], **metric_settings(cfg))
    assert m["memorization"]["all"] <= 0.05 and m["precision"] > 0.6
    copies = real["train_feats"][:200]
    m_copy = generation_metrics(copies, real["train_logits"][:200], real["train_labels"][:200], real,
                                data.manifest["class_counts"], **metric_settings(cfg))
    assert m_copy["memorization"]["all"] == 1.0


def test_bad_samples_and_weights(tiny_run, tmp_path):
    cfg, data, samples = tiny_run
    art = samples["ddpm"]
    bad = art.images_dir / "part-99999.parquet"
    pq.write_table(pa.table({"image": tensor_array(np.zeros((2, 9, 9, 1), np.uint8)), "label": [0, 1], "k": [0, 1],
                             "seed": [1, 2]}), bad)
    try:
        cfg_other = load_config(REPO / "configs" / "digits_lt.yaml",
                                [f"output_dir={cfg.output_dir}", *SETTINGS, "evaluate.prd_runs=3"])
        with pytest.raises(DataError, match="values per image"):
            run_evaluate(cfg_other, data, samples)
    finally:
        bad.unlink()
    junk = tmp_path / "inception.pt"
    junk.write_bytes(b"not a checkpoint")
    cfg_inc = load_config(REPO / "configs" / "digits_lt.yaml", [f"output_dir={cfg.output_dir}", *SETTINGS,
                                                                 "evaluate.extractor=inception",
                                                                 f"evaluate.weights_path={junk}"])
    with pytest.raises(TaildiffError, match="refusing evaluate.weights_path=.*not a plain tensor state dict"):
        run_evaluate(cfg_inc, data, samples)


def test_inception_extractor_on_a_fresh_weights_file(tiny_run, tmp_path):
    import torch
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from pipeline.common.features import Extractor

    class Fresh(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None

    torch.save({}, tmp_path / "empty.pt")
    weights = tmp_path / "inception.pt"
    torch.save(Fresh("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(tmp_path / "empty.pt"))
               .state_dict(), weights)
    cfg, data, _ = tiny_run
    cfg_inc = load_config(REPO / "configs" / "digits_lt.yaml", [f"output_dir={cfg.output_dir}", *SETTINGS,
                                                                 "evaluate.extractor=inception",
                                                                 f"evaluate.weights_path={weights}"])
    ext = Extractor(cfg_inc, data)
    feats, logits = ext(np.zeros((3, 8, 8, 1), np.uint8))  # grey images are replicated to RGB
    assert feats.shape == (3, 2048) and logits.shape[0] == 3 and ext.key.startswith("inception-")
