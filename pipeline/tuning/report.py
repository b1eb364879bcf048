"""Outputs of a sweep: results table (markdown + csv), plots, and the best config as a YAML
preset that `pipeline/run.py --config` accepts as is."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import yaml

from pipeline.config import Config, load_config

GROUPS = ("fid_many", "fid_medium", "fid_few")


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "+".join(str(v) for v in value)
    return str(value)


def write_table(rows: list[dict], keys: list[str], out: Path, extra: list[str], title: str) -> None:
    """results.csv and results.md, best first; `extra` are the row fields after the params."""
    rows = sorted(rows, key=lambda r: (r["fid"] is None, r["fid"] if r["fid"] is not None else 0.0))
    lead = ["checkpoint"] if rows and "checkpoint" in rows[0] else ["trial_id"]
    header = lead + keys + ["fid"] + extra
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for r in rows:
            cells = [r["params"].get(h) if h in keys else r.get(h) for h in header]
            writer.writerow(["+".join(map(str, c)) if isinstance(c, (list, tuple)) else c for c in cells])
    lines = [title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [_fmt(r["params"].get(h)) if h in keys else _fmt(r.get(h)) for h in header]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def write_best_yaml(cfg: Config, path: Path, comment: str) -> Path:
    """A full preset (every section) for run.py; checked by loading it back."""
    body = yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)
    path.write_text("".join(f"# {line}\n" for line in comment.splitlines()) + body)
    load_config(path)  # round-trip: the file is a valid preset
    return path


def _numeric(values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def plot_sample_sweep(rows: list[dict], out: Path, extractor: str) -> Path:
    """FID vs ω, one line per checkpoint (and DDIM step count when several)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list] = {}
    many_steps = len({r["params"].get("sample.steps") for r in rows}) > 1
    for r in rows:
        label = r["checkpoint"] + (f", {r['params'].get('sample.steps')} steps" if many_steps else "")
        lines.setdefault(label, []).append((r["params"].get("sample.omega", math.nan), r["fid"]))
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for label, pts in lines.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        best = min(pts, key=lambda p: p[1])
        ax.scatter([best[0]], [best[1]], s=90, facecolors="none", edgecolors="k")
    ax.set_xlabel("guidance ω")
    ax.set_ylabel(f"FID ({extractor} features)")
    ax.set_title("FID vs guidance ω (circle: optimum)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "fid_vs_omega.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_train_sweep(rows: list[dict], keys: list[str], out: Path, log_keys: set, extractor: str) -> list[Path]:
    """Final proxy FID vs each swept value (finished trials filled, stopped hollow) and the
    proxy-FID curves of all trials against the train step (where ASHA cut them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    scored = [r for r in rows if r["fid"] is not None]
    for key in keys:
        values = [r["params"].get(key) for r in scored]
        fig, ax = plt.subplots(figsize=(4.6, 3.3))
        xs = values if _numeric(values) else [str(v) for v in values]
        for r, x in zip(scored, xs):
            done = r["status"] == "finished"
            ax.scatter([x], [r["fid"]], color="#3b6ea8" if done else "none", edgecolors="#3b6ea8")
        if key in log_keys:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(f"proxy FID at the last step ({extractor})")
        ax.set_title(f"FID vs {key} (hollow: stopped early)", fontsize=9)
        fig.tight_layout()
        path = out / f"fid_vs_{key.replace('.', '_')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for r in scored:
        hist = r["fid_history"]
        label = ", ".join(f"{k.split('.')[-1]}={_fmt(r['params'].get(k))}" for k in keys)
        ax.plot([h[0] for h in hist], [h[1] for h in hist], marker=".", label=label[:40])
    ax.set_xlabel("train step")
    ax.set_ylabel("proxy FID")
    ax.set_title("proxy FID per trial", fontsize=9)
    if len(scored) <= 12:
        ax.legend(fontsize=6)
    fig.tight_layout()
    path = out / "fid_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [*paths, path]
