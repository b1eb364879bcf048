"""The interval arithmetic (models/evaluation/intervals.py) on constructed cases, and a 2-method ×
2-seed study on digits through the CLI: results.json with intervals for every metric, paired
evaluation sets, and a rerun that reuses everything."""
import json
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO
from pipeline.common.machine import git_commit
from pipeline.tools.study_report import _invocations
from models.evaluation.intervals import (bootstrap_indices, fid_interval, gaussian_stats, mean_interval,
                                         paired_fid_difference, paired_seed_difference, percentile_interval,
                                         wilson_interval)


def test_wilson_interval_covers_at_the_nominal_rate():
    rng = np.random.default_rng(0)
    p, n, trials = 0.2, 200, 2000  # (at small n the discrete coverage oscillates around 95%)
    covered = 0
    for _ in range(trials):
        lo, hi = wilson_interval(int(rng.binomial(n, p)), n)
        covered += lo <= p <= hi
    assert 0.93 <= covered / trials <= 0.975
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0  # the bounds hold the rate exactly


def test_t_interval_of_the_mean_covers_at_the_nominal_rate():
    rng = np.random.default_rng(1)
    covered = sum(iv["low"] <= 5.0 <= iv["high"]
                  for iv in (mean_interval(rng.normal(5.0, 2.0, 3)) for _ in range(3000)))
    assert 0.93 <= covered / 3000 <= 0.97
    d = paired_seed_difference([80.0, 81.0, 79.5], [78.0, 79.2, 77.9])
    assert d["real"] and d["low"] > 0 and d["n"] == 3


def test_centred_fid_interval_covers_the_expected_fid_at_the_nominal_rate():
    """FID is biased by the sample size (≈ +tr Σ/n), and a bootstrap resample (~63% distinct images)
    carries more of that bias than the set: the plain percentile interval sits above the point estimate
    and misses E[FID of n images]. Re-centred on the point estimate it covers it at about the nominal
    rate (here, D = 16, n = 500, 150 sets × 200 replicates: centred 91%, plain 59%; at 300 sets the centred
    interval covered 96%)."""
    from models.evaluation.intervals import frechet_from_stats

    rng = np.random.default_rng(0)
    D, n, sets, replicates = 16, 500, 150, 200
    mu, root = np.full(D, 0.15), np.eye(D) * 0.9 + rng.normal(size=(D, D)) * 0.1
    truth = (np.zeros(D), np.eye(D))
    draw = lambda: mu + rng.normal(size=(n, D)) @ root.T  # noqa: E731
    expected = np.mean([frechet_from_stats(*gaussian_stats(draw()), *truth) for _ in range(1000)])
    centred = plain = 0
    for i in range(sets):
        feats = draw()
        lo, hi = fid_interval(feats, truth, replicates=replicates, seed=i)
        point = frechet_from_stats(*gaussian_stats(feats), *truth)
        reps = [frechet_from_stats(*gaussian_stats(feats[idx]), *truth) for idx in bootstrap_indices(n, replicates, i)]
        p_lo, p_hi = percentile_interval(reps)
        assert lo <= point <= hi
        centred += lo <= expected <= hi
        plain += p_lo <= expected <= p_hi
    print(f"coverage of E[FID at n]: centred {centred / sets:.2f}, plain percentile {plain / sets:.2f}")
    assert 0.88 <= centred / sets <= 1.0 and plain / sets < 0.7, (centred, plain)


def test_bootstrap_fid_interval_covers_the_truth_and_a_set_against_itself_is_zero():
    """Many independent draws from the same Gaussian: the percentile interval of FID(draw, truth)
    covers the population FID of the finite set of that size most of the time."""
    rng = np.random.default_rng(2)
    D, n = 4, 400
    truth = (np.zeros(D), np.eye(D))
    feats = rng.normal(size=(n, D))
    lo, hi = fid_interval(feats, truth, replicates=200, seed=0)
    assert lo < hi and lo >= 0
    from models.evaluation.intervals import frechet_from_stats

    point = frechet_from_stats(*gaussian_stats(feats), *truth)
    assert lo <= point <= hi
    same = paired_fid_difference(feats, feats, truth, replicates=100, seed=0)
    assert same["difference"] == 0.0 and same["low"] == 0.0 and same["high"] == 0.0 and not same["real"]
    other = paired_fid_difference(feats + 0.5, feats, truth, replicates=100, seed=0)
    assert other["real"] and other["low"] > 0
    strata = np.repeat(np.arange(4), 100)
    idx = bootstrap_indices(400, 5, seed=0, strata=strata)
    assert all((np.bincount(strata[i], minlength=4) == 100).all() for i in idx)  # a balanced set stays balanced


