"""The fixed cost of a Ray Train fit, per fit, before and after the classifier arms share a worker group.

Runs the classify stage's own `train_arms` on the digits preset (the real Ray Train, Ray Data
streams and checkpoints) for `--arms` classifier arms of `--epochs` epochs, twice, in one process:
  per-fit    every arm in its own TorchTrainer run (what the stage did before: one fit per arm)
  one-group  all arms as jobs of one TorchTrainer run (what it does now)
and reports, per arm, the wall time, the time the arm's own loop spent training (its fit_seconds,
measured inside the worker) and their difference, the fixed cost: worker-group start-up, imports,
the dataset's streaming split, checkpoint reads and the driver's wait. Also a diffusion fine-tune
wave the same way (`--finetunes`). Prints one table; the ratio is measured in this one run.

`--poll R`: instead, the fixed cost of one fit (a one-epoch arm per fit) with Ray Train's controller
polling its workers every 2 s (Ray's default) against every 0.5 s (pipeline/common/launcher.py's
TRAIN_POLL_S), interleaved over R rounds in this one process (the controller takes the variable from
the process calling fit(), so it can change between fits). `--preemption-watcher R`: the same with
Ray Train's preemption watcher on (Ray's default) against off (what a local Ray gets,
pipeline/common/ray_setup.py).

    python benchmarks/bench_fit_overhead.py [--arms 4] [--epochs 2] [--finetunes 2]
    python benchmarks/bench_fit_overhead.py --poll 3 [--arms 2]
    python benchmarks/bench_fit_overhead.py --preemption-watcher 3 [--arms 2]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing


def _arms(cfg, n):
    from pipeline.stages.s5_classify import plan_arms

    return [a for a in plan_arms(cfg) if a.method is None][:n]


def _real_sets(data) -> dict:
    """train_arms' training sets for real-only arms: the dataset's train split, nothing synthetic."""
    return {None: (data.split_dir("train"), data.manifest["config_hash"],
                   {"real": data.manifest["class_counts"], "synthetic": [0] * data.num_classes})}


def measure_classify(out: Path, arms: int, epochs: int) -> dict:
    from pipeline.config import load_config
    from pipeline.stages.s1_data import run_data
    from pipeline.stages.s5_classify import train_arms

    rows = {}
    for mode in ("per-fit", "one-group"):
        cfg = load_config(REPO / "configs" / "digits_lt.yaml", [
            f"output_dir={out / mode}", f"classify.epochs={epochs}", "classify.batch_size=64", "classify.synthetic=none",
            "classify.baselines=[ce,rs,la,ldam_drw]", "classify.eval_every=100", "classify.bf16=false"])
        data = run_data(cfg)
        chosen = _arms(cfg, arms)
        sets = _real_sets(data)
        started = time.perf_counter()
        if mode == "per-fit":
            results = {}
            for arm in chosen:
                results.update(train_arms(cfg, data, [arm], sets))
        else:
            results = train_arms(cfg, data, chosen, sets)
        wall = time.perf_counter() - started
        inside = sum(r.metrics["fit_seconds"] for r in results.values())
        rows[mode] = {"fits": 1 if mode == "one-group" else len(chosen), "arms": len(chosen), "wall": wall,
                      "training": inside, "fixed_per_arm": (wall - inside) / len(chosen),
                      "arm_seconds": inside / len(chosen)}
    return rows


def measure_finetunes(out: Path, finetunes: int) -> dict:
    from pipeline.config import load_config
    from pipeline.stages.s1_data import run_data
    from pipeline.stages.s2_train import TrainSpec, plan_specs, train_wave

    rows = {}
    methods = ["ddpm"] + ["cbdm", "t2h", "reweight", "h2t"][:finetunes]
    for mode in ("per-fit", "one-group"):
        cfg = load_config(REPO / "configs" / "digits_lt.yaml", [
            f"output_dir={out / ('ft-' + mode)}", f"train.methods=[{','.join(methods)}]", "train.init_from=ddpm",
            "train.steps=60", "train.finetune_steps=40", "train.checkpoint_every=40", "train.log_every=20"])
        data = run_data(cfg)
        waves = plan_specs(cfg, data)
        train_wave(cfg, data, waves[0])  # the DDPM, not measured
        started = time.perf_counter()
        results = {}
        if mode == "per-fit":
            for spec in waves[1]:
                results.update(train_wave(cfg, data, [spec]))
        else:
            results = train_wave(cfg, data, waves[1])
        wall = time.perf_counter() - started
        inside = sum(r.metrics["fit_seconds"] for r in results.values())
        n = len(waves[1])
        rows[mode] = {"fits": 1 if mode == "one-group" else n, "arms": n, "wall": wall, "training": inside,
                      "fixed_per_arm": (wall - inside) / n, "arm_seconds": inside / n}
        assert all(isinstance(s, TrainSpec) for s in waves[1])
    return rows


def measure_setting(out: Path, arms: int, rounds: int, env: str, values: tuple[str, str], label: str) -> None:
    """The fixed cost of one fit (a one-epoch arm per fit) with the variable `env` at values[0] (before)
    against values[1] (after), interleaved over `rounds` rounds in this one process. Ray Train's
    controller reads these variables from the process calling fit() (its ENV_VARS_TO_PROPAGATE), so
    they can change between fits."""
    import statistics

    from models.evaluation.intervals import paired_seed_difference
    from pipeline.config import load_config
    from pipeline.stages.s1_data import run_data
    from pipeline.stages.s5_classify import train_arms

    fixed: dict[str, list[float]] = {value: [] for value in values}
    cpu: dict[str, list[float]] = {value: [] for value in values}
    for r in range(rounds):
        for value in fixed:
            os.environ[env] = value
            cfg = load_config(REPO / "configs" / "digits_lt.yaml", [
                f"output_dir={out / f'{env}-{r}-{value}'}", "classify.epochs=1", "classify.batch_size=64",
                "classify.synthetic=none", "classify.baselines=[ce,rs,la,ldam_drw]", "classify.eval_every=100",
                "classify.bf16=false"])
            data = run_data(cfg)
            sets = _real_sets(data)
            for arm in _arms(cfg, arms):
                started, busy = time.perf_counter(), _busy_cpu_seconds()
                result = train_arms(cfg, data, [arm], sets)
                fixed[value].append(time.perf_counter() - started - result[arm.name].metrics["fit_seconds"])
                cpu[value].append(_busy_cpu_seconds() - busy)
    print(f"| {label} | fits | fixed cost per fit s (mean ± std) | CPU-seconds per fit, all processes |")
    print("|---|---|---|---|")
    for value, xs in fixed.items():
        print(f"| {env}={value} | {len(xs)} | {statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f} | "
              f"{statistics.mean(cpu[value]):.1f} ± {statistics.stdev(cpu[value]):.1f} |")
    for what, unit, xs in (("fixed cost", "s", fixed), ("CPU", "CPU-s", cpu)):
        d = paired_seed_difference(xs[values[0]], xs[values[1]])  # fit i of a round against fit i, t-interval
        verdict = "" if d["real"] else ": no difference"
        print(f"{what} saved per fit at {env}={values[1]}: {d['mean']:.2f} {unit} [{d['low']:.2f}, {d['high']:.2f}] "
              f"95% ({d['n']} paired fits, {rounds} interleaved rounds){verdict}")


def _busy_cpu_seconds() -> float:
    """The machine's busy CPU time so far (every process: Ray's actors included), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # less idle and iowait


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arms", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--finetunes", type=int, default=2)
    parser.add_argument("--poll", type=int, default=0, metavar="ROUNDS")
    parser.add_argument("--preemption-watcher", type=int, default=0, metavar="ROUNDS")
    args = parser.parse_args()
    rounds = args.poll or args.preemption_watcher
    if rounds and rounds * args.arms < 2:
        parser.error("--poll / --preemption-watcher need at least two fits per setting for a spread: 2 rounds, "
                     "or --arms 2")
    import ray

    from pipeline.common.ray_setup import init_ray

    init_ray(num_cpus=2)
    out = Path(tempfile.mkdtemp(prefix="bench-fit-"))
    if rounds:
        from pipeline.common.launcher import TRAIN_POLL_ENV, TRAIN_POLL_S

        if args.poll:
            setting = (TRAIN_POLL_ENV, ("2.0", TRAIN_POLL_S), "controller poll interval")
        else:  # Ray's default (on) against what a local Ray gets (pipeline/common/ray_setup.py)
            setting = ("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", ("1", "0"), "Ray Train's preemption watcher")
        try:
            measure_setting(out, args.arms, rounds, *setting)
        finally:
            ray.shutdown()
            shutil.rmtree(out, ignore_errors=True)
        return
    try:
        table = {"classifier arms": measure_classify(out, args.arms, args.epochs)}
        if args.finetunes:
            table["diffusion fine-tunes"] = measure_finetunes(out, args.finetunes)
    finally:
        ray.shutdown()
        shutil.rmtree(out, ignore_errors=True)
    print("| jobs | mode | TorchTrainer fits | wall s | training s (inside the loops) | fixed cost per job s | "
          "fixed / job's training |")
    print("|---|---|---|---|---|---|---|")
    for what, rows in table.items():
        for mode, r in rows.items():
            print(f"| {r['arms']} {what} | {mode} | {r['fits']} | {r['wall']:.1f} | {r['training']:.1f} | "
                  f"{r['fixed_per_arm']:.1f} | {r['fixed_per_arm'] / max(r['arm_seconds'], 1e-9):.0%} |")
        before, after = rows["per-fit"]["fixed_per_arm"], rows["one-group"]["fixed_per_arm"]
        print(f"{what}: fixed cost per job {before:.1f} s -> {after:.1f} s ({before / max(after, 1e-9):.1f}x less)")


if __name__ == "__main__":
    main()
