"""One Ray Train launcher for the diffusion and the classifier stages.

A *job* is one model to train (a diffusion method, a classifier arm): its loop config and a
function that builds its data stream at a given start epoch. `run_jobs` trains a list of jobs
inside **one** `TorchTrainer` run, in sequence on the same worker group, so a run with many
short fits (classifier arms, fine-tunes) pays the worker-group start-up, the imports and the
dataset planning once instead of per fit. Each job has its own stream (one Ray Dataset per job,
keyed by the job's name), its own checkpoints (progress.json names the job) and writes its own
outputs from rank 0 when it ends, so resume and per-job artifacts are what a fit per job gave.

Failures: a worker error is retried up to `max_failures` times from the last checkpoint, with
the streams rebuilt at the checkpoint's epoch; an error a retry would repeat (a non-finite loss,
bad input, `DeterministicError`) stops at once with the worker's own message.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pipeline.errors import TaildiffError

log = logging.getLogger("taildiff.launcher")


class DeterministicError(RuntimeError):
    """A worker failure that a retry would repeat (bad input, non-finite loss): never retried."""


class NonFiniteLossError(DeterministicError):
    """The running loss stopped being finite."""


# error types whose retry would fail the same way
DETERMINISTIC = ("DeterministicError", "NonFiniteLossError", "TaildiffError", "ConfigError", "DataError",
                 "UnpicklingError", "FileNotFoundError", "IsADirectoryError", "NotADirectoryError", "PermissionError",
                 "ValueError", "KeyError", "TypeError", "AttributeError", "ImportError", "ModuleNotFoundError",
                 "OSError: [Errno 28]", "No space left on device")


# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (Ray's default 2 s),
# so a fit's end is noticed up to that late. Against a fit's ~19 s fixed cost on a 2-core machine the
# saving was not measurable (benchmarks/bench_fit_overhead.py --poll 2: 2.08 s [-3.80, +7.96] per fit);
# kept as a known wait removed. A poll is one small task per worker; a hanging one is an error only
# after 10 minutes (RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S), so polling more often is safe. A value
# the user sets wins. Ray Train passes the variable from the process calling fit() (the driver, or a
# Tune trial's process) to its controller, hence set here, where every fit starts.
TRAIN_POLL_ENV, TRAIN_POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"


MAX_JOBS_PER_FIT = 6  # a run's jobs go into fits of at most this many: each job's dataset has its own
#                       streaming-split coordinator process, so one fit of dozens would start dozens at once


def chunked(items: list, size: int) -> list[list]:
    """Consecutive chunks of a fixed list: the same chunks (and Ray run names) on every rerun."""
    return [items[i:i + size] for i in range(0, len(items), size)]


@dataclass(frozen=True)
class Scaling:
    num_workers: int
    use_gpu: bool
    cpus_per_worker: float


@dataclass
class Job:
    """One model to train. `stream(start_epoch)` builds its Ray Dataset; `config` goes to the loop."""

    name: str
    config: dict
    stream: Callable[[int], Any]


def latest_progress(run_path: Path | str, fs=None) -> dict | None:
    """progress.json of the checkpoint Ray Train will resume from, if any (read by the driver);
    `fs`: the pyarrow filesystem `run_path` lives on (shared storage), else the local disk."""
    def read(path: str) -> str:
        if fs is None:
            return Path(path).read_text()
        with fs.open_input_stream(path) as f:
            return f.read().decode()

    try:
        state = json.loads(read(f"{run_path}/checkpoint_manager_snapshot.json"))
        name = state["latest_checkpoint_result"]["checkpoint_dir_name"]
        return json.loads(read(f"{run_path}/{name}/progress.json"))
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        return None


# ---------------------------------------------------------------------------------------------
# Worker side


def _import(path: str) -> Callable:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def checkpoint_progress(checkpoint) -> dict | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return json.loads((Path(folder) / "progress.json").read_text())


def jobs_worker(config: dict) -> dict:
    """The TorchTrainer function: run each job's loop in turn on this worker group. The loop is
    `loop(job_config, shard, checkpoint_or_None) -> value`; it gets the run's latest checkpoint
    only when that checkpoint is its own (progress.json's "job")."""
    import ray.train

    loop = _import(config["loop"])
    checkpoint = ray.train.get_checkpoint()
    progress = checkpoint_progress(checkpoint)
    owner = progress.get("job") if progress else None
    out = {}
    for job in config["jobs"]:
        shard = ray.train.get_dataset_shard(job["name"])
        out[job["name"]] = loop(job["config"], shard, checkpoint if owner == job["name"] else None)
    return out


def report_checkpoint(job: str, files: dict[str, Callable[[Path], None]], progress: dict, metrics: dict,
                      rank: int) -> None:
    """ray.train.report with a checkpoint on rank 0 (other ranks report metrics only). `files`:
    name -> writer(path) for the checkpoint folder; progress.json (with the job's name) is added."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for name, write in files.items():
            write(Path(tmp) / name)
        (Path(tmp) / "progress.json").write_text(json.dumps({**progress, "job": job}))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


# ---------------------------------------------------------------------------------------------
# Driver side


def fit_keeping_sigint(trainer):
    """trainer.fit() with Ctrl-C kept as KeyboardInterrupt. On the main thread Ray Train installs
    its own SIGINT handler for the fit: the first Ctrl-C aborts the run gracefully (its checkpoints
    are kept) and then calls sys.exit, which ended the job with exit code 1 and no word of how to
    continue. Here that exit becomes KeyboardInterrupt (run.py: one line, exit 130), and the
    handler that was in place before the fit is put back."""
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGINT) if main else None
    try:
        return trainer.fit()
    except SystemExit:  # only Ray's SIGINT handler exits from inside fit()
        raise KeyboardInterrupt from None
    finally:
        if main and before is not None:
            signal.signal(signal.SIGINT, before)


def worker_error_line(exc: BaseException) -> str:
    """The worker's own exception, type and message (not Ray's wrapper's last line)."""
    failures = getattr(exc, "worker_failures", None) or {}
    for failure in failures.values():
        cause = getattr(failure, "cause", None) or failure
        text = f"{type(cause).__name__}: {cause}".strip()
        if type(cause).__name__ in ("RayTaskError", "RayActorError") or not str(cause).strip():
            text = str(failure)
        return _last_exception_line(text)
    return _last_exception_line(str(exc))


def _last_exception_line(text: str) -> str:
    """The last 'SomeError: message' line of a traceback text (or its last line)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head and (head.endswith("Error") or head.endswith("Exception")) and " " not in head.split(".")[-1]:
            return line[:500]
    return (lines[-1] if lines else "unknown error")[:500]


def is_deterministic(exc: BaseException) -> bool:
    text = worker_error_line(exc) + "\n" + str(exc)
    return any(name in text for name in DETERMINISTIC)


def _checkpoint_note(run_path: Path | str, fs=None) -> str:
    progress = latest_progress(run_path, fs)
    if progress is None:
        return f"no checkpoint was written (Ray logs: {run_path})"
    where = f"step {progress['step']}" if "step" in progress else f"epoch {progress.get('epoch')}"
    return f"the last good checkpoint ({progress.get('job')}, {where}) is kept in {run_path}"


def run_jobs(loop: str, jobs: list[Job], *, name: str, storage: Path, scaling: Scaling, keep: int = 1,
             max_failures: int = 1, callbacks: list | None = None, what: str = "training",
             pending: Callable[[list[Job]], list[Job]] | None = None, shared=None,
             output_dir: Path | str | None = None) -> dict:
    """Train `jobs` in one TorchTrainer run `storage/name` (resuming its latest checkpoint).
    `pending(jobs)` re-filters the jobs before a retry (those that finished meanwhile drop out).
    `shared` (a pipeline.common.storage.Storage): checkpoints go to the place of `storage`
    (relative to `output_dir`) inside shared storage instead of the local disk.
    Returns {job name: the loop's return value on rank 0} of the last attempt."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.common.storage import ray_storage

    os.environ.setdefault(TRAIN_POLL_ENV, TRAIN_POLL_S)
    storage_path, fs = ray_storage(shared, output_dir, storage) if shared else (str(storage), None)
    run_path = f"{storage_path}/{name}"
    jobs = list(jobs)
    for attempt in range(max_failures + 1):
        if not jobs:
            return {}
        progress = latest_progress(run_path, fs)
        start = {progress["job"]: progress.get("epoch", 0)} if progress and "job" in progress else {}
        if progress and progress.get("job") in {j.name for j in jobs}:
            where = f"step {progress['step']}" if "step" in progress else f"epoch {progress.get('epoch')}"
            log.info("%s: resuming from %s (%s)", what, where, progress["job"])
        datasets = {job.name: job.stream(start.get(job.name, 0)) for job in jobs}
        ingest = ray.train.DataConfig.default_ingest_options()
        ingest.preserve_order = True  # the plan's order: reproducible batches, exact mid-epoch resume
        trainer = TorchTrainer(
            jobs_worker,
            train_loop_config={"loop": loop, "jobs": [{"name": j.name, "config": j.config} for j in jobs]},
            scaling_config=ray.train.ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                                   resources_per_worker={"CPU": scaling.cpus_per_worker}),
            run_config=ray.train.RunConfig(
                name=name, storage_path=storage_path, storage_filesystem=fs,
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep),
                failure_config=ray.train.FailureConfig(max_failures=0), callbacks=callbacks),
            datasets=datasets,
            dataset_config=ray.train.DataConfig(datasets_to_split="all", execution_options=ingest),
        )
        try:
            result = fit_keeping_sigint(trainer)
            error = result.error
        except ray.train.TrainingFailedError as exc:
            result, error = None, exc
        if error is None:
            return dict(result.return_value or {})
        line = worker_error_line(error)
        if is_deterministic(error) or attempt == max_failures:
            raise TaildiffError(f"{what} failed: {line}; {_checkpoint_note(run_path, fs)}")
        log.warning("%s: attempt %d failed (%s); resuming from the last checkpoint", what, attempt + 1, line)
        jobs = pending(jobs) if pending else jobs
    return {}