def test_the_study_clock_sums_invocations_and_keeps_an_interrupted_one(tmp_path):
    """An invocation that stops after a phase (interrupt, crash) keeps its seconds in the run folder;
    the next invocation's totals add to them."""
    from pipeline.tools.study_clock import InvocationClock

    first = InvocationClock(tmp_path, heartbeat_s=None)  # where: this checkout's HEAD and this machine
    first.lap("train", 100.0)
    first.lap("sample_evaluate", 40.0)  # ... then the process dies: nothing else is written
    other = {"commit": "f" * 40, "machine": {"cpu": "Some CPU (AVX-512)", "cores": 16, "gpu": None}}
    second = InvocationClock(tmp_path, heartbeat_s=None, where=other)  # resumed elsewhere, at another commit
    second.lap("train", 2.0)  # everything reused
    second.lap("classify", 30.0)
    total = second.totals()
    runs = total.pop("runs")
    assert total == {"seconds": 172.0, "invocations": 2,
                     "seconds_by_phase": {"train": 102.0, "sample_evaluate": 40.0, "classify": 30.0}}
    assert [r["seconds"] for r in runs] == [140.0, 32.0] and runs[1]["machine"] == other["machine"]
    assert runs[0]["commit"] == git_commit() and runs[0]["machine"]["cores"] >= 1 and runs[0]["machine"]["cpu"]
    record = json.loads((tmp_path / "study_timings.json").read_text())
    assert [inv["seconds"] for inv in record["invocations"]] == [140.0, 32.0]
    # the table's header names each invocation's start, commit, machine and minutes
    header = _invocations({"invocation_log": runs})
    assert "2 invocations" in header and "at fffffff on Some CPU (AVX-512), 16 cores: 32 s" in header
    assert f"at {(git_commit() or 'unrecorded commit')[:7]} on " in header


def test_the_machine_record_names_the_cpu_isa():
    from pipeline.common.machine import cpu_name, describe

    info = "model name\t: AMD EPYC 9R14\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n"
    assert cpu_name(info) == "AMD EPYC 9R14 (AVX-512)"
    assert cpu_name(info.replace(" avx512f avx512_bf16", "")) == "AMD EPYC 9R14 (AVX2)"
    assert cpu_name(info.replace("avx512_bf16", "amx_bf16")) == "AMD EPYC 9R14 (AMX)"
    assert cpu_name("processor : 0\n") == "unknown"
    assert describe({"cpu": "X (AVX2)", "cores": 2, "gpu": None}) == "X (AVX2), 2 cores"
    assert describe({"cpu": "X (AMX)", "cores": 8, "gpu": "1x NVIDIA H100"}).endswith("GPU: 1x NVIDIA H100")


def test_the_study_clock_keeps_the_seconds_of_a_phase_that_a_kill_cut_short(tmp_path):
    """A SIGKILL mid-phase (a session's end) skips the lap: the heartbeat's last `running` value counts as
    `interrupted` in the totals, so the resumed study does not lose the time its first invocation spent."""
    from pipeline.tools.study_clock import InvocationClock

    t = [0.0]
    first = InvocationClock(tmp_path, heartbeat_s=None, now=lambda: t[0])
    t[0] = 100.0
    assert first.lap("train") == 100.0
    with pytest.raises(ValueError, match="unknown study phase 'trian'"):  # a misspelt lap would corrupt the order
        first.lap("trian")
    t[0] = 130.0
    first.beat()  # 30 s into the next phase (train_equal_compute) ...
    t[0] = 140.0  # ... killed: no lap, no close, the last 10 s are lost (at most one heartbeat period)
    second = InvocationClock(tmp_path, heartbeat_s=None, now=lambda: t[0])
    t[0] = 145.0
    second.lap("train")  # reused
    t[0] = 165.0
    second.lap("sample_evaluate")  # only the part the first invocation had not finished (equal compute skipped)
    second.close()
    total = second.totals()
    runs = total.pop("runs")
    assert total == {"seconds": 155.0, "invocations": 2,
                     "seconds_by_phase": {"train": 105.0, "interrupted": 30.0, "sample_evaluate": 20.0}}
    assert [(r["seconds"], r.get("killed_in")) for r in runs] == [(130.0, "train_equal_compute"), (25.0, None)]
    record = json.loads((tmp_path / "study_timings.json").read_text())
    assert [inv.get("running") for inv in record["invocations"]] == [30.0, None]


