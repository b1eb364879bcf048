"""Evaluate stage: FID / KID / precision-recall / IS through torch-fidelity, PRD F_8 / F_1/8,
per-class and many / medium / few FID, and the tail memorisation rate, per method.

Features come from a named torch-fidelity extractor (pipeline/common/features.py: `domain`,
trained here once per dataset, or `inception` from a weights file); the metric arithmetic is
models/evaluation/summary.py.

Per run: `evaluation/<method>/metrics.json`, `features.npz` (every image's features, label, seed),
`per_class_fid.png`, `memorization.png`, and
`evaluation/table.md` comparing the run's methods. Every number names its extractor.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import torch

from models.evaluation.metrics import class_groups
from models.evaluation.summary import generation_metrics
from pipeline.common.artifacts import DatasetArtifact, EvalArtifact, SampleArtifact, load_samples
from pipeline.common.features import Extractor, real_features
from pipeline.common.files import write_json
from pipeline.config import Config, stable_hash

log = logging.getLogger("taildiff.evaluate")


def metric_settings(cfg: Config) -> dict:
    """The evaluate section as the keyword arguments of models.evaluation.summary.generation_metrics."""
    e = cfg.evaluate
    return dict(seed=cfg.seed, kid_subset_size=e.kid_subset_size, prc_neighborhood=e.prc_neighborhood,
                prd_clusters_per_class=e.prd_clusters_per_class, prd_runs=e.prd_runs,
                memorization_quantile=e.memorization_quantile, min_per_class=e.min_per_class,
                many_above=e.many_above, few_below=e.few_below)


def run_evaluate(cfg: Config, data: DatasetArtifact, samples: dict[str, SampleArtifact]) -> dict[str, EvalArtifact]:
    root = (cfg.run_dir / "evaluation").resolve()
    extractor = Extractor(cfg, data)
    real = None
    results = {}
    for method, sample in samples.items():
        out = root / method
        key = stable_hash({"samples": sample.key,
                           "evaluate": dataclasses.asdict(cfg.evaluate), "extractor": extractor.key})
        metrics_path = out / "metrics.json"
        if metrics_path.is_file() and json.loads(metrics_path.read_text()).get("key") == key:
            log.info("evaluate[%s]: reusing %s", method, out)
            results[method] = EvalArtifact(method, out, json.loads(metrics_path.read_text()), skipped=True)
            continue
        real = real if real is not None else real_features(extractor, cfg, data)
        gen = load_samples(sample, data.image_shape)
        gen_feats, gen_logits = extractor(gen["image"])
        m = generation_metrics(gen_feats, gen_logits, gen["label"], real, data.manifest["class_counts"],
                               images=gen["image"], logits_are_classes=cfg.evaluate.extractor == "domain",
                               bootstrap=cfg.evaluate.bootstrap, **metric_settings(cfg))
        nearest, dist = m.pop("_nearest"), m.pop("_dist")
        out.mkdir(parents=True, exist_ok=True)
        plot_per_class_fid(m, data.manifest, out / "per_class_fid.png", f"{cfg.name}: {method}", extractor.info)
        plot_memorization(gen, real, nearest, dist, m["memorization"]["threshold"], data.manifest,
                          out / "memorization.png", method)
        m.update(key=key, method=method, extractor=extractor.info)
        np.savez(out / "features.npz", feats=gen_feats, logits=gen_logits, label=gen["label"], k=gen["k"],
                 seed=gen["seed"])  # per-image features: what `run.py compare` pairs across methods
        write_json(metrics_path, m)
        log.info("evaluate[%s]: FID %.3f (%s), few-group FID %s, memorization %.3f", method, m["fid"],
                 extractor.info["extractor"], _fmt(m["fid_thirds_few"]), m["memorization"]["all"])
        results[method] = EvalArtifact(method, out, m, skipped=False)
    if real is not None or not (root / "reference_stats.npz").is_file():
        real = real if real is not None else real_features(extractor, cfg, data)
        save_reference_stats(real, data.manifest["class_counts"], root / "reference_stats.npz")
    write_table(results, root / "table.md", extractor.info, data.manifest)
    return results


def save_reference_stats(real: dict, counts, path: Path) -> None:
    """Gaussian statistics of the balanced reference features, whole and per group / class, so
    intervals and paired differences can be computed later without the features (`run.py compare`)."""
    from models.evaluation.intervals import gaussian_stats

    feats, labels = real["reference_feats"], real["reference_labels"]
    out = {}
    out["all_mu"], out["all_sigma"] = gaussian_stats(feats)
    for group, classes in class_groups(counts, "thirds").items():
        out[f"{group}_mu"], out[f"{group}_sigma"] = gaussian_stats(feats[np.isin(labels, classes)])
        out[f"{group}_classes"] = np.array(classes)
    np.savez(path, **out)


def _fmt(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ci(m: dict, key: str, digits: int = 2) -> str:
    """value [lo, hi] when the bootstrap interval exists."""
    value, interval = m.get(key), m.get(f"{key}_interval")
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" + (f" [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]" if interval else "")


def _rate(entry: dict | None, digits: int = 1) -> str:
    if not entry:
        return "n/a"
    return f"{100 * entry['rate']:.{digits}f} [{100 * entry['low']:.{digits}f}, {100 * entry['high']:.{digits}f}]"


def _diversity(d: dict | None, group: str = "few") -> str:
    if not d or d.get(group) is None:
        return "n/a"
    return _ci(d, group) + (f" ({d[f'real_{group}']:.2f})" if d.get(f"real_{group}") is not None else "")


def write_table(results: dict[str, EvalArtifact], path: Path, info: dict, manifest: dict | None = None) -> None:
    head = ("| method | n | FID [95% CI] | FID many | FID medium | FID few | class fidelity % | fidelity few % | "
            "speckled % | KID×1e3 | precision | recall | IS | F8 | F1/8 | diversity few (real) | memorized few |")
    lines = [f"Features: **{info['extractor']}**" + (f" (test accuracy {info['test_accuracy']:.4f})"
                                                     if "test_accuracy" in info else "") +
             "; groups: thirds of the classes by training count; intervals: 95% bootstrap over the generated "
             "images (FID) or Wilson (rates); speckled: mean |vertical pixel step| > 0.25 on [−1, 1] "
             "(real test images: 2.6%); diversity: mean pairwise feature distance between distinct images of a class, "
             "averaged over the few group's classes (the real reference images' value in brackets).", "", head,
             "|" + "---|" * 17]
    for method, art in results.items():
        m = art.metrics
        fid = m.get("class_fidelity", {})
        lines.append(f"| {method} | {m['num_samples']} | {_ci(m, 'fid')} | {_ci(m, 'fid_thirds_many')} | "
                     f"{_ci(m, 'fid_thirds_medium')} | {_ci(m, 'fid_thirds_few')} | {_rate(fid.get('all'))} | "
                     f"{_rate(fid.get('few'))} | {_rate(m.get('speckle'))} | "
                     f"{m['kernel_inception_distance_mean'] * 1e3:.2f} | {m['precision']:.3f} | {m['recall']:.3f} | "
                     f"{m['inception_score_mean']:.2f} | {m['prd_f8']:.3f} | {m['prd_f1_8']:.3f} | "
                     f"{_diversity(m.get('diversity'))} | {_fmt(m['memorization']['thirds_few'], 3)} |")
    lines += per_class_fidelity_table(results, info, manifest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def per_class_fidelity_table(results: dict[str, EvalArtifact], info: dict, manifest: dict | None) -> list[str]:
    """Per class: the rate at which the domain classifier recognises each method's samples as the
    class asked for (Wilson 95%), beside its accuracy on real test images of that class: the
    ceiling a generator is held to (a class the classifier confuses on real images cannot score
    higher on generated ones)."""
    with_rates = {m: a.metrics["class_fidelity"]["per_class"] for m, a in results.items()
                  if a.metrics.get("class_fidelity", {}).get("per_class")}
    if not with_rates:
        return []
    classes = len(next(iter(with_rates.values())))
    names = (manifest or {}).get("class_names") or [str(c) for c in range(classes)]
    counts = (manifest or {}).get("class_counts") or [None] * classes
    real = info.get("per_class_accuracy") or [None] * classes
    lines = ["", "Class fidelity per class, % [95% Wilson] (real: the domain classifier's accuracy on the real test "
             "images of the class)", "",
             "| class | train images | real | " + " | ".join(with_rates) + " |", "|" + "---|" * (3 + len(with_rates))]
    for c in range(classes):
        cells = [_rate(rates[c]) for rates in with_rates.values()]
        lines.append(f"| {names[c]} | {counts[c] if counts[c] is not None else 'n/a'} | "
                     f"{'n/a' if real[c] is None else f'{100 * real[c]:.1f}'} | " + " | ".join(cells) + " |")
    return lines


def plot_per_class_fid(m: dict, manifest: dict, out: Path, title: str, info: dict) -> None:
    """Per-class FID against training count (CBDM's Fig. 4 view)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts, names = manifest["class_counts"], manifest["class_names"]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for c, fid in enumerate(m["per_class_fid"]):
        if fid is not None:
            ax.scatter(counts[c], fid, color="#3b6ea8")
            if len(names) <= 20:
                ax.annotate(names[c], (counts[c], fid), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("training images of the class (log)")
    ax.set_ylabel(f"per-class FID ({info['extractor']} features)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_memorization(gen: dict, real: dict, nearest, dist, threshold: float, manifest: dict, out: Path,
                      method: str, per_group: int = 6) -> None:
    """Closest generated/training pairs of each class group, side by side (generated left)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = class_groups(manifest["class_counts"], "thirds")
    H, W, C = manifest["image_shape"]
    rows = [(g, i) for g, classes in groups.items()
            for i in np.flatnonzero(np.isin(gen["label"], classes))[np.argsort(dist[np.isin(gen["label"], classes)])][:per_group]]
    if not rows:
        return
    fig, axes = plt.subplots(len(groups), per_group, figsize=(per_group * 1.3, len(groups) * 1.0), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for gi, group in enumerate(groups):
        picks = [i for g, i in rows if g == group]
        for j, i in enumerate(picks):
            pair = np.concatenate([gen["image"][i], real["train_images"][nearest[i]]], axis=1)
            axes[gi, j].imshow(pair.squeeze(-1) if C == 1 else pair, cmap="gray" if C == 1 else None)
            flag = " copy" if dist[i] < threshold else ""
            axes[gi, j].set_title(f"{group} d={dist[i]:.2f}{flag}", fontsize=6)
    fig.suptitle(f"{method}: nearest training image (right) of the closest samples", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
