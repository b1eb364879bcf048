"""The study's outputs in `study.results_dir`: results.json (every number with its interval, the
config, the commit), table.md (the paired comparison, the classifier table over seeds, one line per
paper claim) and the figures a reader wants."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from models.evaluation.metrics import class_groups
from pipeline.common.files import write_json, write_text
from pipeline.common.machine import describe, git_commit

CLAIMS = [
    # (paper, claim, metric, method, against, direction): direction -1 = the method's value is lower
    ("CBDM (Qin et al. 2023)", "CBDM has a lower FID than DDPM", "fid", "cbdm", "ddpm", -1),
    ("CBDM (Qin et al. 2023)", "CBDM has a lower few-group (tail) FID than DDPM", "fid_few", "cbdm", "ddpm", -1),
    ("OC (Zhang et al. 2024)", "T2H has a lower FID than DDPM", "fid", "t2h", "ddpm", -1),
    ("OC (Zhang et al. 2024)", "T2H has a lower FID than CBDM", "fid", "t2h", "cbdm", -1),
    ("DiffROP (Yan et al.)", "DiffROP has a lower few-group FID than DDPM", "fid_few", "diffrop", "ddpm", -1),
    ("DiffROP (Yan et al.)", "CBDM + DiffROP has a lower FID than CBDM", "fid", "cbdm+diffrop", "cbdm", -1),
    ("DiffRC", "DiffRC's synthetic data gives a higher few-group accuracy than DDPM's", "few_accuracy",
     "diffrc_cfg", "ddpm", +1),
    ("CBDM / DiffROP downstream", "real + synthetic beats the best classifier-only baseline (top-1)", "accuracy",
     "best_synthetic", "best_baseline", +1),
]


def _verdict(diff: dict, direction: int) -> str:
    lo, hi = diff.get("low"), diff.get("high")
    if lo is None or hi is None or not np.isfinite(lo) or not np.isfinite(hi):
        return "inconclusive (no interval)"
    if (direction < 0 and hi < 0) or (direction > 0 and lo > 0):
        return "reproduced"
    if (direction < 0 and lo > 0) or (direction > 0 and hi < 0):
        return "not reproduced (the opposite holds)"
    return "inconclusive (the interval contains 0)"


def paired_generation(cfg, evaluations: dict, baseline: str = "ddpm", replicates: int = 200) -> dict:
    """Paired bootstrap differences (FID, few-group FID, class fidelity) of every method against
    every other one that a claim names, from the evaluate stage's per-image features."""
    from models.evaluation.intervals import bootstrap_indices, frechet_from_stats, gaussian_stats, percentile_interval

    root = cfg.run_dir / "evaluation"
    with np.load(root / "reference_stats.npz") as blob:
        ref = {k: blob[k] for k in blob.files}
    sets = {}
    for name in evaluations:
        with np.load(root / name / "features.npz") as blob:
            f = {k: blob[k] for k in blob.files}
        order = np.lexsort(np.stack([f["seed"], f["k"], f["label"]]))
        sets[name] = {k: v[order] for k, v in f.items()}

    def fids(s, idx):
        feats, labels = s["feats"][idx], s["label"][idx]
        few = np.isin(labels, ref["few_classes"])
        return (frechet_from_stats(*gaussian_stats(feats), ref["all_mu"], ref["all_sigma"]),
                frechet_from_stats(*gaussian_stats(feats[few]), ref["few_mu"], ref["few_sigma"]),
                float((s["logits"][idx].argmax(1) == labels).mean()))

    pairs = {(c[3], c[4]) for c in CLAIMS if c[3] in sets and c[4] in sets} | {(m, baseline) for m in sets if m != baseline}
    base_labels = next(iter(sets.values()))["label"]
    idx = bootstrap_indices(len(base_labels), replicates, cfg.seed, strata=base_labels)
    full = np.arange(len(base_labels))
    out = {}
    for a, b in sorted(pairs):
        if not np.array_equal(sets[a]["seed"], sets[b]["seed"]):
            continue
        point = np.subtract(fids(sets[a], full), fids(sets[b], full))
        reps = np.array([np.subtract(fids(sets[a], i), fids(sets[b], i)) for i in idx])
        out[f"{a} - {b}"] = {}
        for j, key in enumerate(("fid", "fid_few", "class_fidelity")):
            lo, hi = percentile_interval(reps[:, j], point=float(point[j]))
            out[f"{a} - {b}"][key] = {"difference": float(point[j]), "low": lo, "high": hi,
                                      "real": bool(lo > 0 or hi < 0)}
    return out


