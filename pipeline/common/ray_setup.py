"""Starting or joining Ray, and keeping its console output to what applies to the user's run."""
from __future__ import annotations

import logging
import os

EXPECTED_WARNINGS = (
    # Ray Data warns whenever no CPU is free when a dataset executes; in this pipeline that is
    # every healthy run: the Train workers (or sampling actors) hold their CPUs while the
    # stream's read/resample tasks run on the CPU left to them (the presets leave one).
    "does not have any available CPUs",
)


class _DropExpected(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in EXPECTED_WARNINGS)


def quiet_ray_logs() -> None:
    """Drop the warnings that do not apply to a healthy run (see EXPECTED_WARNINGS), and Ray's own
    deprecation notice for `ExecutionOptions.exclude_resources`, which Ray Train's DataConfig sets
    itself (no user setting can avoid it)."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*exclude_resources.* is deprecated")
    for name in ("ray.data", "ray.data.dataset", "ray.data._internal.execution.streaming_executor"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropExpected) for f in logger.filters):
            logger.addFilter(_DropExpected())


STARTUP_TIMEOUT = "timed out during startup"

# Ray Train's preemption watcher (one more actor process per fit, importing ray.train: about 2.7
# CPU-seconds on a 2-core machine, spent beside the training, not in the fit's start-up:
# bench_fit_overhead.py --preemption-watcher found no wall-time difference) polls the nodes that host the workers
# for a drain notice from the autoscaler. A local instance is one node with no autoscaler, so it
# never gets one; a cluster joined through RAY_ADDRESS keeps Ray's default (on).
LOCAL_RAY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def start_local_ray(attempts: int = 3, **options) -> None:
    """ray.init(address="local") that survives a busy machine: Ray gives its raylet a fixed 30 s
    to register (ray/_private/node.py) and, on 2 cores shared with other work, it sometimes needs
    longer; the start is retried from scratch (the half-started node is shut down first)."""
    import ray

    log = logging.getLogger("taildiff.ray")
    for name, value in LOCAL_RAY_ENV.items():  # before the node starts: its processes inherit them
        os.environ.setdefault(name, value)
    for attempt in range(1, attempts + 1):
        try:
            ray.init(**{"address": "local", "log_to_driver": False, **options})
            return
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception for this
            if STARTUP_TIMEOUT not in str(exc) or attempt == attempts:
                raise
            log.warning("Ray's node did not start within Ray's 30 s (a busy machine); starting it again "
                        "(attempt %d of %d)", attempt + 1, attempts)
            ray.shutdown()


def init_ray(**local_options) -> None:
    """Join the cluster of RAY_ADDRESS (also set inside `ray job submit`), else start a local Ray
    (never a stray `ray start` cluster) with `local_options` for ray.init."""
    import ray

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address="auto", log_to_driver=False)
        else:
            start_local_ray(**local_options)
    # Stage progress is drawn by pipeline/common/progress.py; Ray Data's own bars are not.
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    quiet_ray_logs()