def test_the_study_clock_beats_in_the_background_and_an_exception_keeps_its_phase(tmp_path):
    import time

    from pipeline.tools.study_clock import InvocationClock

    path = tmp_path / "study_timings.json"
    clock = InvocationClock(tmp_path, heartbeat_s=0.02)
    deadline = time.monotonic() + 10
    while not (path.exists() and "running" in json.loads(path.read_text())["invocations"][0]):
        assert time.monotonic() < deadline, "no heartbeat written"
        time.sleep(0.01)
    clock.lap("train")
    clock.close()  # finished: nothing under way is left on the record
    assert "running" not in json.loads(path.read_text())["invocations"][0]
    failed = InvocationClock(tmp_path, heartbeat_s=None)
    failed.close(interrupted=True)  # the exception path: the unfinished phase's seconds are written
    assert json.loads(path.read_text())["invocations"][1]["running"] >= 0.0
    assert "interrupted" in InvocationClock(tmp_path, heartbeat_s=None).totals()["seconds_by_phase"]


def test_a_named_base_run_with_a_finished_ddpm_is_shared_as_it_is(tmp_path):
    """A study whose config differs from the base run's (another seed) reuses that run's DDPM: it
    must not retrain it, which would overwrite the model every other study of the folder shares."""
    from pipeline.config import load_config
    from pipeline.tools.study import base_model

    cfg = load_config(REPO / "configs" / "fmnist_lt_study.yaml", [f"output_dir={tmp_path}", "seed=7",
                                                                          "study.base=fmnist_lt"])
    ddpm = tmp_path / "runs" / "fmnist_lt" / "train" / "ddpm"
    ddpm.mkdir(parents=True)
    (ddpm / "manifest.json").write_text(json.dumps({"run_key": "another config", "metrics": {"step": 2000}}))
    (ddpm / "model.pt").write_bytes(b"weights")
    assert base_model(cfg, data=None) == (ddpm / "model.pt").resolve()  # no training: data is never touched
    assert (ddpm / "model.pt").read_bytes() == b"weights"


def test_a_method_with_its_own_source_gets_the_equal_total_budget_and_its_classifier_arm():
    """DiffRC trains a head-class source from scratch, so the study gives it source + target =
    train.steps + train.finetune_steps (every other method's DDPM + fine-tune), in a run of its own;
    its classifier arm is kept whatever its FID (study.classify_always)."""
    from types import SimpleNamespace

    from pipeline.config import load_config
    from pipeline.config.validate import validate
    from pipeline.tools.study import _replace, classify_config, classify_methods, own_source_runs

    cfg = load_config(REPO / "configs" / "fmnist_lt_study.yaml", ["study.classify_top=3"])
    runs = own_source_runs(cfg)
    assert [ms for _, ms in runs] == [("diffrc_cfg",)]
    own = runs[0][0]
    assert own.name == "fmnist_lt_study-own" and own.train.init_from is None
    assert cfg.diffrc.source_steps + own.train.finetune_steps == cfg.train.steps + cfg.train.finetune_steps == 2100
    assert cfg.train.finetune_lr == 2.0e-4 and own.train.finetune_lr is None  # the target learns at train.lr
    assert own_source_runs(load_config(REPO / "configs" / "fmnist_lt_study.yaml",
                                       ["study.methods=[ddpm,cbdm]"])) == []

    def ev(few):
        return SimpleNamespace(metrics={"fid_thirds_few": few})

    evaluations = {"ddpm": ev(9.0), "cbdm": ev(8.0), "rs": ev(5.0), "t2h": ev(7.0), "diffrc_cfg": ev(20.0)}
    assert classify_methods(cfg.study, evaluations) == ["ddpm", "rs", "t2h", "cbdm", "diffrc_cfg"]
    evaluations["diffrc_cfg"] = ev(1.0)  # already among the best: listed once
    assert classify_methods(cfg.study, evaluations) == ["ddpm", "diffrc_cfg", "rs", "t2h"]
    chosen = classify_methods(cfg.study, evaluations)
    ft = _replace(cfg, train={"methods": tuple(m for m in cfg.study.methods if m != "diffrc_cfg")})
    validate(classify_config(ft, chosen))  # DiffRC, trained in its own run, is still a method of its arm
    del evaluations["diffrc_cfg"]  # not in this study: nothing to classify
    assert classify_methods(cfg.study, evaluations) == ["ddpm", "rs", "t2h", "cbdm"]


