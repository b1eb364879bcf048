"""Evaluate stage: FID / KID / precision-recall / IS through torch-fidelity, PRD F_8 / F_1/8,
per-class and many / medium / few FID, and the tail memorisation rate, per method.

Features come from a named torch-fidelity extractor: `domain` (a classifier trained here on
the balanced training set, cached per dataset with its test accuracy) or `inception`
(inception-v3-compat from `evaluate.weights_path`, or its download when online). Real-data
features (reference, LT train, test) are cached per (dataset, extractor, weights) under
`<output_dir>/extractors/`, so reruns reuse them and two extractors never mix.

Per run: `evaluation/<method>/metrics.json`, `per_class_fid.png`, `memorization.png`, and
`evaluation/table.md` comparing the run's methods. Every number names its extractor.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.metrics import class_groups, frechet_distance, memorization_rate, memorization_threshold
from models.prd import max_f_beta_pair, prd_from_features
from pipeline.config import Config, stable_hash
from pipeline.data import DatasetArtifact
from pipeline.errors import DataError, TaildiffError
from pipeline.sample import SampleArtifact
from pipeline.shards import column_to_numpy, read_split

log = logging.getLogger("taildiff.evaluate")


@dataclass(frozen=True)
class EvalArtifact:
    method: str
    path: Path
    metrics: dict
    skipped: bool


class Extractor:
    """A torch-fidelity feature extractor with the layer names our metrics use."""

    def __init__(self, cfg: Config, data: DatasetArtifact):
        import torch_fidelity.utils as tfu

        e = cfg.evaluate
        self.info: dict = {"extractor": e.extractor}
        if e.extractor == "domain":
            from models.features import register_domain_extractor

            weights = _domain_weights(cfg, data)
            name, layer, self.channels = register_domain_extractor(), "128", data.image_shape[2]
            self.info.update(weights=str(weights), **json.loads((weights.parent / "domain.json").read_text()))
        else:
            weights = Path(e.weights_path) if e.weights_path else None
            if weights is not None and not weights.is_file():
                raise TaildiffError(f"evaluate.weights_path={weights} does not exist: give the inception weights file")
            name, layer, self.channels = "inception-v3-compat", "2048", 3
            self.info["weights"] = str(weights) if weights else "torch-fidelity download"
        self.layer = layer
        kwargs = {"feature_extractor_weights_path": str(weights)} if weights else {}
        try:
            self.net = tfu.create_feature_extractor(name, [layer, "logits_unbiased"], cuda=False, verbose=False,
                                                    **kwargs)
        except Exception as exc:  # a damaged or foreign weights file, or no network for the download
            raise TaildiffError(f"cannot load the {e.extractor} feature extractor ({type(exc).__name__}: {exc}); "
                                "check evaluate.weights_path") from None
        stamp = [str(weights), os.path.getsize(weights), os.path.getmtime(weights)] if weights else "download"
        self.key = f"{e.extractor}-{stable_hash(stamp)}"

    @torch.no_grad()
    def __call__(self, images: np.ndarray, batch: int = 1000) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, H, W, C) -> features (N, D) float64 and logits (N, K)."""
        feats, logits = [], []
        for start in range(0, len(images), batch):
            x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch])).permute(0, 3, 1, 2)
            if self.channels == 3 and x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            f, lg = self.net(x.contiguous())
            feats.append(f.double().numpy())
            logits.append(lg.double().numpy())
        return np.concatenate(feats), np.concatenate(logits)


def _domain_weights(cfg: Config, data: DatasetArtifact) -> Path:
    """Train the domain classifier on the balanced reference split once per dataset; cached."""
    from models.features import save_domain_classifier, train_domain_classifier

    folder = Path(cfg.output_dir) / "extractors" / data.path.name / f"domain-e{cfg.evaluate.domain_epochs}"
    weights = folder / "domain.pt"
    if weights.is_file() and (folder / "domain.json").is_file():
        return weights
    ref = read_split(data.split_dir("reference"), data.image_shape, data.num_classes)
    test = read_split(data.split_dir("test"), data.image_shape, data.num_classes)
    to_t = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    log.info("evaluate: training the domain feature extractor on %d balanced images", len(ref["label"]))
    net, acc, per_class = train_domain_classifier(to_t(ref["image"]), torch.from_numpy(ref["label"]),
                                                  to_t(test["image"]), torch.from_numpy(test["label"]),
                                                  epochs=cfg.evaluate.domain_epochs, seed=cfg.seed)
    folder.mkdir(parents=True, exist_ok=True)
    save_domain_classifier(net, folder / "domain.pt.tmp", test_accuracy=acc)
    os.replace(folder / "domain.pt.tmp", weights)
    (folder / "domain.json").write_text(json.dumps({"test_accuracy": acc, "per_class_accuracy": per_class}))
    log.info("evaluate: domain extractor test accuracy %.4f", acc)
    return weights


