"""The toy long-tail bench (models/toy/bench.py): every registry method trained for equal steps on
a 2-D long-tailed mixture with overlapping neighbours, over several seeds, in one table.

Per method: tail leakage (the rarest three classes' samples that land in another class's region),
class overlap (the mean leakage over all classes), tail energy distance to the true class
distribution (coverage of the tail modes) and tail memorisation; mean ± std over seeds, and the
paired difference against DDPM (same seeds, same per-sample noise) with its 95% t-interval.
DiffRC needs a source model: it is trained here the way the pipeline does (head classes only);
`diffrc_cfg@diffrc.lam=0` is the same target without its pair-wise loss (DiffRC's ablation). A method
entry `name@section.field=value[@...]` runs `name` with those options.

    python benchmarks/bench_toy.py [--seeds 3] [--steps 600] [--methods ddpm,cbdm,t2h,...] [--processes 2]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

DEFAULT = ["ddpm", "cbdm", "t2h", "h2t", "oc_full", "diffrop", "diffrc_cfg", "diffrc_cfg@diffrc.lam=0", "reweight", "rs",
           "rs_sqrt"]
METRICS = ["tail_leakage", "overlap", "tail_energy", "tail_spread", "tail_memorised"]


def parse_entry(entry: str, toy_run, **fields):
    """`name@section.field=value@...` -> (method name, its ToyRun with those options over the bench's own)."""
    import yaml

    name, *sets = entry.split("@")
    run = toy_run(name, **fields)
    options = {k: dict(v) for k, v in run.options.items()}
    for item in sets:
        key, _, value = item.partition("=")
        section, _, fld = key.partition(".")
        if not (section and fld and value):
            raise SystemExit(f"bench_toy: bad method entry {entry!r}; write name@section.field=value")
        options.setdefault(section, {})[fld] = yaml.safe_load(value)
    return name, dataclasses.replace(run, options=options)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--methods", default=",".join(DEFAULT))
    parser.add_argument("--processes", type=int, default=None,
                        help="worker processes of one thread each (default: one per core; 1 = this process)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads with --processes 1")
    args = parser.parse_args()
    import torch

    from models.evaluation.intervals import paired_seed_difference
    from models.toy.bench import ToyData, run_methods, toy_run

    torch.set_num_threads(args.threads)
    data = ToyData()
    methods = args.methods.split(",")
    started = time.perf_counter()
    jobs = [(*parse_entry(m, toy_run, steps=args.steps), seed) for seed in range(args.seeds) for m in methods]
    runs = iter(run_methods(jobs, data, args.processes))
    results: dict[str, list[dict]] = {m: [] for m in methods}
    for _ in range(args.seeds):
        for m in methods:
            results[m].append(next(runs))
    print(f"toy bench: {data.num_classes} classes, counts {list(data.counts)}, {args.steps} steps per method, "
          f"{args.seeds} seeds, {toy_run('ddpm').per_class} samples per class, OC cutoff 20 of T=200 ({time.perf_counter() - started:.0f} s)")
    print("| method | " + " | ".join(METRICS) + " | Δ tail leakage vs ddpm [95% CI] | Δ overlap vs ddpm [95% CI] "
          "| Δ tail spread vs ddpm [95% CI] |")
    print("|---|" + "---|" * (len(METRICS) + 3))
    for m in methods:
        cells = []
        for key in METRICS:
            v = np.array([r[key] for r in results[m]])
            cells.append(f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0:.3f}")
        deltas = []
        for key in ("tail_leakage", "overlap", "tail_spread"):
            d = paired_seed_difference([r[key] for r in results[m]], [r[key] for r in results["ddpm"]])
            deltas.append("—" if m == "ddpm" else f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
                          + (" *" if d["real"] else ""))
        print(f"| {m} | " + " | ".join(cells) + " | " + " | ".join(deltas) + " |")
    print("(* the interval excludes 0: a real difference at this number of seeds)")


if __name__ == "__main__":
    main()
