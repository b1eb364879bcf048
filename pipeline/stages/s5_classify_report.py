"""Tables and plots of the classify stage: history.csv, confusion.png, classify/table.md."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline.config import Config

RECIPE_NAMES = {"ce": "cross-entropy", "rs": "class-balanced resampling", "la": "logit-adjusted loss",
                "ldam_drw": "LDAM-DRW"}


def write_history(history: list[dict], path: Path) -> None:
    keys = list(dict.fromkeys(k for row in history for k in row))
    lines = [",".join(keys)] + [",".join("" if row.get(k) is None else f"{row[k]:.6g}" for k in keys) for row in history]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def plot_confusion(matrix: np.ndarray, class_names: list[str], out: Path, title: str) -> None:
    """Row-normalised confusion matrix (true class per row), counts written in small cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(class_names)
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = min(12.0, 2.5 + 0.45 * k)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    if k <= 20:
        ax.set_xticks(range(k), class_names, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(k), class_names, fontsize=7)
        for i in range(k):
            for j in range(k):
                if matrix[i, j]:
                    ax.text(j, i, f"{rates[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (rows sum to 1)")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def arm_description(art) -> tuple[str, str]:
    """(training set, recipe) as the table shows them."""
    recipe = RECIPE_NAMES.get(art.arm.recipe, art.arm.recipe)
    if art.arm.method is None:
        return "LT real", recipe
    return f"LT real + synthetic ({art.arm.method})", recipe


def classify_rows(results: dict) -> list[str]:
    """Markdown rows; Δ columns are against the real-only cross-entropy arm when it ran."""
    ce = results.get("ce")
    base = ce.metrics["last"] if ce else None
    rows = []
    for name, art in results.items():
        m, last = art.metrics, art.metrics["last"]
        train_set, recipe = arm_description(art)
        synthetic = sum(art.composition["synthetic"])
        real = sum(art.composition["real"])

        def delta(key: str) -> str:
            return "" if base is None or name == "ce" else f" ({(last[key] - base[key]) * 100:+.1f})"

        rows.append(
            f"| {name} | {train_set} | {recipe} | {real} | {synthetic} | "
            f"{last['accuracy'] * 100:.2f}{delta('accuracy')} | {m['best_accuracy'] * 100:.2f} (ep {m['best_epoch']}) | "
            f"{last['macro_precision'] * 100:.2f} | {last['macro_recall'] * 100:.2f} | {last['macro_f1'] * 100:.2f} | "
            f"{last['many_accuracy'] * 100:.2f} | {last['medium_accuracy'] * 100:.2f} | "
            f"{last['few_accuracy'] * 100:.2f}{delta('few_accuracy')} | {last['group_std'] * 100:.2f} |")
    return rows


def write_classify_table(cfg: Config, data, results: dict, path: Path) -> None:
    c = cfg.classify
    groups_note = "many / medium / few: thirds of the classes by LT training count"
    lines = [
        f"ResNet-32 ({c.epochs} epochs, batch {c.batch_size}, lr {c.lr}) on {data.manifest['dataset']}; metrics on "
        f"the balanced test split ({data.manifest['num_test']} images). Top-1 on a balanced test set is "
        f"the balanced accuracy. Last = the final epoch; best = the best evaluated epoch (every {c.eval_every}, "
        f"optimistic: chosen on the test set). {groups_note}; std = population std of the three group "
        "accuracies (DiffRC Table 3). Parenthesised: percentage points against LT real + cross-entropy.",
        "",
        "| arm | training set | recipe | real | synthetic | top-1 last (Δ CE) | top-1 best | macro P | macro R | "
        "macro F1 | many | medium | few (Δ CE) | std |",
        "|" + "---|" * 14,
        *classify_rows(results),
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
