"""Data-stage benchmarks on this machine, measured in one run.

1. Fashion-MNIST-LT build time (goal <= 60 s on 2 cores): the data stage in-process with Ray
   already up, and the whole CLI command (`pipeline/run.py --stages data`, Ray start included).
2. Throughput of the rebalanced stream into `iter_torch_batches` (goal >= 20,000 rows/s), per
   mode, against the same plan + gather done in plain NumPy in this process (a ceiling that has
   no per-epoch executor start, no object store and no torch conversion). A 10x longer epoch
   shows how much of the Ray figure is per-epoch start-up.

    python benchmarks/bench_data.py [--epochs 5] [--batch-size 128]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()

    import ray

    from models.data.resampling import epoch_plan
    from pipeline.config import ResampleConfig, load_config
    from pipeline.stages.s1_data import run_data
    from pipeline.common.streams import resampled_stream
    from pipeline.common.shards import read_split

    out = Path(tempfile.mkdtemp(prefix="taildiff-bench-"))
    t0 = time.perf_counter()
    cli = subprocess.run([sys.executable, str(REPO / "pipeline" / "run.py"), "--set", f"output_dir={out / 'cli'}",
                          "--stages", "data"], capture_output=True, text=True)
    cli_s = time.perf_counter() - t0
    assert cli.returncode == 0, cli.stderr[-2000:]

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = load_config(None, [f"output_dir={out / 'inproc'}"])
    t0 = time.perf_counter()
    art = run_data(cfg)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_data(cfg)
    rerun_s = time.perf_counter() - t0
    print(f"Fashion-MNIST-LT build ({art.manifest['num_train']} train + {art.manifest['num_reference']} reference "
          f"+ {art.manifest['num_test']} test rows)")
    print(f"  data stage, Ray up:        {build_s:6.2f} s   (goal 60 s: {60 / build_s:5.1f}x under)")
    print(f"  whole CLI incl. Ray start: {cli_s:6.2f} s   (goal 60 s: {60 / cli_s:5.1f}x under)")
    print(f"  rerun (skipped):           {rerun_s:6.2f} s")

    split = art.split_dir("train")
    arrays = read_split(split, art.image_shape)
    n = len(arrays["label"])
    print(f"\nRebalanced stream -> iter_torch_batches(batch_size={args.batch_size}), {args.epochs} epochs "
          f"of {n} rows after one warm-up epoch")
    print(f"  {'mode':<15} {'epoch rows':>10} {'rows/s':>10} {'numpy rows/s':>13} {'ray/numpy':>10} {'vs 20k goal':>12}")
    for mode, epoch_size in [("none", n), ("balanced", n), ("sqrt", n), ("balanced_batch", n), ("balanced", 10 * n)]:
        rcfg = ResampleConfig(mode=mode, batch_size=args.batch_size, epoch_size=epoch_size)
        ds = resampled_stream(split, art.image_shape, rcfg, seed=0)
        for _ in ds.iter_torch_batches(batch_size=args.batch_size):  # warm-up: workers, object store
            pass
        rows, t0 = 0, time.perf_counter()
        for _ in range(args.epochs):
            for batch in ds.iter_torch_batches(batch_size=args.batch_size):
                rows += len(batch["label"])
        ray_rate = rows / (time.perf_counter() - t0)
        rows_np, t0 = 0, time.perf_counter()
        for epoch in range(args.epochs):
            plan = epoch_plan(arrays["label"], mode, seed=0, epoch=epoch, batch_size=args.batch_size,
                              epoch_size=epoch_size)
            for start in range(0, len(plan), args.batch_size):
                rows_idx = plan[start:start + args.batch_size]
                np.ascontiguousarray(arrays["image"][rows_idx])
                rows_np += len(rows_idx)
        np_rate = rows_np / (time.perf_counter() - t0)
        print(f"  {mode:<15} {epoch_size:>10} {ray_rate:>10,.0f} {np_rate:>13,.0f} {ray_rate / np_rate:>10.2f} "
              f"{ray_rate / 20000:>11.1f}x")
    ray.shutdown()


if __name__ == "__main__":
    main()
