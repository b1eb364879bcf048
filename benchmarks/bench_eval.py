"""Evaluation on Fashion-MNIST with the domain extractor, measured in one run (no Ray needed).

1. Train the domain classifier on the balanced 60k training set; report test accuracy and time.
2. Time torch-fidelity FID/KID/precision-recall/IS for 10k images against the 60k reference
   (goal <= 60 s on 2 cores), with the reference features extracted once and reused.
3. The floors any generator is compared with: FID of the real test set and of the real
   long-tailed training set against the balanced reference, per group too.

    python benchmarks/bench_eval.py [--epochs 3]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.evaluation.features import register_domain_extractor, save_domain_classifier, train_domain_classifier  # noqa: E402
from models.data.longtail import long_tailed_counts, select_long_tailed  # noqa: E402
from models.evaluation.metrics import class_groups, frechet_distance  # noqa: E402
from models.evaluation.prd import max_f_beta_pair, prd_from_features  # noqa: E402
from pipeline.config import DataConfig  # noqa: E402
from pipeline.sources import get_source  # noqa: E402


class Images(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    import torch_fidelity

    src = get_source("fashion-mnist")(DataConfig(download=False))
    to_t = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    train_x, test_x = to_t(src.train_images), to_t(src.test_images)
    train_y, test_y = torch.from_numpy(src.train_labels), torch.from_numpy(src.test_labels)
    t0 = time.perf_counter()
    net, acc, per_class = train_domain_classifier(train_x, train_y, test_x, test_y, epochs=args.epochs)
    train_s = time.perf_counter() - t0
    print(f"domain classifier: test accuracy {acc:.4f} after {args.epochs} epochs on 60k ({train_s:.0f} s)")
    print("  per class: " + ", ".join(f"{n} {a:.2f}" for n, a in zip(src.class_names, per_class)))
    weights = Path(tempfile.mkdtemp()) / "domain.pt"
    save_domain_classifier(net, weights, test_accuracy=acc)
    name = register_domain_extractor()

    # reference features once (what the evaluation stage caches), then 10k "samples"
    t0 = time.perf_counter()
    with torch.no_grad():
        ref_feats = torch.cat([net.features(train_x[i:i + 2048]) for i in range(0, len(train_x), 2048)]).numpy()
    ref_s = time.perf_counter() - t0
    kw = dict(feature_extractor=name, feature_extractor_weights_path=str(weights), cuda=False, verbose=False,
              save_cpu_ram=True)
    t0 = time.perf_counter()
    out = torch_fidelity.calculate_metrics(input1=Images(test_x), input2=Images(train_x), fid=True, kid=True,
                                           prc=True, isc=True, **kw)
    full_s = time.perf_counter() - t0
    with torch.no_grad():
        gen_feats = torch.cat([net.features(test_x[i:i + 2048]) for i in range(0, len(test_x), 2048)]).numpy()
    t0 = time.perf_counter()
    prd = max_f_beta_pair(*prd_from_features(gen_feats, ref_feats[:10000], num_clusters=200, num_runs=10))
    prd_s = time.perf_counter() - t0
    print(f"reference features, 60k images: {ref_s:.1f} s")
    print(f"torch-fidelity FID/KID/PR/IS, 10k vs 60k (reference extracted inside too): {full_s:.1f} s "
          f"(goal 60 s: {60 / full_s:.1f}x under)")
    print(f"PRD (200 clusters, 10 runs, 10k vs 10k): {prd_s:.1f} s; F8={prd[0]:.3f} F1/8={prd[1]:.3f}")
    print(f"real test set vs reference [domain]: FID {out['frechet_inception_distance']:.3f}, "
          f"KID {out['kernel_inception_distance_mean']:.5f}, precision {out['precision']:.3f}, "
          f"recall {out['recall']:.3f}, IS {out['inception_score_mean']:.2f}")

    counts = long_tailed_counts(6000, 10, "exp", 0.01)
    lt = select_long_tailed(src.train_labels, counts, seed=0)
    lt_feats = ref_feats[lt]
    print(f"real LT training set (14,886) vs reference [domain]: FID {frechet_distance(lt_feats, ref_feats):.3f}")
    groups = class_groups(counts, "thirds")
    labels = src.train_labels
    for group, classes in groups.items():
        g_ref = ref_feats[np.isin(labels, classes)]
        g_test = gen_feats[np.isin(src.test_labels, classes)]
        g_lt = ref_feats[lt][np.isin(labels[lt], classes)]
        print(f"  {group:<6} classes {classes}: test-vs-ref FID {frechet_distance(g_test, g_ref):.3f}, "
              f"LT-train-vs-ref FID {frechet_distance(g_lt, g_ref):.3f}")


if __name__ == "__main__":
    main()