TINY = ["model.image_size=8", "train.steps=12", "train.finetune_steps=6", "train.batch_size=16", "train.log_every=6",
        "train.checkpoint_every=6", "train.bf16=false", "sample.per_class=6", "sample.steps=3", "sample.batch_size=60",
        "sample.bf16=false", "classify.epochs=1", "classify.batch_size=64", "classify.input_size=8", "classify.baselines=[ce]",
        "classify.synthetic=per_class", "classify.per_class=3", "classify.steps=3", "classify.seeds=2",
        "evaluate.bootstrap=20", "evaluate.prd_runs=2", "tracking.grid_per_class=0",
        "study.base=null", "study.methods=[ddpm,cbdm]", "study.equal_compute=[cbdm]", "study.omega_grid=[1.0,2.0]",
        "study.omega_images=20", "study.classify_top=1"]


def test_a_tiny_study_writes_intervals_and_reuses_everything(ray_session, tmp_path, caplog):
    """The study on the session's Ray (run_study, what `run.py study` calls), then the same study
    again through the CLI, which must reuse every piece."""
    import logging
    import re

    from pipeline.config import load_config
    from pipeline.tools.study import run_study

    caplog.set_level(logging.INFO, logger="taildiff")
    overrides = [f"output_dir={tmp_path}", f"study.results_dir={tmp_path / 'results'}", *TINY]
    run_study(load_config(REPO / "configs" / "digits_lt.yaml", overrides))
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    for m in ("ddpm", "cbdm"):
        g = results["generation"][m]
        for key in ("fid", "fid_thirds_many", "fid_thirds_few"):
            lo, hi = g[f"{key}_interval"]
            assert lo <= g[key] <= hi or np.isclose(lo, hi), (m, key)
        assert {"rate", "low", "high"} <= set(g["class_fidelity"]["all"]) and "speckle" in g
    diff = results["paired_generation"]["cbdm - ddpm"]["fid"]
    assert diff["low"] <= diff["difference"] <= diff["high"]
    cls = results["classification"]
    assert cls["ce"]["seeds"] == [0, 1] and cls["ce"]["accuracy"]["n"] == 2
    assert np.isfinite(cls["ce"]["accuracy"]["low"])
    assert "syn-ddpm - ce" in results["classification_differences"]
    vs_ddpm = results["classification_differences"]["syn-cbdm - syn-ddpm"]["accuracy"]  # paired over the 2 seeds
    assert vs_ddpm["low"] <= vs_ddpm["mean"] <= vs_ddpm["high"]
    assert "ce - syn-ddpm" not in results["classification_differences"]  # baselines only against CE and the best
    assert any(k.startswith("cbdm@") for k in results["generation_equal_compute"])
    assert {c["verdict"].split(" ")[0] for c in results["claims"]} <= {"reproduced", "not", "inconclusive"}
    assert (tmp_path / "results" / "table.md").is_file() and (tmp_path / "results" / "fid_per_group.png").is_file()
    # paired: both methods' evaluation sets hold the same per-image seeds
    seeds = [np.load(tmp_path / "runs" / "digits_lt" / "evaluation" / m / "features.npz")["seed"] for m in ("ddpm", "cbdm")]
    assert np.array_equal(np.sort(seeds[0]), np.sort(seeds[1]))

    sets = [arg for item in overrides for arg in ("--set", item)]
    cmd = [sys.executable, str(REPO / "pipeline" / "run.py"), "study", "--config", "configs/digits_lt.yaml", *sets]
    started = time.perf_counter()
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reusing" in again.stderr
    assert not re.search(r"train\[[^\]]+\]: \d+ steps", again.stderr)  # nothing retrained ...
    assert not re.search(r"sample\[[^\]]+\]: \d+ images in", again.stderr)  # ... resampled ...
    assert not re.search(r"classify\[[^\]]+\]: top-1", again.stderr)  # ... or refitted
    rerun = json.loads((tmp_path / "results" / "results.json").read_text())
    assert rerun["invocations"] == 2  # the wall time sums both invocations: the first one's cost is kept
    assert [r["commit"] for r in rerun["invocation_log"]] == [git_commit()] * 2
    assert "summed over 2 invocations" in (tmp_path / "results" / "table.md").read_text()
    assert rerun["seconds"] >= results["seconds"] + rerun["seconds_this_invocation"] - 1.0
    print(f"tiny study rerun through the CLI: {time.perf_counter() - started:.1f} s")
