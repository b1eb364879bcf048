"""Tune sweeps: every space file samples valid configs, bad spaces fail with one line, a 2-trial
training sweep with an early-stopped trial leaks no CPUs, a 3-value ω sweep writes its table,
plot and a best-config YAML that round-trips into a run."""
import json
import math
import time

import numpy as np
import pytest
import yaml

from conftest import REPO
from models.methods.registry import METHODS, method_parts
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.tuning.space import load_space, point_config, sample_points
from pipeline.errors import TaildiffError
from pipeline.tuning.train_sweep import check_trial_fits, max_concurrent

SPACES = sorted((REPO / "tune_spaces").glob("*.yaml"))
TINY = ["model.image_size=8", "train.steps=4", "train.batch_size=16", "train.log_every=2",
        "train.checkpoint_every=2", "train.bf16=false", "train.cpus_per_worker=0.5", "train.torch_threads=1",
        "train.max_failures=0", "sample.per_class=2", "sample.batch_size=20", "sample.bf16=false",
        "evaluate.domain_epochs=1", "tracking.grid_per_class=0"]


def test_space_files_exist_for_each_method_family():
    names = {p.stem for p in SPACES}
    assert {"cbdm", "oc", "diffrop", "guidance"} <= names


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.stem)
def test_every_space_samples_valid_configs(path):
    base = load_config()
    space = load_space(path, base)
    assert all(p in METHODS for p in space.method.split("+"))
    points = sample_points(space, 5, seed=1)
    assert points and all(set(p) == set(space.space) for p in points)
    for point in points:
        cfg = point_config(base, space, point)
        for key, value in point.items():  # the drawn value is what the run will use
            section, name = key.split(".")
            got = getattr(getattr(cfg, section), name)
            assert got == (tuple(value.split(",")) if isinstance(got, tuple) and isinstance(value, str) else value)
        for method in cfg.train.methods:
            method_parts(method)
    if path.stem == "guidance":
        omegas = yaml.safe_load(path.read_text())["space"]["sample.omega"]["grid"]
        assert omegas == pytest.approx([0.2 * i for i in range(11)])


@pytest.mark.parametrize("body, message", [
    ("method: cbdm\nspace:\n  cbdm.tua: {uniform: [0, 1]}\n", "did you mean cbdm.tau"),
    ("method: ddpm\nspace:\n  cbdm.tau: {uniform: [0, 1]}\n", "no effect on method ddpm"),
    ("method: cbdmm\nspace:\n  cbdm.tau: {uniform: [0, 1]}\n", "unknown method"),
    ("method: cbdm\nspace:\n  cbdm.label_set: {choice: [train, bogus]}\n", "unknown CBDM label set"),
    ("method: cbdm\nspace:\n  cbdm.tau: {normal: [0, 1]}\n", "must be {one of"),
    ("method: cbdm\nspace:\n  cbdm.tau: {loguniform: [0, 1]}\n", "lo > 0"),
    ("method: cbdm\nkind: sample\nspace:\n  cbdm.tau: {uniform: [0, 1]}\n", "only sample.* keys"),
    ("method: cbdm\nspace:\n  data.imb_factor: {uniform: [0.01, 1]}\n", "shares one dataset"),
    ("method: ddpm\nkind: sample\nspace:\n  sample.steps: {grid: [5, 5000]}\n", "sample.steps=5000"),
    ("method: ddpm\nspaces:\n  sample.steps: {grid: [5]}\n", "unknown key(s) spaces"),
])
def test_bad_spaces_fail_with_one_line(tmp_path, body, message):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")
                       .replace("{", r"\{")) as info:
        load_space(path)
    assert "\n" not in str(info.value)


def test_a_trial_that_cannot_fit_is_one_line_naming_the_fix():
    base = load_config()  # the default preset: 1 CPU per worker
    with pytest.raises(TaildiffError, match="train.cpus_per_worker=0.5"):
        check_trial_fits(base, {"CPU": 2})  # 1 + 0.01 + 1 for the stream > 2: it would wait forever
    check_trial_fits(load_config(overrides=["train.cpus_per_worker=0.5"]), {"CPU": 2})
    check_trial_fits(base, {"CPU": 3})


