"""Sampling several sets: one Ray Data pipeline (and actor pool) per set against all of them in one
pipeline on one pool (pipeline.common.generation.generate_sets, what the sample stage, the classify
stage's augmentation sets and the study do now).

Trains a tiny digits DDPM once (the real train stage), then, for `--rounds` interleaved rounds, samples
`--sets` sets of `--per-class` images per class at different ω both ways into fresh folders (nothing
reused) and prints the wall times and the paired difference per round with its 95% t-interval.

    python benchmarks/bench_sample_sets.py [--sets 4] [--per-class 5] [--rounds 3]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sets", type=int, default=4)
    parser.add_argument("--per-class", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import ray

    from models.evaluation.intervals import paired_seed_difference
    from pipeline.common.generation import SetRequest, generate_set, generate_sets
    from pipeline.common.ray_setup import init_ray
    from pipeline.config import load_config
    from pipeline.stages.s1_data import run_data
    from pipeline.stages.s2_train import run_train

    init_ray(num_cpus=2)
    out = Path(tempfile.mkdtemp(prefix="bench-sets-"))
    base = [f"output_dir={out}", "train.steps=3", "train.checkpoint_every=3", "train.log_every=3",
            "tracking.grid_per_class=0", "sample.steps=10", "sample.sampler=ddim", "sample.grid_per_class=0"]
    try:
        cfg = load_config(REPO / "configs" / "digits_lt.yaml", base)
        data = run_data(cfg)
        model = run_train(cfg, data)["ddpm"]
        counts = [args.per_class] * data.num_classes
        wall: dict[str, list[float]] = {"one pool per set": [], "one pool for all": []}
        for r in range(args.rounds):
            for mode in wall:
                requests = [SetRequest(load_config(REPO / "configs" / "digits_lt.yaml", [
                    *base, f"name=r{r}-{'per' if mode.endswith('set') else 'all'}", f"sample.omega={1.0 + i}"]),
                    model, counts, folder=f"set{i}", seed_tag="bench") for i in range(args.sets)]
                started = time.perf_counter()
                if mode == "one pool per set":
                    for q in requests:
                        generate_set(q.cfg, data, q.model, q.counts, q.folder, q.seed_tag)
                else:
                    generate_sets(data, requests)
                wall[mode].append(time.perf_counter() - started)
    finally:
        ray.shutdown()
        shutil.rmtree(out, ignore_errors=True)
    images = args.per_class * data.num_classes
    print(f"{args.sets} sets of {images} images (the digits preset, 8x8, ddim-10), {args.rounds} rounds")
    print("| mode | wall s per round (mean ± std) |")
    print("|---|---|")
    for mode, xs in wall.items():
        print(f"| {mode} | {statistics.mean(xs):.1f} ± {statistics.stdev(xs) if len(xs) > 1 else 0:.1f} |")
    d = paired_seed_difference(wall["one pool per set"], wall["one pool for all"])
    verdict = "" if d["real"] else ": no difference"
    print(f"saved per round by one pool: {d['mean']:.1f} s [{d['low']:.1f}, {d['high']:.1f}] 95% "
          f"({d['n']} paired rounds){verdict}; per set {d['mean'] / args.sets:.1f} s")


if __name__ == "__main__":
    main()
