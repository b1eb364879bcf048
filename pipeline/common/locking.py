"""One run per run folder at a time: an exclusive lock on `<run_dir>/.lock` for the whole run.

Two runs into one output folder would train the same Ray run and interleave its files; the
second one now stops at once with one line naming the holder and the fix. The lock is an
fcntl (flock) lock, released by the kernel when the holding process ends, however it ends.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path

from pipeline.errors import TaildiffError


@contextlib.contextmanager
def run_lock(run_dir: Path):
    path = Path(run_dir) / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        try:
            holder = json.loads(handle.read() or "{}")
        except json.JSONDecodeError:
            holder = {}
        handle.close()
        raise TaildiffError(f"another taildiff run (pid {holder.get('pid', '?')}, started {holder.get('started', '?')}) "
                            f"is using {run_dir}: wait for it to finish, or give this run its own folder with "
                            "--set name=<other> (or output_dir=...)") from None
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}))
    handle.flush()
    try:
        yield path
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
