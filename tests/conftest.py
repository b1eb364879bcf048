"""Shared fixtures: one Ray instance for the whole session, small configs in temp folders."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.config import load_config

REPO = Path(__file__).resolve().parent.parent
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
# the tiny digits DDPM that test_classify_stage and test_evaluate_stage share (in tiny_ddpm_dir): one
# list, so that the two modules cannot drift apart and silently train it twice. The tiny configs of the
# tests that do not read TensorBoard's per-class checkpoint grid turn it off (tracking.grid_per_class=0):
# drawing it imports diffusers (its solver) in the worker, 4.3 CPU-seconds a fit on a 2-core machine.
TINY_DDPM = ["model.image_size=8", "train.steps=3", "train.batch_size=16", "train.log_every=3",
             "train.checkpoint_every=3", "train.bf16=false", "tracking.grid_per_class=0"]


@pytest.fixture(scope="session")
def ray_session():
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from pipeline.common.ray_setup import start_local_ray

    start_local_ray(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
                    object_store_memory=1_000_000_000)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_ddpm_dir(tmp_path_factory):
    """One output folder for the modules whose fixtures train the same tiny digits DDPM (TINY_DDPM):
    the first trains it, the next reuses it through the train stage's own skip
    (the same training config gives the same run key), as a rerun of the pipeline would."""
    return tmp_path_factory.mktemp("tiny-ddpm")


@pytest.fixture
def make_config(tmp_path):
    """A Config from a preset with overrides, writing under this test's temp folder."""

    def make(preset: str = "digits_lt", *overrides: str):
        return load_config(REPO / "configs" / f"{preset}.yaml", [f"output_dir={tmp_path / 'out'}", *overrides])

    return make
