"""TensorBoard and MLflow tracking read back with their own readers (no Ray: the logger alone;
the train stage's own event files are checked in tests/test_train_stage.py)."""
import numpy as np

from pipeline.common.tracking import RunLogger, image_grid


def test_tensorboard_and_mlflow_file_store(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    import mlflow

    uri = (tmp_path / "mlruns").as_uri()  # a local file store: offline
    log = RunLogger(tmp_path / "run", "ddpm", True, uri, params={"method": "ddpm"})
    for step in (10, 20):
        log.scalars(step, {"loss": 1.0 / step, "lr": 1e-3, "skip": float("nan"), "flag": True}, prefix="train/")
    log.image("samples/ema", 20, image_grid(np.zeros((6, 4, 4, 1), np.uint8), rows=3))
    log.close()
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard" / "ddpm")).Reload()
    assert [round(e.value, 4) for e in events.Scalars("train/loss")] == [0.1, 0.05]
    assert "train/skip" not in events.Tags()["scalars"] and "samples/ema" in events.Tags()["images"]
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    run = client.search_runs([client.get_experiment_by_name("run").experiment_id])[0]
    assert run.data.params["method"] == "ddpm"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "train_loss")] == [0.1, 0.05]


def test_disabled_logger_writes_nothing(tmp_path):
    log = RunLogger(tmp_path, "x", enabled=False)
    log.scalars(1, {"loss": 1.0})
    log.close()
    assert not (tmp_path / "tensorboard").exists()
    grid = image_grid(np.ones((5, 2, 3, 1), np.uint8), rows=2)
    assert grid.shape == (2 * 4, 3 * 5, 1)
