"""scikit-learn's bundled 8×8 handwritten digits: zero set-up, for fast tests and demos."""
from __future__ import annotations

import numpy as np

from pipeline.sources import SourceData

TEST_FRACTION = 0.25


def load_digits(cfg) -> SourceData:
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]  # (1797, 8, 8, 1)
    labels = bunch.target.astype(np.int64)
    # The set has no official split: a fixed stratified one, independent of the run's seed.
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=TEST_FRACTION, stratify=labels, random_state=0
    )
    idx_train, idx_test = np.sort(idx_train), np.sort(idx_test)
    return SourceData(
        class_names=[str(d) for d in range(10)],
        train_images=images[idx_train],
        train_labels=labels[idx_train],
        test_images=images[idx_test],
        test_labels=labels[idx_test],
        origin="sklearn.datasets.load_digits",
    )
