"""Training-time sweeps: one Ray Tune function trial per sampled config, each driving a
`TorchTrainer` (Ray 2.60 has no `Tuner(trainer)`): `TuneReportCallback` forwards the workers'
`ray.train.report` metrics, among them the proxy FID at every checkpoint, so ASHA can stop
poor trials (its time axis is the train step).

Layout under <output_dir>/tune/<sweep>/:
  runs/trial-<id>/train/<method>/   the trial's own run (checkpoints, loss.csv, proxy_fid.csv)
  runs/trial-<id>/trial.json        the sampled point, written when the trial starts
  ray/                              Tune's experiment storage
Trials never share checkpoints: each has its own run name. The table is built from the trial
folders, so a stopped trial's numbers are kept even though its function never returned.

Failures. A trial whose actor or node is lost is retried by Tune up to `train.max_failures` times;
the retry runs the same trial id, so its `run_train` resumes from the run's last Ray Train
checkpoint (trial.json counts the attempts). A deterministic error (bad input, a config that
cannot train: TaildiffError) is not retried: the trial writes error.json, ends, and is reported
in the table with status `error`. Placement groups belong to the trial's TorchTrainer run, so
they go with it (tests/fault_cluster.py checks none is left after a lost node).
"""
from __future__ import annotations

import csv
import json
import logging
import math
import time
from pathlib import Path

from pipeline.config import Config
from pipeline.common.artifacts import DatasetArtifact
from pipeline.errors import TaildiffError
from pipeline.tuning.space import SearchSpace, point_config, tune_param_space

log = logging.getLogger("taildiff.tune")


