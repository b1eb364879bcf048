"""The study's wall time over its invocations (`<run_dir>/study_timings.json`): what a resumed or
killed study spent, phase by phase."""
from __future__ import annotations

import datetime as _dt
import json
import threading
import time
from pathlib import Path

from pipeline.common.files import write_json


class InvocationClock:
    """The study's wall time summed over its invocations: `<run_dir>/study_timings.json` holds one entry per
    invocation, rewritten (temp file, then rename) after every phase and, in between, every `heartbeat_s`
    seconds with the time spent in the phase under way (`running`). An invocation that is killed mid-phase
    (a session's end, SIGKILL, a lost driver) so keeps all but the last heartbeat's worth of what it spent:
    its unfinished phase counts as `interrupted` (that phase's finished pieces are reused by the next
    invocation, which times only the rest), and a resumed study reports the whole cost, not its last part."""

    def __init__(self, run_dir: Path, heartbeat_s: float | None = 30.0, now=time.perf_counter,
                 where: dict | None = None):
        """`where`: {'commit', 'machine'} of this invocation (default: this checkout's HEAD and this machine),
        kept in its entry: a study resumed on another machine or at another commit says so."""
        self.path = Path(run_dir) / "study_timings.json"
        self.record = json.loads(self.path.read_text()) if self.path.exists() else {"invocations": []}
        if where is None:
            from pipeline.common.machine import git_commit, machine

            where = {"commit": git_commit(), "machine": machine()}
        self.entry = {"started": _dt.datetime.now().isoformat(timespec="seconds"), **where, "seconds_by_phase": {}}
        self.record["invocations"].append(self.entry)
        self._now = now
        self._mark = now()  # the end of the previous phase
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        if heartbeat_s:
            self._thread = threading.Thread(target=self._beat_every, args=(heartbeat_s,), daemon=True,
                                            name="study-clock")
            self._thread.start()

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, self.record)

    def _beat_every(self, period: float) -> None:
        while not self._stop.wait(period):
            self.beat()

    def beat(self) -> None:
        """Record the seconds of the phase under way (what a kill before its lap would otherwise lose)."""
        with self._lock:
            self.entry["running"] = round(self._now() - self._mark, 1)
            self._write()

    def lap(self, phase: str, seconds: float | None = None) -> float:
        """End `phase`: `seconds` (default: since the previous lap or the clock's start) are added to it.
        `phase` is one of PHASES: an interrupted invocation's unfinished phase is found by their order."""
        if phase not in PHASES:
            raise ValueError(f"unknown study phase {phase!r}: one of {', '.join(PHASES)}")
        with self._lock:
            now = self._now()
            seconds = now - self._mark if seconds is None else float(seconds)
            self._mark = now
            phases = self.entry["seconds_by_phase"]
            phases[phase] = round(phases.get(phase, 0.0) + seconds, 1)
            self.entry.pop("running", None)
            self.entry["seconds"] = round(sum(phases.values()), 1)
            self._write()
        return seconds

    def close(self, interrupted: bool = False) -> None:
        """Stop the heartbeat. After the last lap nothing is under way (`running` is dropped); an
        `interrupted` invocation (an exception, Ctrl-C) records the seconds of its unfinished phase."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if interrupted:
            self.beat()
            return
        with self._lock:
            if self.entry.pop("running", None) is not None:
                self._write()

    def totals(self) -> dict:
        """The summed phases, and `runs`: per invocation its start, commit, machine, seconds (an earlier one
        killed mid-phase with its unfinished phase's seconds included) and that phase (`killed_in`)."""
        by_phase: dict[str, float] = {}
        runs = []
        for inv in self.record["invocations"]:
            phases = dict(inv.get("seconds_by_phase", {}))
            run = {"started": inv.get("started"), "commit": inv.get("commit"), "machine": inv.get("machine")}
            if inv is not self.entry and inv.get("running") is not None:  # an earlier invocation killed mid-phase
                phases["interrupted"] = phases.get("interrupted", 0.0) + inv["running"]
                run["killed_in"] = _next_phase(inv.get("seconds_by_phase", {}))
            run["seconds"] = round(sum(phases.values()), 1)
            runs.append(run)
            for k, v in phases.items():
                by_phase[k] = round(by_phase.get(k, 0.0) + v, 1)
        return {"seconds": round(sum(by_phase.values()), 1), "seconds_by_phase": by_phase,
                "invocations": len(self.record["invocations"]), "runs": runs}


PHASES = ("train", "train_equal_compute", "omega_sweep", "sample_evaluate", "classify")


def _next_phase(done: dict) -> str | None:
    """The phase an invocation killed after finishing `done` was in: the first of the study's order not done."""
    return next((p for p in PHASES if p not in done), None)