def real_features(extractor: Extractor, cfg: Config, data: DatasetArtifact) -> dict:
    """Features of the reference, LT-train and test splits, cached per (dataset, extractor)."""
    cache = Path(cfg.output_dir) / "extractors" / data.path.name / f"features-{extractor.key}.npz"
    if cache.is_file():
        with np.load(cache) as blob:
            return {k: blob[k] for k in blob.files}
    out = {}
    for split in ("reference", "train", "test"):
        arrays = read_split(data.split_dir(split), data.image_shape, data.num_classes)
        out[f"{split}_feats"], out[f"{split}_logits"] = extractor(arrays["image"])
        out[f"{split}_labels"] = arrays["label"]
        if split == "train":
            out["train_images"] = arrays["image"]
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, **out)
    os.replace(tmp, cache)
    return out


def load_samples(sample: SampleArtifact, image_shape, allow_empty: bool = False) -> dict:
    """A sample set's image (N, H, W, C) uint8, label and per-image seed, shape-checked."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(sample.images_dir.glob("*.parquet"))
    if not files and allow_empty:  # a plan with nothing to generate
        return {"image": np.zeros((0, *image_shape), np.uint8), "label": np.zeros(0, np.int64),
                "seed": np.zeros(0, np.int64)}
    if not files:
        raise DataError(f"no samples in {sample.images_dir}: rerun the sample stage")
    images, labels, seeds = [], [], []
    for f in files:
        table = pq.read_table(f)
        flat = table.column("image").combine_chunks()
        storage = flat.storage if isinstance(flat, pa.ExtensionArray) else flat
        per_image = len(storage.flatten()) // max(1, len(table))
        if per_image != int(np.prod(image_shape)):
            raise DataError(f"samples in {f} hold {per_image} values per image but the reference images are "
                            f"{tuple(image_shape)} (H, W, C): sample and evaluate the same dataset")
        images.append(column_to_numpy(table.column("image"), tuple(image_shape)))
        labels.append(table.column("label").to_numpy().astype(np.int64))
        seeds.append(table.column("seed").to_numpy().astype(np.int64))
    return {"image": np.concatenate(images), "label": np.concatenate(labels), "seed": np.concatenate(seeds)}


def evaluate_features(gen_feats, gen_logits, gen_labels, real: dict, counts, cfg: Config) -> dict:
    """All metrics of one method from its features (see module docstring)."""
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    e, C = cfg.evaluate, len(counts)
    ref, ref_labels = real["reference_feats"], real["reference_labels"]
    gen_t, ref_t = torch.from_numpy(gen_feats), torch.from_numpy(ref)
    subset = min(e.kid_subset_size, len(gen_feats), len(ref))
    out = {"fid": frechet_distance(gen_feats, ref), "num_samples": int(len(gen_feats))}
    out.update(kid_features_to_metric(gen_t, ref_t, kid_subsets=100, kid_subset_size=subset, verbose=False,
                                      rng_seed=cfg.seed, kid_kernel="poly", kid_degree=3, kid_gamma=None,
                                      kid_coef0=1))
    out.update(prc_features_to_metric(gen_t.float(), ref_t.float(), prc_neighborhood=e.prc_neighborhood,
                                      prc_batch_size=10000, save_cpu_ram=True, verbose=False))
    out.update(isc_features_to_metric(torch.from_numpy(gen_logits), splits=10, rng_seed=cfg.seed))
    ref_sub = ref[np.random.default_rng(cfg.seed).permutation(len(ref))[:max(len(gen_feats), 2)]]
    out["prd_f8"], out["prd_f1_8"] = max_f_beta_pair(*prd_from_features(
        gen_feats, ref_sub, num_clusters=min(e.prd_clusters_per_class * C, len(gen_feats) - 1, len(ref_sub) - 1),
        num_runs=e.prd_runs, seed=cfg.seed))
    per_class, gen_counts = [], np.bincount(gen_labels, minlength=C)
    for c in range(C):
        ok = gen_counts[c] >= e.min_per_class
        per_class.append(frechet_distance(gen_feats[gen_labels == c], ref[ref_labels == c]) if ok else None)
    out["per_class_fid"], out["per_class_samples"] = per_class, gen_counts.tolist()
    threshold = memorization_threshold(real["test_feats"], real["train_feats"], e.memorization_quantile)
    rate, dist, nearest = memorization_rate(gen_feats, real["train_feats"], threshold)
    out["memorization"] = {"threshold": threshold, "quantile": e.memorization_quantile, "all": rate}
    for convention in ("thirds", "absolute"):
        groups = class_groups(counts, convention, e.many_above, e.few_below)
        for group, classes in groups.items():
            g, r = np.isin(gen_labels, classes), np.isin(ref_labels, classes)
            fid = frechet_distance(gen_feats[g], ref[r]) if g.sum() >= e.min_per_class else None
            out[f"fid_{convention}_{group}"] = fid
            out["memorization"][f"{convention}_{group}"] = float((dist[g] < threshold).mean()) if g.any() else None
    out["_nearest"], out["_dist"] = nearest, dist
    return out


def run_evaluate(cfg: Config, data: DatasetArtifact, samples: dict[str, SampleArtifact]) -> dict[str, EvalArtifact]:
    root = (cfg.run_dir / "evaluation").resolve()
    extractor = Extractor(cfg, data)
    real = None
    results = {}
    for method, sample in samples.items():
        out = root / method
        key = stable_hash({"samples": json.loads((sample.path / "manifest.json").read_text())["key"],
                           "evaluate": dataclasses.asdict(cfg.evaluate), "extractor": extractor.key})
        metrics_path = out / "metrics.json"
        if metrics_path.is_file() and json.loads(metrics_path.read_text()).get("key") == key:
            log.info("evaluate[%s]: reusing %s", method, out)
            results[method] = EvalArtifact(method, out, json.loads(metrics_path.read_text()), skipped=True)
            continue
        real = real if real is not None else real_features(extractor, cfg, data)
        gen = load_samples(sample, data.image_shape)
        gen_feats, gen_logits = extractor(gen["image"])
        m = evaluate_features(gen_feats, gen_logits, gen["label"], real, data.manifest["class_counts"], cfg)
        nearest, dist = m.pop("_nearest"), m.pop("_dist")
        out.mkdir(parents=True, exist_ok=True)
        plot_per_class_fid(m, data.manifest, out / "per_class_fid.png", f"{cfg.name}: {method}", extractor.info)
        plot_memorization(gen, real, nearest, dist, m["memorization"]["threshold"], data.manifest,
                          out / "memorization.png", method)
        m.update(key=key, method=method, extractor=extractor.info)
        tmp = metrics_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(m, indent=2))
        os.replace(tmp, metrics_path)
        log.info("evaluate[%s]: FID %.3f (%s), few-group FID %s, memorization %.3f", method, m["fid"],
                 extractor.info["extractor"], _fmt(m["fid_thirds_few"]), m["memorization"]["all"])
        results[method] = EvalArtifact(method, out, m, skipped=False)
    write_table(results, root / "table.md", extractor.info)
    return results


def _fmt(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def write_table(results: dict[str, EvalArtifact], path: Path, info: dict) -> None:
    head = ("| method | FID | KID×1e3 | precision | recall | IS | F8 | F1/8 | FID many | FID medium | FID few | "
            "memorized (few) |")
    lines = [f"Features: **{info['extractor']}**" + (f" (test accuracy {info['test_accuracy']:.4f})"
                                                     if "test_accuracy" in info else "") +
             "; groups: thirds of the classes by training count.", "", head, "|" + "---|" * 12]
    for method, art in results.items():
        m = art.metrics
        lines.append(f"| {method} | {m['fid']:.2f} | {m['kernel_inception_distance_mean'] * 1e3:.2f} | "
                     f"{m['precision']:.3f} | {m['recall']:.3f} | {m['inception_score_mean']:.2f} | "
                     f"{m['prd_f8']:.3f} | {m['prd_f1_8']:.3f} | {_fmt(m['fid_thirds_many'])} | "
                     f"{_fmt(m['fid_thirds_medium'])} | {_fmt(m['fid_thirds_few'])} | "
                     f"{_fmt(m['memorization']['thirds_few'], 3)} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


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
