"""Experiment tracking from the workers (rank 0): TensorBoard event files in the run folder, and
MLflow when `tracking.mlflow_uri` is set (a local `file:` store works offline).

    <run_dir>/tensorboard/<job>/events.out.tfevents.*     tensorboard --logdir outputs/runs/<name>

Scalars: every logged loss term, lr, grad norm, images/s, data-wait fraction (diffusion); loss,
lr and test metrics per epoch (classifiers); the proxy FID of a Tune trial. Images: a per-class
sample grid from the EMA weights at every diffusion checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


class RunLogger:
    """One job's logger; every method is a no-op when disabled (other ranks, tracking off)."""

    def __init__(self, run_dir: Path, job: str, enabled: bool = True, mlflow_uri: str | None = None,
                 params: dict | None = None):
        self.tb = self.mlflow = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard" / job.replace("+", "-")))
        if mlflow_uri:
            import os

            if mlflow_uri.startswith("file:") or "://" not in mlflow_uri:  # the offline store mlflow-skinny has
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            import mlflow

            mlflow.set_tracking_uri(mlflow_uri)
            mlflow.set_experiment(Path(run_dir).name)
            self.mlflow = mlflow
            self.run = mlflow.start_run(run_name=job)
            if params:
                mlflow.log_params({k: str(v)[:500] for k, v in params.items()})

    def scalars(self, step: int, values: dict, prefix: str = "") -> None:
        clean = {f"{prefix}{k}": float(v) for k, v in values.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)}
        if self.tb is not None:
            for name, value in clean.items():
                self.tb.add_scalar(name, value, step)
        if self.mlflow is not None:
            self.mlflow.log_metrics({k.replace("/", "_"): v for k, v in clean.items()}, step=step)

    def image(self, tag: str, step: int, grid: np.ndarray) -> None:
        """grid: uint8 (H, W, C)."""
        if self.tb is not None:
            self.tb.add_image(tag, grid, step, dataformats="HWC")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
        if self.mlflow is not None:
            self.mlflow.end_run()


def image_grid(images: np.ndarray, rows: int) -> np.ndarray:
    """uint8 (N, H, W, C) -> one (rows·(H+2), cols·(W+2), C) grid, row-major."""
    n, h, w, c = images.shape
    cols = -(-n // rows)
    out = np.full((rows * (h + 2), cols * (w + 2), c), 255, np.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, cols)
        out[r * (h + 2) + 1:r * (h + 2) + 1 + h, k * (w + 2) + 1:k * (w + 2) + 1 + w] = img
    return out