def classifier_summary(classifiers: dict) -> dict:
    """Per arm (seeds pooled): mean ± std and t-interval of top-1 / many / medium / few accuracy."""
    from models.evaluation.intervals import mean_interval

    arms: dict[str, dict[int, dict]] = {}
    for name, art in classifiers.items():
        base = name if not art.arm.seed else name.rsplit("-s", 1)[0]
        arms.setdefault(base, {})[art.arm.seed] = art.metrics["last"]
    out = {}
    for base, by_seed in arms.items():
        seeds = sorted(by_seed)
        out[base] = {"seeds": seeds, **{key: mean_interval([100 * by_seed[s][key] for s in seeds])
                                        for key in ("accuracy", "many_accuracy", "medium_accuracy", "few_accuracy")}}
        out[base]["per_seed"] = {str(s): {k: by_seed[s][k] for k in ("accuracy", "few_accuracy")} for s in seeds}
    return out


def classifier_differences(classifiers: dict, summary: dict, baselines: list[str]) -> dict:
    from models.evaluation.intervals import paired_seed_difference

    by = {}
    for name, art in classifiers.items():
        base = name if not art.arm.seed else name.rsplit("-s", 1)[0]
        by.setdefault(base, {})[art.arm.seed] = art.metrics["last"]
    best_base = max((b for b in baselines if b in by), key=lambda b: summary[b]["accuracy"]["mean"])
    out = {"best_baseline": best_base}
    for arm in by:  # against CE and the best baseline; a synthetic arm also against DDPM's (the same seeds)
        refs = ("ce", best_base) + (("syn-ddpm",) if arm.startswith("syn-") else ())
        for ref in refs:
            if arm == ref or ref not in by:
                continue
            common = sorted(set(by[arm]) & set(by[ref]))
            out[f"{arm} - {ref}"] = {key: paired_seed_difference([100 * by[arm][s][key] for s in common],
                                                                 [100 * by[ref][s][key] for s in common])
                                     for key in ("accuracy", "few_accuracy")}
    return out


