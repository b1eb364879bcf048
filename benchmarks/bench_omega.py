"""Guidance strength ω against FID, few-group FID and class fidelity, for one or more checkpoints.

Every checkpoint and every ω draws the same class-balanced labels and per-image seeds, so the
settings are paired image by image; domain features, FID against the balanced reference split with
a 95% stratified bootstrap interval; the few group is the bottom third of the classes by training
count (DiffROP's convention); class fidelity is the domain classifier's rate of recognising the
requested class, with a Wilson interval. The sampler and steps are the checkpoint run's.

    python benchmarks/bench_omega.py --checkpoint outputs/runs/ftref/train/cbdm/model.pt \
        [--checkpoint outputs/runs/ftref/train/ddpm/model.pt] [--omegas 0,1,2,3] [--images 500] [--gap]

`--gap` also prints each model's conditioning gap ‖ε(x_t, y) − ε(x_t, ∅)‖ / ‖ε(x_t, ∅)‖ per class
group on real test images: CFG puts ε̂ = (1 + ω)·ε(x_t, y) − ω·ε(x_t, ∅) at (1 + ω) times it from ε(x_t, ∅), so a method that shrinks it (CBDM at
τ = 1) needs a larger ω for the same class signal. `--omegas ""` prints the gap alone.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing


@torch.no_grad()
def conditioning_gap(net, schedule, data, cfg, per_class: int = 20) -> dict:
    """Median relative gap between the conditional and the null-label prediction, per class group."""
    from models.data.images import to_model_space
    from models.evaluation.metrics import class_groups
    from pipeline.common.shards import read_split

    test = read_split(data.split_dir("test"), data.image_shape, data.num_classes)
    groups = class_groups(data.manifest["class_counts"], "thirds")
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, classes in groups.items():
        idx = np.concatenate([np.flatnonzero(test["label"] == c)[:per_class] for c in classes])
        x0 = to_model_space(torch.as_tensor(test["image"][idx]), cfg.model.image_size)
        y = torch.as_tensor(test["label"][idx])
        ratios = []
        for t_value in (100, 300, 500, 700, 900):
            t = torch.full((len(idx),), t_value, dtype=torch.long)
            noise = torch.randn(x0.shape, generator=g)
            x_t = schedule.q_sample(x0, t, noise)
            cond, uncond = net(x_t, t, y).float(), net(x_t, t, torch.full_like(y, net.null_label)).float()
            ratios.append(((cond - uncond).flatten(1).norm(dim=1) / uncond.flatten(1).norm(dim=1)).numpy())
        out[name] = float(np.median(np.concatenate(ratios)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", action="append", required=True, help="a model.pt (repeatable)")
    parser.add_argument("--omegas", default="0,1,2,3", help="comma-separated guidance strengths")
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gap", action="store_true",
                        help="also print the conditioning gap ‖ε(x_t, y) − ε(x_t, ∅)‖ / ‖ε(x_t, ∅)‖ per group on real test images")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from models.evaluation.artefacts import class_fidelity
    from models.evaluation.intervals import fid_interval, frechet_from_stats, gaussian_stats
    from models.evaluation.metrics import class_groups
    from models.evaluation.summary import group_fids
    from pipeline.common.artifacts import load_dataset, load_model, make_schedule
    from pipeline.common.features import Extractor, balanced_plan, generate_images, real_features

    omegas = [float(w) for w in args.omegas.split(",")] if args.omegas else []
    rows, gaps, extractor = [], [], None
    for checkpoint in map(Path, args.checkpoint):
        net, cfg, manifest = load_model(checkpoint)
        if extractor is None:  # one dataset, extractor and reference for every checkpoint
            data = load_dataset(Path(json.loads((checkpoint.parent / "manifest.json").read_text())["dataset"]))
            extractor = Extractor(cfg, data)
            real = real_features(extractor, cfg, data)
            ref_stats = gaussian_stats(real["reference_feats"])
            C = len(manifest["class_names"])
            few = class_groups(data.manifest["class_counts"], "thirds")["few"]
            labels, seeds = balanced_plan(C, args.images, cfg.seed, "bench-omega")
        schedule = make_schedule(cfg)
        if args.gap:
            gaps.append((checkpoint, conditioning_gap(net, schedule, data, cfg)))
        for omega in omegas:
            started = time.perf_counter()
            images = generate_images(net, schedule, manifest, cfg.model.image_size, labels, seeds,
                                     sampler=cfg.sample.sampler, steps=cfg.sample.steps, omega=omega,
                                     batch_size=args.batch_size, bf16=cfg.sample.bf16)
            seconds = time.perf_counter() - started
            feats, logits = extractor(images)
            fid = frechet_from_stats(*gaussian_stats(feats), *ref_stats)
            lo, hi = fid_interval(feats, ref_stats, 200, seed=0, strata=labels)
            fidelity = class_fidelity(logits.argmax(1), labels, C)
            tail = np.isin(labels, few)
            rows.append({"checkpoint": str(checkpoint), "omega": omega, "fid": fid, "low": lo, "high": hi,
                         "few_fid": group_fids(feats, labels, real["reference_feats"], real["reference_labels"],
                                               data.manifest["class_counts"])["few"],
                         "fidelity": fidelity["all"], "few_fidelity": float((logits.argmax(1) == labels)[tail].mean()),
                         "per_class_fidelity": [p["rate"] for p in fidelity["per_class"]],
                         "seconds": round(seconds, 1)})
            print(f"{checkpoint} ω={omega:g}: FID {fid:.2f} [{lo:.2f}, {hi:.2f}], few {rows[-1]['few_fid']:.2f}, "
                  f"fidelity {100 * fidelity['all']['rate']:.1f}%, {seconds:.0f} s", flush=True)
    if gaps:
        print("\nconditioning gap ‖ε(x_t, y) − ε(x_t, ∅)‖ / ‖ε(x_t, ∅)‖, median over 20 real test images per class "
              "and t in {100, 300, 500, 700, 900} (shared noise); CFG at ω puts ε̂ (1 + ω) times this from the null prediction")
        print("| checkpoint | many | medium | few |")
        print("|---|---|---|---|")
        for checkpoint, g in gaps:
            print(f"| {checkpoint.parent.parent.parent.name}/{checkpoint.parent.name} | "
                  + " | ".join(f"{g[k]:.4f}" for k in ("many", "medium", "few")) + " |")
    if not rows:
        return
    print(f"\nω sweep: {args.images} images per setting (same labels and seeds everywhere), "
          f"sampler {cfg.sample.sampler} {cfg.sample.steps} steps, domain features, few = classes {few}")
    print("| checkpoint | ω | FID [95% CI] | few-group FID | class fidelity [95% CI] | few-group fidelity |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        f = r["fidelity"]
        print(f"| {Path(r['checkpoint']).parent.parent.parent.name}/{Path(r['checkpoint']).parent.name} | {r['omega']:g} | "
              f"{r['fid']:.2f} [{r['low']:.2f}, {r['high']:.2f}] | {r['few_fid']:.2f} | "
              f"{100 * f['rate']:.1f}% [{100 * f['low']:.1f}, {100 * f['high']:.1f}] | {100 * r['few_fidelity']:.1f}% |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
