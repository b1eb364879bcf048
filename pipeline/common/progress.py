"""Progress a person can follow: one live line per job on the driver's terminal.

Workers (Ray Train loops, sampling actors) report `(done, total)` to a small named actor, the
`ProgressBoard` (no CPU); a thread on the driver polls it twice a second and draws one tqdm
line per job with its count, rate and ETA. In CI (`CI` set) or without a TTY the same thread
writes a plain log line per job every `every_percent` percent instead, so logs stay short.

    with stage_progress("train") as board:      # driver
        ...                                     # workers: report_progress("train/ddpm", 120, 2000, "step")
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time

log = logging.getLogger("taildiff.progress")
BOARD_NAME = "taildiff-progress"
_reporters: dict = {}


class ProgressBoard:
    """Latest (done, total, unit, started, updated) per job key. Created as a Ray actor."""

    def __init__(self):
        self.state: dict[str, tuple] = {}

    def update(self, key: str, done: int, total: int, unit: str) -> None:
        """The first report of a key starts its clock (workers report (start, total) when a job begins)."""
        now = time.time()
        first = self.state.get(key)
        started, base = (first[3], first[5]) if first else (now, int(done))
        self.state[key] = (int(done), int(total), unit, started, now, base)

    def snapshot(self) -> dict:
        return dict(self.state)

    def clear(self) -> None:
        self.state = {}


def live_terminal() -> bool:
    """tqdm lines only on an interactive terminal outside CI."""
    return sys.stderr.isatty() and not os.environ.get("CI")


def _board():
    import ray

    try:
        return ray.get_actor(BOARD_NAME, namespace="taildiff")
    except ValueError:
        return None


def report_progress(key: str, done: int, total: int, unit: str, min_interval: float = 0.5) -> None:
    """Worker side: send (done, total) to the board, at most every `min_interval` s (and the end)."""
    now = time.monotonic()
    last = _reporters.get(key)
    if last is not None and now - last < min_interval and done < total:
        return
    _reporters[key] = now
    board = _board()
    if board is not None:
        board.update.remote(key, done, total, unit)


class _Renderer:
    """Draws the board: tqdm bars (terminal) or log lines every N % (CI / no TTY)."""

    def __init__(self, live: bool, every_percent: int):
        self.live, self.every = live, every_percent
        self.bars: dict = {}
        self.logged: dict[str, int] = {}

    def draw(self, state: dict) -> None:
        for key in sorted(state):
            done, total, unit, started, updated, *rest = state[key]
            base = rest[0] if rest else 0  # done at the first report: a resumed job's rate counts from there
            if self.live:
                self._bar(key, done, total, unit, started)
            else:
                self._line(key, done, total, unit, started, updated, base)

    def _bar(self, key, done, total, unit, started):
        from tqdm import tqdm

        bar = self.bars.get(key)
        if bar is None:
            bar = self.bars[key] = tqdm(total=total, desc=key, unit=unit, position=len(self.bars), leave=True,
                                        dynamic_ncols=True, file=sys.stderr)
            bar.start_t = started
        if total != bar.total:
            bar.total = total
        bar.n = done
        bar.refresh()

    def _line(self, key, done, total, unit, started, updated, base=0):
        percent = int(100 * done / total) if total else 100
        mark = percent // self.every * self.every
        if self.logged.get(key, -1) >= mark:
            return
        self.logged[key] = mark
        elapsed = updated - started
        rate = (done - base) / elapsed if elapsed > 0 else float("nan")
        eta = (total - done) / rate if rate > 0 else float("nan")
        log.info("%s: %d/%d %s (%d%%), %s %s/s, ETA %s", key, done, total, unit, percent,
                 "?" if rate != rate else f"{rate:.2f}", unit, _fmt_eta(eta))

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def _fmt_eta(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "?"
    m, s = divmod(int(seconds), 60)
    return f"{m}:{s:02d}"


@contextlib.contextmanager
def stage_progress(stage: str, every_percent: int = 10, interval: float = 0.5, live: bool | None = None):
    """Driver side: the board actor for the duration of a stage, drawn by a polling thread."""
    import ray

    board = ray.remote(num_cpus=0)(ProgressBoard).options(name=BOARD_NAME, namespace="taildiff",
                                                           get_if_exists=True).remote()
    renderer = _Renderer(live_terminal() if live is None else live, every_percent)
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            try:
                renderer.draw(ray.get(board.snapshot.remote(), timeout=5))
            except Exception:  # a slow poll never stops the stage
                pass
            stop.wait(interval)

    thread = threading.Thread(target=poll, name=f"progress-{stage}", daemon=True)
    thread.start()
    try:
        yield board
    finally:
        stop.set()
        thread.join(timeout=5)
        with contextlib.suppress(Exception):
            renderer.draw(ray.get(board.snapshot.remote(), timeout=5))
            ray.get(board.clear.remote(), timeout=5)
        renderer.close()


class LocalProgress:
    """The same lines for work the driver does itself (sampling batches it collects, evaluation)."""

    def __init__(self, key: str, total: int, unit: str, every_percent: int = 10, live: bool | None = None):
        self.key, self.total, self.unit, self.done = key, total, unit, 0
        self.started = time.time()
        self.renderer = _Renderer(live_terminal() if live is None else live, every_percent)

    def update(self, n: int) -> None:
        self.done += n
        self.renderer.draw({self.key: (self.done, self.total, self.unit, self.started, time.time())})

    def close(self) -> None:
        self.renderer.close()