def write_results(cfg, data, models, evaluations, eqc_evals, classifiers, omegas, classified, seconds,
                  clock) -> dict:
    """`seconds`: this invocation's; results.json's `seconds` sums every invocation's phases (`clock`, a
    study_clock.InvocationClock)."""
    total = clock.totals()

    out = Path(cfg.study.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    paired = paired_generation(cfg, evaluations)
    summary = classifier_summary(classifiers)
    baselines = list(cfg.classify.baselines)
    cls_diff = classifier_differences(classifiers, summary, baselines)
    synthetic = [a for a in summary if a.startswith("syn-")]
    best_syn = max(synthetic, key=lambda a: summary[a]["accuracy"]["mean"]) if synthetic else None
    results = {
        "commit": git_commit(), "config": cfg.to_dict(), "seconds": total["seconds"],
        "seconds_by_phase": total["seconds_by_phase"], "invocations": total["invocations"],
        "seconds_this_invocation": round(seconds, 1), "invocation_log": total["runs"], "omegas": omegas,
        "classify_methods": list(classified), "dataset": data.manifest["class_counts"],
        "generation": {m: as_json(e.metrics) for m, e in evaluations.items()},
        "generation_equal_compute": {m: as_json(e.metrics) for m, e in eqc_evals.items()},
        "paired_generation": paired, "classification": summary, "classification_differences": cls_diff,
        "training": {m: as_json(a.metrics) for m, a in models.items()},
    }
    results["claims"] = claims(results, best_syn)
    write_json(out / "results.json", as_json(results))
    write_text(out / "table.md", table(cfg, results, best_syn))
    figures(cfg, data, evaluations, summary, out)
    return {"results_dir": str(out), "seconds": total["seconds"]}


def claims(results: dict, best_syn: str | None) -> list[dict]:
    rows = []
    for paper, text, metric, a, b, direction in CLAIMS:
        if metric in ("accuracy", "few_accuracy"):
            diffs = results["classification_differences"]
            a_name = best_syn if a == "best_synthetic" else f"syn-{a.replace('+', '-')}"
            b_name = diffs["best_baseline"] if b == "best_baseline" else f"syn-{b}"
            d = diffs.get(f"{a_name} - {b_name}", {}).get(metric)  # syn-X − syn-ddpm: paired over seeds
            diff = None if d is None else {"difference": d["mean"], "low": d.get("low"), "high": d.get("high")}
            label = f"{a_name} − {b_name}"
        else:
            diff = results["paired_generation"].get(f"{a} - {b}", {}).get(metric)
            label = f"{a} − {b}"
        verdict = "not measured (method not in the study)" if diff is None else _verdict(diff, direction)
        rows.append({"paper": paper, "claim": text, "comparison": label, "metric": metric, "difference": diff,
                     "verdict": verdict})
    return rows


def _fmt(d: dict | None) -> str:
    if not d:
        return "—"
    lo, hi = d.get("low"), d.get("high")
    ci = f" [{lo:+.2f}, {hi:+.2f}]" if lo is not None and hi is not None and np.isfinite(lo) else ""
    return f"{d['difference']:+.2f}{ci}"


def _phases(timings: dict | None) -> str:
    if not timings:
        return ""
    return " (" + ", ".join(f"{k.replace('_', ' ')} {v / 60:.0f}" for k, v in timings.items()) + " min)"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 60 else f"{seconds / 60:.0f} min"


def _invocations(results: dict) -> str:
    """Where the wall time was spent: per invocation its start, commit, machine and minutes."""
    log = results.get("invocation_log")
    if not log:  # results written before invocations were recorded
        n = results.get("invocations", 1)
        return "" if n <= 1 else f", summed over {n} invocations"

    def one(run: dict) -> str:
        commit = (run.get("commit") or "unrecorded commit")[:7]
        killed = f", killed in {run['killed_in'].replace('_', ' ')}" if run.get("killed_in") else ""
        return (f"{(run.get('started') or '?').replace('T', ' ')[:16]} at {commit} on "
                f"{describe(run.get('machine'))}: {_duration(run['seconds'])}{killed}")

    if len(log) == 1:
        return f"; one invocation, {one(log[0])}"
    return f"; summed over {len(log)} invocations (the study resumed): " + "; ".join(
        f"{i}. {one(run)}" for i, run in enumerate(log, 1))


def table(cfg, results: dict, best_syn: str | None) -> str:
    gen, paired = results["generation"], results["paired_generation"]
    n = next(iter(gen.values()))["num_samples"]
    lines = [f"# Study: {cfg.name} ({cfg.data.dataset}, imbalance {cfg.data.imb_factor}), written at commit {results['commit']}",
             "", f"Every method fine-tuned {cfg.train.finetune_steps} steps from one DDPM ({cfg.train.steps} steps); "
             f"{n} evaluation images per method, the same per-image seeds for every method (paired); ω per method "
             f"from a held-out sweep over {list(cfg.study.omega_grid)} ({cfg.study.omega_images} images, own seeds); "
             f"domain features; 95% intervals: bootstrap over images (FID), Wilson (rates), t over "
             f"{cfg.classify.seeds} seeds (classifiers). Wall time {results['seconds'] / 60:.0f} min"
             + _phases(results.get("seconds_by_phase")) + _invocations(results) + ".",
             "", "## Generation", "",
             "| method | ω | FID | FID many | FID medium | FID few | Δ FID vs ddpm | Δ FID few vs ddpm | class fidelity % "
             "| fidelity few % | memorised | speckled % |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def ci(m, key):
        iv = m.get(f"{key}_interval")
        return "n/a" if m.get(key) is None else f"{m[key]:.2f}" + (f" [{iv[0]:.2f}, {iv[1]:.2f}]" if iv else "")

    def rate(e):
        return "n/a" if not e else f"{100 * e['rate']:.1f} [{100 * e['low']:.1f}, {100 * e['high']:.1f}]"

    for name, m in gen.items():
        d = paired.get(f"{name} - ddpm", {})
        mem = m["memorization"]
        lines.append(f"| {name} | {results['omegas'].get(name)} | {ci(m, 'fid')} | {ci(m, 'fid_thirds_many')} | "
                     f"{ci(m, 'fid_thirds_medium')} | {ci(m, 'fid_thirds_few')} | {_fmt(d.get('fid'))} | "
                     f"{_fmt(d.get('fid_few'))} | {rate(m.get('class_fidelity', {}).get('all'))} | "
                     f"{rate(m.get('class_fidelity', {}).get('few'))} | {mem['all']:.3f} | {rate(m.get('speckle'))} |")
    if results["generation_equal_compute"]:
        lines += ["", "Equal compute (the method's steps cut by its training cost):", "",
                  "| method | FID | FID few |", "|---|---|---|"]
        for name, m in results["generation_equal_compute"].items():
            lines.append(f"| {name} | {ci(m, 'fid')} | {ci(m, 'fid_thirds_few')} |")
    summary, diffs = results["classification"], results["classification_differences"]
    lines += ["", "## Classification (ResNet-32, balanced test set, last epoch)", "",
              f"Mean ± std over seeds; Δ paired by seed with a 95% t-interval; best classifier-only baseline: "
              f"**{diffs['best_baseline']}**.", "",
              "| arm | top-1 % | many % | medium % | few % | Δ top-1 vs ce | Δ top-1 vs best baseline | Δ few vs ce |",
              "|---|---|---|---|---|---|---|---|"]
    for arm, s in summary.items():
        def ms(key):
            v = s[key]
            return f"{v['mean']:.2f} ± {v['std']:.2f}" if v["n"] > 1 else f"{v['mean']:.2f}"

        def dd(ref, key):
            d = diffs.get(f"{arm} - {ref}", {}).get(key)
            if not d:
                return "—"
            real = " *" if d.get("real") else ""
            return f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]{real}" if d["n"] > 1 else f"{d['mean']:+.2f}"

        lines.append(f"| {arm} | {ms('accuracy')} | {ms('many_accuracy')} | {ms('medium_accuracy')} | "
                     f"{ms('few_accuracy')} | {dd('ce', 'accuracy')} | {dd(diffs['best_baseline'], 'accuracy')} | "
                     f"{dd('ce', 'few_accuracy')} |")
    lines += ["", "(* the interval excludes 0)", "", "## The papers' claims on this data", "",
              "| paper | claim | comparison | difference [95% CI] | verdict |", "|---|---|---|---|---|"]
    for c in results["claims"]:
        lines.append(f"| {c['paper']} | {c['claim']} | {c['comparison']} | {_fmt(c['difference'])} | {c['verdict']} |")
    return "\n".join(lines) + "\n"


def figures(cfg, data, evaluations: dict, summary: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(evaluations)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names)), 3.6))
    width = 0.27
    for j, group in enumerate(("many", "medium", "few")):
        vals = [evaluations[m].metrics.get(f"fid_thirds_{group}") or np.nan for m in names]
        ivs = [evaluations[m].metrics.get(f"fid_thirds_{group}_interval") or [np.nan, np.nan] for m in names]
        err = np.array([[v - iv[0], iv[1] - v] for v, iv in zip(vals, ivs)]).T
        ax.bar(np.arange(len(names)) + (j - 1) * width, vals, width, yerr=err, capsize=2, label=group)
    ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("FID (domain features)")
    ax.set_title("FID per class group, 95% bootstrap intervals", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "fid_per_group.png", dpi=120)
    plt.close(fig)

    counts = data.manifest["class_counts"]
    order = np.argsort(counts)[::-1]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for m in names:
        per = evaluations[m].metrics["per_class_fid"]
        ax.plot([counts[c] for c in order], [per[c] if per[c] is not None else np.nan for c in order], marker=".",
                label=m, linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("training images of the class (log)")
    ax.set_ylabel("per-class FID")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "per_class_fid.png", dpi=120)
    plt.close(fig)

    arms = list(summary)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(arms)), 3.6))
    for j, key in enumerate(("many_accuracy", "medium_accuracy", "few_accuracy")):
        vals = [summary[a][key]["mean"] for a in arms]
        err = [summary[a][key]["std"] if summary[a][key]["n"] > 1 else 0 for a in arms]
        ax.bar(np.arange(len(arms)) + (j - 1) * width, vals, width, yerr=err, capsize=2, label=key.split("_")[0])
    ax.set_xticks(range(len(arms)), arms, rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("accuracy % (mean ± std over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy_per_group.png", dpi=120)
    plt.close(fig)

    tail_grids(cfg, data, names, out / "tail_samples.png")


def tail_grids(cfg, data, names: list, path: Path, per_class: int = 8, per_row: int = 4) -> None:
    """The few-group classes' first samples of every method, side by side (one column block per method).
    `names`: sample folders of this run, or (label, folder path) pairs for sets of other runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.common.artifacts import SampleArtifact, load_samples

    few = class_groups(data.manifest["class_counts"], "thirds")["few"]
    H, W, C = data.image_shape
    blocks = []
    labels = []
    for m in names:
        label, folder = (m, cfg.run_dir / "samples" / m) if isinstance(m, str) else (m[0], Path(m[1]))
        labels.append(label)
        s = load_samples(SampleArtifact(label, folder, 0, True), data.image_shape)
        rows = []
        for c in few:
            idx = np.flatnonzero(s["label"] == c)
            idx = idx[np.argsort(s["k"][idx])][:per_class]
            rows.append(np.concatenate([np.pad(s["image"][i], ((1, 1), (1, 1), (0, 0)), constant_values=255)
                                        for i in idx], axis=1))
        blocks.append(np.concatenate(rows, axis=0))
    cols = min(per_row, len(blocks))  # a readable size per method: rows of `per_row` methods
    nrows = -(-len(blocks) // cols)
    height = 0.5 + (0.45 * len(few) + 0.35) * nrows
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols * per_class / 8, height), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, m, block in zip(axes.flat, labels, blocks):
        ax.imshow(block.squeeze(-1) if C == 1 else block, cmap="gray" if C == 1 else None)
        ax.set_title(m, fontsize=9)
    fig.suptitle("tail classes (rows): " + ", ".join(data.manifest["class_names"][c] for c in few)
                 + f"; the first {per_class} evaluation images of each, the same seeds for every method", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def as_json(value):
    """numpy scalars/arrays -> plain JSON."""
    if isinstance(value, dict):
        return {k: as_json(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [as_json(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value
