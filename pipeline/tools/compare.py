"""`python pipeline/run.py compare <run-dir> [<run-dir> ...]`: the paired comparison of every
evaluated method of the given runs, with intervals, against a baseline.

Generation: each method's evaluation set (evaluation/<method>/features.npz, written by the
evaluate stage) and the run's reference statistics (evaluation/reference_stats.npz). Sets are
paired image by image on (label, k, seed): runs of one seed draw every method's image k of class c
from the same noise, so differences are computed on the same resampled indices (a paired
bootstrap) and carry their own 95% interval. Classification: every arm's metrics per seed
(classify/<arm>[-s<i>]/metrics.json) as mean ± std, and the difference against the baseline arm
paired by seed with its t-interval. A difference is marked real (*) only when its interval
excludes 0.

    python pipeline/run.py compare outputs/runs/fmnist_lt [more runs] [--baseline ddpm] [--arm-baseline ce]
    python pipeline/run.py compare --over-seeds outputs/runs/rcref outputs/runs/rcref_s1   # training seeds
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from pipeline.errors import TaildiffError


def load_sets(run_dirs: list[Path]) -> tuple[dict, dict]:
    """(label -> {"feats", "logits", "label", "key"}), reference stats of the first run."""
    sets, ref = {}, None
    for run in run_dirs:
        root = run / "evaluation"
        if not (root / "reference_stats.npz").is_file():
            raise TaildiffError(f"{run} has no evaluation/reference_stats.npz: run its evaluate stage first")
        with np.load(root / "reference_stats.npz") as blob:
            stats = {k: blob[k] for k in blob.files}
        ref = ref or stats
        for path in sorted(root.glob("*/features.npz")):
            with np.load(path) as blob:
                f = {k: blob[k] for k in blob.files}
            key = np.stack([f["label"], f["k"], f["seed"]], 1)
            order = np.lexsort(key.T[::-1])
            name = path.parent.name if len(run_dirs) == 1 else f"{run.name}:{path.parent.name}"
            sets[name] = {"feats": f["feats"][order], "logits": f["logits"][order], "label": f["label"][order],
                          "key": key[order]}
    if not sets:
        raise TaildiffError(f"no evaluated method in {', '.join(map(str, run_dirs))}: run the evaluate stage")
    return sets, ref


def generation_table(sets: dict, ref: dict, baseline: str, replicates: int, seed: int) -> list[str]:
    from models.evaluation.intervals import (bootstrap_indices, frechet_from_stats, gaussian_stats,
                                             percentile_interval, wilson_interval)
    from models.evaluation.metrics import ClassDistances, group_mean

    base = sets[baseline]
    groups = {g: ref[f"{g}_classes"] for g in ("many", "medium", "few")}

    def fid(feats, labels, group=None):
        if group is None:
            return frechet_from_stats(*gaussian_stats(feats), ref["all_mu"], ref["all_sigma"])
        mask = np.isin(labels, groups[group])
        return frechet_from_stats(*gaussian_stats(feats[mask]), ref[f"{group}_mu"], ref[f"{group}_sigma"])

    num_classes = int(max(s["label"].max() for s in sets.values())) + 1

    def diversity(dist, draw=None):  # the few group's mean within-class pairwise distance
        return group_mean(dist.diversity(draw), [int(c) for c in groups["few"]])

    base_dist = ClassDistances(base["feats"], base["label"], num_classes)  # distances once per set, not per draw

    lines = [f"Paired against **{baseline}** ({len(base['label'])} images per set; 95% paired bootstrap, "
             f"{replicates} replicates within classes; * = the interval excludes 0).", "",
             "Diversity few: the mean pairwise domain-feature distance between distinct images of a class, "
             "averaged over the few group (pairs of two copies of one image left out in the bootstrap).", "",
             "| method | FID | ΔFID | FID few | ΔFID few | class fidelity % | Δ fidelity pp | diversity few | "
             "Δ diversity few |", "|---|---|---|---|---|---|---|---|---|"]
    idx = bootstrap_indices(len(base["label"]), replicates, seed, strata=base["label"])
    for name, s in sets.items():
        paired = np.array_equal(s["key"], base["key"])
        f_all, f_few = fid(s["feats"], s["label"]), fid(s["feats"], s["label"], "few")
        correct = s["logits"].argmax(1) == s["label"]
        lo, hi = wilson_interval(int(correct.sum()), len(correct))
        s_dist = ClassDistances(s["feats"], s["label"], num_classes)
        div = diversity(s_dist)
        cells = [f"{f_all:.2f}", "—", f"{f_few:.2f}", "—", f"{100 * correct.mean():.1f} [{100 * lo:.1f}, {100 * hi:.1f}]", "—",
                 "n/a" if div is None else f"{div:.3f}", "—"]
        if name != baseline and paired:
            base_ok = base["logits"].argmax(1) == base["label"]
            d_all, d_few, d_fid, d_div = [], [], [], []
            for i in idx:
                d_all.append(fid(s["feats"][i], s["label"][i]) - fid(base["feats"][i], base["label"][i]))
                d_few.append(fid(s["feats"][i], s["label"][i], "few") - fid(base["feats"][i], base["label"][i], "few"))
                d_fid.append(100 * (correct[i].mean() - base_ok[i].mean()))
                a, b = diversity(s_dist, i), diversity(base_dist, i)
                d_div.append(None if a is None or b is None else a - b)
            base_div = diversity(base_dist)
            for pos, point, values, digits in ((1, f_all - fid(base["feats"], base["label"]), d_all, 2),
                                               (3, f_few - fid(base["feats"], base["label"], "few"), d_few, 2),
                                               (5, 100 * (correct.mean() - base_ok.mean()), d_fid, 2),
                                               (7, None if div is None or base_div is None else div - base_div, d_div, 3)):
                if point is None:
                    continue
                a, b = percentile_interval(values, point=point)
                cells[pos] = f"{point:+.{digits}f} [{a:+.{digits}f}, {b:+.{digits}f}]" + (" *" if a > 0 or b < 0 else "")
        elif name != baseline:
            cells[1] = cells[3] = cells[5] = cells[7] = "not paired (other seeds)"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def seeds_table(run_dirs: list[Path], baseline: str) -> list[str]:
    """`--over-seeds`: each run is one training seed of the same methods (e.g. `--set seed=1`). Per run,
    each method's FID, few-group FID and class fidelity and its difference from the run's `baseline`;
    then mean ± std over the runs and the 95% t-interval of the difference over seeds (* = excludes 0).
    The image-bootstrap intervals of one run hold the training noise fixed; this one does not."""
    from models.evaluation.intervals import frechet_from_stats, gaussian_stats, mean_interval, paired_seed_difference

    per_run = []
    for run in run_dirs:
        sets, ref = load_sets([run])
        few = ref["few_classes"]
        if per_run and not np.allclose(ref["all_mu"], per_run[0][1]):
            raise TaildiffError(f"{run} has other reference statistics than {run_dirs[0]} (another dataset or "
                                "extractor): --over-seeds compares runs of one dataset")
        values = {}
        for name, s in sets.items():
            mask = np.isin(s["label"], few)
            values[name] = {"fid": frechet_from_stats(*gaussian_stats(s["feats"]), ref["all_mu"], ref["all_sigma"]),
                            "fid_few": frechet_from_stats(*gaussian_stats(s["feats"][mask]), ref["few_mu"],
                                                          ref["few_sigma"]),
                            "fidelity": 100 * float((s["logits"].argmax(1) == s["label"]).mean())}
        per_run.append((values, ref["all_mu"]))
    runs = [v for v, _ in per_run]
    if any(baseline not in v for v in runs):
        raise TaildiffError(f"--baseline {baseline} is not evaluated in every run given to --over-seeds")
    methods = [m for m in runs[0] if all(m in v for v in runs)]
    lines = [f"Over training seeds: {len(runs)} runs ({', '.join(r.name for r in run_dirs)}), one value per run; "
             f"mean ± std over runs, Δ against **{baseline}** of the same run with a 95% t-interval over runs "
             "(* = excludes 0; with 2 runs the interval is wide: df = 1).", "",
             "| method | runs | FID | ΔFID | FID few | ΔFID few | class fidelity % | Δ fidelity pp |",
             "|---|---|---|---|---|---|---|---|"]
    for m in methods:
        cells = [str(len(runs))]
        for key in ("fid", "fid_few", "fidelity"):
            v = mean_interval([r[m][key] for r in runs])
            cells.append(f"{v['mean']:.2f} ± {v['std']:.2f}")
            if m == baseline:
                cells.append("—")
                continue
            d = paired_seed_difference([r[m][key] for r in runs], [r[baseline][key] for r in runs])
            per = " / ".join(f"{r[m][key] - r[baseline][key]:+.2f}" for r in runs)
            cells.append(f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]" + (" *" if d["real"] else "")
                         + f" (per run {per})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def classify_table(run_dirs: list[Path], arm_baseline: str) -> list[str]:
    from models.evaluation.intervals import mean_interval, paired_seed_difference

    arms: dict[str, dict[int, dict]] = {}
    for run in run_dirs:
        for path in sorted((run / "classify").glob("*/metrics.json")):
            manifest = json.loads((path.parent / "manifest.json").read_text())
            base = path.parent.name if not manifest.get("seed") else path.parent.name.rsplit("-s", 1)[0]
            name = base if len(run_dirs) == 1 else f"{run.name}:{base}"
            arms.setdefault(name, {})[int(manifest.get("seed", 0))] = json.loads(path.read_text())["last"]
    if not arms:
        return []
    ref_name = next((n for n in arms if n.split(":")[-1] == arm_baseline), None)
    lines = ["", f"Classifiers (balanced test set, last epoch): mean ± std over seeds; Δ against **{ref_name}** "
                 "paired by seed with a 95% t-interval (* = excludes 0).", "",
             "| arm | seeds | top-1 % | few % | Δ top-1 pp | Δ few pp |", "|---|---|---|---|---|---|"]
    for name, by_seed in arms.items():
        seeds = sorted(by_seed)
        acc = mean_interval([100 * by_seed[s]["accuracy"] for s in seeds])
        few = mean_interval([100 * by_seed[s]["few_accuracy"] for s in seeds])
        cells = [str(len(seeds)), f"{acc['mean']:.2f} ± {acc['std']:.2f}" if len(seeds) > 1 else f"{acc['mean']:.2f}",
                 f"{few['mean']:.2f} ± {few['std']:.2f}" if len(seeds) > 1 else f"{few['mean']:.2f}", "—", "—"]
        if ref_name and name != ref_name:
            common = [s for s in seeds if s in arms[ref_name]]
            for pos, key in ((3, "accuracy"), (4, "few_accuracy")):
                d = paired_seed_difference([100 * by_seed[s][key] for s in common],
                                           [100 * arms[ref_name][s][key] for s in common])
                cells[pos] = (f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]" + (" *" if d["real"] else "")
                              if len(common) > 1 else f"{d['mean']:+.2f} (1 seed: no interval)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def compare(run_dirs: list[Path], baseline: str | None = None, arm_baseline: str = "ce", replicates: int = 200,
            seed: int = 0, over_seeds: bool = False) -> str:
    if over_seeds:
        if len(run_dirs) < 2:
            raise TaildiffError("--over-seeds needs two or more runs (one per training seed)")
        return "\n".join(seeds_table(run_dirs, baseline or "ddpm")) + "\n"
    sets, ref = load_sets(run_dirs)
    # default: the DDPM (of the first run that has one), the baseline every long-tail method is judged against
    base = baseline or next((n for n in sets if n.split(":")[-1] == "ddpm"), next(iter(sets)))
    if base not in sets:
        matches = [n for n in sets if n.split(":")[-1] == base]
        if not matches:
            raise TaildiffError(f"--baseline {base} is not an evaluated method of these runs: one of {', '.join(sets)}")
        base = matches[0]
    lines = generation_table(sets, ref, base, replicates, seed) + classify_table(run_dirs, arm_baseline)
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pipeline/run.py compare", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders (outputs/runs/<name>)")
    parser.add_argument("--baseline", default=None, help="the method to compare against (default: ddpm where evaluated, else the first)")
    parser.add_argument("--arm-baseline", default="ce", help="the classifier arm to compare against")
    parser.add_argument("--replicates", type=int, default=200)
    parser.add_argument("--over-seeds", action="store_true",
                        help="the runs are training seeds of the same methods: Δ per run, then a t-interval over runs")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    try:
        runs = [Path(r) for r in args.runs]
        missing = [str(r) for r in runs if not r.is_dir()]
        if missing:
            raise TaildiffError(f"no run folder {', '.join(missing)}: give outputs/runs/<name> folders")
        text = compare(runs, args.baseline, args.arm_baseline, args.replicates, over_seeds=args.over_seeds)
    except TaildiffError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0