def test_max_concurrent_leaves_a_cpu_per_trial_for_ray_data():
    base = load_config(overrides=["train.cpus_per_worker=1", "train.num_workers=1"])
    assert max_concurrent(base, {"CPU": 2}) == 1
    assert max_concurrent(base, {"CPU": 9}) == 4
    assert max_concurrent(base, {"CPU": 1}) == 1
    half = load_config(overrides=["train.cpus_per_worker=0.5"])
    assert max_concurrent(half, {"CPU": 2}) == 1 and max_concurrent(half, {"CPU": 3}) == 2
    gpu = load_config(overrides=["train.use_gpu=true", "train.num_workers=2", "train.batch_size=64"])
    assert max_concurrent(gpu, {"CPU": 16, "GPU": 4}) == 2 and max_concurrent(gpu, {"CPU": 6, "GPU": 8}) == 2
    auto = load_config(overrides=["train.num_workers=2", "train.batch_size=64"])  # use_gpu: auto
    assert max_concurrent(auto, {"CPU": 16, "GPU": 4}) == 2 and max_concurrent(auto, {"CPU": 16}) == 5


@pytest.fixture(scope="module")
def tune_ray():
    """Ray with its dashboard (a stopped trial's placement group is freed through it); the
    session's plain instance is restored afterwards for the other test modules."""
    import ray

    was_running = ray.is_initialized()
    if was_running:
        ray.shutdown()
    from pipeline.tuning.cli import local_ray_options

    ray.init(num_cpus=2, log_to_driver=False, configure_logging=False, **local_ray_options())
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
    if was_running:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False


def _free_cpus_back(ray, start: float, timeout: float = 30.0) -> float:
    deadline = time.time() + timeout
    while True:
        free = ray.available_resources().get("CPU", 0.0)
        if free >= start or time.time() > deadline:
            return free
        time.sleep(0.5)


def test_training_sweep_two_trials_early_stop_frees_cpus(tune_ray, tmp_path):
    from pipeline.tuning.cli import run_tune

    base = load_config(REPO / "configs" / "digits_lt.yaml", [f"output_dir={tmp_path}", *TINY, "train.steps=8"])
    space_file = tmp_path / "cbdm_tiny.yaml"
    space_file.write_text("method: cbdm\nkind: train\nscheduler: {type: asha, grace_period: 2}\n"
                          "proxy: {images: 20, steps: 2, batch_size: 20}\n"
                          "space:\n  cbdm.tau: {grid: [0.5, 2.0]}\n  cbdm.label_set: {choice: [balanced]}\n")
    space = load_space(space_file, base)
    start = tune_ray.available_resources()["CPU"]

    def stop_low_tau(trial_id, result):  # a deterministic early stop after the first checkpoint
        return result.get("config", {}).get("cbdm.tau") == 0.5 and "fid" in result

    result = run_tune(base, space, stop=stop_low_tau)
    rows = {r["params"]["cbdm.tau"]: r for r in result["rows"]}
    assert set(rows) == {0.5, 2.0}
    assert rows[0.5]["status"] == "stopped" and rows[0.5]["step"] < 8
    assert all(math.isfinite(r["fid"]) and r["fid"] > 0 for r in rows.values())
    assert [s for s, _ in rows[2.0]["fid_history"]][0] == 2
    assert _free_cpus_back(tune_ray, start) == start  # no leaked placement group
    out = result["dir"]
    for name in ("results.md", "results.csv", "fid_curves.png", "fid_vs_cbdm_tau.png", "sweep.json"):
        assert (out / name).stat().st_size > 0
    assert len({r["run_dir"] for r in result["rows"]}) == 2  # trials never share a run folder
    best = load_config(result["best_yaml"][0])
    assert best.train.methods == ("cbdm",) and best.cbdm.tau == result["best"]["params"]["cbdm.tau"]
    assert best.cbdm.label_set == "balanced" and best.train.steps == 8