def max_concurrent(cfg: Config, resources: dict) -> int:
    """Trials that fit at once. Each trial's train workers hold num_workers × cpus_per_worker CPUs
    (and a GPU each with use_gpu), and its Ray Data stream needs one more CPU for its read /
    resample task: with fewer, concurrent trials deadlock waiting for their data."""
    from pipeline.common.devices import resolve_use_gpu

    t = cfg.train
    per_trial = t.num_workers * t.cpus_per_worker + 1.0
    fit = int(math.floor(resources.get("CPU", 1) / per_trial + 1e-9))
    if resolve_use_gpu(t.use_gpu, resources.get("GPU", 0), "train"):
        fit = min(fit, int(resources.get("GPU", 0) // t.num_workers))
    return max(1, fit)


TRIAL_CPU = 0.01  # the trial function only drives a TorchTrainer; Tune refuses 0


def check_trial_fits(cfg: Config, resources: dict) -> None:
    """One line naming the fix when even one trial cannot run: its trainer's CPUs, the trial
    function's sliver and a whole CPU for its data stream must fit, or the sweep waits forever."""
    t = cfg.train
    need = t.num_workers * t.cpus_per_worker + TRIAL_CPU + 1.0  # GPU workers hold their CPUs too
    have = resources.get("CPU", 0.0)
    if need > have + 1e-9:
        raise TaildiffError(
            f"a training trial needs {need:g} CPUs (train.num_workers × train.cpus_per_worker, plus one for its "
            f"data stream) but the cluster has {have:g}: lower train.cpus_per_worker (e.g. --set "
            "train.cpus_per_worker=0.5; train.torch_threads still sets the compute threads) or add CPUs")


def trial_function(params: dict, *, base: dict, space: dict, data: DatasetArtifact, sweep_dir: str,
                   proxy: dict) -> None:
    """One trial: base config + the sampled point, stages data (shared) + train, with the proxy FID."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.config import config_from_dict
    from pipeline.stages.s2_train import run_train

    trial_id = tune.get_context().get_trial_id()
    sp = SearchSpace(**space)
    cfg = point_config(config_from_dict(base), sp, params, output_dir=sweep_dir, name=f"trial-{trial_id}")
    if len(cfg.train.methods) != 1:
        raise TaildiffError(f"a trial trains one method, got train.methods={list(cfg.train.methods)}")
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    info_path = cfg.run_dir / "trial.json"
    earlier = json.loads(info_path.read_text()) if info_path.is_file() else {}  # a retry after a lost node
    write_json(info_path, {"trial_id": trial_id, "params": params, "method": cfg.train.methods[0],
                           "started": earlier.get("started", time.time()), "attempts": earlier.get("attempts", 0) + 1})
    try:
        art = run_train(cfg, data, tune_hooks={"proxy": proxy, "callbacks": [TuneReportCallback()]})[cfg.train.methods[0]]
    except TaildiffError as exc:  # deterministic: reported, not retried by Tune
        write_json(cfg.run_dir / "error.json", {"error": str(exc).strip().splitlines()[-1][:500], "ended": time.time()})
        log.error("trial %s: %s", trial_id, exc)
        return
    write_json(cfg.run_dir / "finished.json", {**art.metrics, "finished": time.time()})


def write_json(path: Path, payload: dict) -> None:
    """Temp file then rename: a trial killed mid-write leaves the previous file whole."""
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(payload))
    tmp.replace(path)


def run_training_sweep(base: Config, space: SearchSpace, data: DatasetArtifact, sweep_dir: Path, proxy: dict,
                       num_samples: int | None = None, stop=None) -> list[dict]:
    """Run the sweep; returns one row per trial (params, status, steps, FID history, wall time)."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from pipeline.tuning.space import sample_points

    from pipeline.stages.s2_train import method_steps

    for point in sample_points(space, 2, seed=base.seed):  # fail on the driver, not in a trial
        trial_cfg = point_config(base, space, point)
    steps = method_steps(trial_cfg, trial_cfg.train.methods[0])  # train.finetune_steps when fine-tuning
    check_trial_fits(base, ray.cluster_resources())
    concurrent = max_concurrent(base, ray.available_resources())
    scheduler = FIFOScheduler()
    if space.scheduler:
        s = space.scheduler
        grace = s["grace_period"] or base.train.checkpoint_every
        scheduler = ASHAScheduler(time_attr="step", max_t=steps, grace_period=grace,
                                  reduction_factor=s["reduction_factor"])
    trainable = tune.with_resources(
        tune.with_parameters(trial_function, base=base.to_dict(), space=space.__dict__, data=data,
                             sweep_dir=str(sweep_dir), proxy=proxy),
        {"CPU": TRIAL_CPU})
    from pipeline.common.storage import ray_storage, storage_of

    # Tune's experiment state on shared storage when the run has one (the trials' checkpoints go
    # there through their own run_train); the trial folders need an output_dir every node sees
    tune_path, tune_fs = ray_storage(storage_of(base), base.output_dir, sweep_dir / "ray")
    tuner = tune.Tuner(
        trainable, param_space=tune_param_space(space),
        tune_config=tune.TuneConfig(metric=space.metric, mode=space.mode, scheduler=scheduler,
                                    num_samples=num_samples or space.num_samples,
                                    max_concurrent_trials=concurrent, reuse_actors=False),
        run_config=tune.RunConfig(name=space.name, storage_path=tune_path, storage_filesystem=tune_fs, stop=stop,
                                  verbose=0, failure_config=tune.FailureConfig(max_failures=base.train.max_failures)))
    log.info("tune[%s]: %s trials at most %d at a time (%s)", space.name,
             (num_samples or space.num_samples), concurrent, "ASHA" if space.scheduler else "no early stopping")
    grid = tuner.fit()
    errors = [str(r.error).strip().splitlines()[-1][:300] for r in grid if r.error is not None]
    rows = collect_trials(sweep_dir, steps)
    errors += [r["error"] for r in rows if r["status"] == "error"]
    if errors:
        log.warning("tune[%s]: %d trial(s) failed; first: %s", space.name, len(errors), errors[0])
    if not any(r["fid"] is not None for r in rows):
        raise TaildiffError(f"no trial of sweep {space.name} reported a FID ({errors[0] if errors else 'no trials'}); "
                            f"see {sweep_dir / 'ray'}")
    return rows


def collect_trials(sweep_dir: Path, steps: int) -> list[dict]:
    """One row per trial folder: the point, the proxy FID history and whether it ran to the end."""
    rows = []
    for folder in sorted((sweep_dir / "runs").glob("trial-*")):
        info_path = folder / "trial.json"
        if not info_path.is_file():
            continue
        info = json.loads(info_path.read_text())
        history = []
        # a finished trial's run is published to train/<method>/; a stopped one stays in its work folder
        for path in [*folder.glob("train/.work/*/proxy_fid.csv"), *folder.glob("train/*/proxy_fid.csv")]:
            with path.open() as f:
                history = [(int(r["step"]), float(r["fid"]), float(r["time"])) for r in csv.DictReader(f)]
        finished = (folder / "finished.json").is_file()
        failed = json.loads((folder / "error.json").read_text()) if (folder / "error.json").is_file() else None
        last = history[-1] if history else None
        ended = json.loads((folder / "finished.json").read_text())["finished"] if finished else (
            failed["ended"] if failed else last[2] if last else info["started"])
        status = "finished" if finished or (last and last[0] >= steps) else "error" if failed else "stopped"
        rows.append({"trial_id": info["trial_id"], "method": info["method"], "params": info["params"],
                     "status": status, "error": failed["error"] if failed else None,
                     "attempts": info.get("attempts", 1),
                     "step": last[0] if last else 0,
                     "fid": last[1] if last else None, "fid_history": [(s, v) for s, v, _ in history],
                     "seconds": round(ended - info["started"], 1), "run_dir": str(folder)})
    return rows


def best_trial(rows: list[dict], mode: str = "min") -> dict:
    """The best final FID among trials that ran to the end (all trials if none did)."""
    pool = [r for r in rows if r["status"] == "finished" and r["fid"] is not None] or \
           [r for r in rows if r["fid"] is not None]
    return (min if mode == "min" else max)(pool, key=lambda r: r["fid"])