def test_guidance_sweep_three_omegas_best_yaml_round_trips(tune_ray, tmp_path):
    from pipeline.stages.s1_data import run_data
    from pipeline.run import main as run_main
    from pipeline.stages.s3_sample import run_sample
    from pipeline.stages.s2_train import run_train
    from pipeline.tuning.cli import run_tune

    cfg = load_config(REPO / "configs" / "digits_lt.yaml", [f"output_dir={tmp_path}", *TINY])
    data = run_data(cfg)
    model = run_train(cfg, data)["ddpm"]
    space_file = tmp_path / "omega.yaml"
    space_file.write_text("kind: sample\nimages: 30\nspace:\n  sample.omega: {grid: [0.0, 1.0, 2.0]}\n"
                          "  sample.steps: {grid: [3]}\n")
    space = load_space(space_file, cfg)
    result = run_tune(cfg, space, checkpoints=[str(model.weights)], overrides=["sample.bf16=false"])
    rows = result["rows"]
    assert [r["params"]["sample.omega"] for r in rows] == [0.0, 1.0, 2.0]
    assert all(math.isfinite(r["fid"]) and r["images"] == 30 for r in rows)
    assert all(0 <= r["class_fidelity"] <= 1 and len(r["class_fidelity_per_class"]) == 10 for r in rows)
    for r in rows:  # the overall rate is the mean of the per-class rates on a balanced set of 3 per class
        assert r["class_fidelity"] == pytest.approx(np.mean(r["class_fidelity_per_class"]))
    assert (result["dir"] / "fid_vs_omega.png").stat().st_size > 0
    assert "| ddpm |" in (result["dir"] / "results.md").read_text()
    assert "class_fidelity" in (result["dir"] / "results.md").read_text()
    kept = json.loads((result["dir"] / "sweep.json").read_text())["rows"]
    assert [r["class_fidelity_per_class"] for r in kept] == [r["class_fidelity_per_class"] for r in rows]
    best_yaml = result["best_yaml"][0]
    best_omega = min(rows, key=lambda r: r["fid"])["params"]["sample.omega"]
    assert run_main(["--config", str(best_yaml), "--dry-run"]) == 0
    best = load_config(best_yaml)
    assert best.sample.omega == best_omega and best.sample.steps == 3 and best.name == cfg.name
    again = run_train(best, run_data(best))["ddpm"]
    assert again.skipped and again.weights == model.weights  # the trained model is reused, not retrained
    samples = run_sample(best, run_data(best), {"ddpm": again})["ddpm"]
    assert samples.num_images == 2 * 10


def test_a_trial_with_a_deterministic_error_is_reported_not_retried(tmp_path, monkeypatch):
    """A TaildiffError (bad input: retrying cannot help) ends the trial normally with error.json, so
    Tune's retries (kept for lost nodes, tests/fault_cluster.py) do not rerun it; the table says why."""
    from types import SimpleNamespace

    import ray.tune.integration.ray_train as tune_train
    from ray import tune

    import pipeline.stages.s2_train as s2
    from pipeline.errors import TaildiffError
    from pipeline.tuning.train_sweep import collect_trials, trial_function

    base = load_config(REPO / "configs" / "digits_lt.yaml", [f"output_dir={tmp_path}", *TINY])
    space_file = tmp_path / "ddpm_tiny.yaml"
    space_file.write_text("method: ddpm\nkind: train\nproxy: {images: 20, steps: 2, batch_size: 20}\n"
                          "space:\n  train.p_uncond: {grid: [0.1]}\n")
    space = load_space(space_file, base)
    calls = []

    def fails(cfg, data, tune_hooks=None):
        calls.append(cfg.name)
        raise TaildiffError("training failed: ValueError: a batch of 16 needs at least 16 training images")

    monkeypatch.setattr(tune, "get_context", lambda: SimpleNamespace(get_trial_id=lambda: "t0"))
    monkeypatch.setattr(s2, "run_train", fails)
    monkeypatch.setattr(tune_train, "TuneReportCallback", lambda: None)  # needs a live Tune session
    (params,) = sample_points(space, 1, seed=0)
    trial_function(params, base=base.to_dict(), space=space.__dict__, data=None, sweep_dir=str(tmp_path / "sw"),
                   proxy={})  # returns: Tune sees a finished trial, not a failure to retry
    (row,) = collect_trials(tmp_path / "sw", 4)
    assert calls == ["trial-t0"] and row["status"] == "error" and row["attempts"] == 1, row
    assert "needs at least 16 training images" in row["error"] and row["fid"] is None
