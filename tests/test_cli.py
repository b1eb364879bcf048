"""`python pipeline/run.py` as a user runs it: dry run, a real run, a rerun, and bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO
from pipeline.common.launcher import latest_progress
from pipeline.config import STAGES



def start_cli(*args):
    """The CLI in its own process group, with Ctrl-C delivered as a terminal would. A test session that
    ignores SIGINT (pytest started as a background job of a non-interactive shell) passes SIG_IGN on
    across exec, and Python then installs no KeyboardInterrupt handler: every Ctrl-C below would be
    lost (the run ends 0). Python's own handler in the parent becomes SIG_DFL in the child."""
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen([sys.executable, str(REPO / "pipeline" / "run.py"), *args], cwd=REPO, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def wait_for(predicate, proc, timeout=240):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before the fault point:\n"
                                 f"{proc.communicate()[1][-3000:]}")
        time.sleep(0.05)
    raise AssertionError("the fault point was not reached")


def checkpoint_steps(run_dir):
    """Steps of the checkpoints Ray Train has committed (its checkpoint_manager_snapshot.json names
    them): a checkpoint folder can be on disk before it is committed, and a run killed in between
    resumes from the one before it."""
    steps = []
    for snapshot in (run_dir / "train" / "ray").glob("*/checkpoint_manager_snapshot.json"):
        progress = latest_progress(snapshot.parent)
        if progress is not None:  # None while it is being written
            steps.append(progress["step"])
    return steps


def interrupted_once(err: str) -> bool:
    """The job's own last word on a Ctrl-C: one `interrupted:` line and no traceback (Ray's C++ core
    may still log a line after it while its processes go down)."""
    return sum(ln.startswith("interrupted:") for ln in err.splitlines()) == 1 and "Traceback" not in err


def run_cli(*args, timeout=400):
    return subprocess.run([sys.executable, str(REPO / "pipeline" / "run.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_dry_run_prints_the_resolved_config_and_writes_nothing(tmp_path):
    res = run_cli("--config", "configs/digits_lt.yaml", "--set", f"output_dir={tmp_path}",
                  "--set", "data.imb_factor=0.5", "--dry-run")
    assert res.returncode == 0, res.stderr
    cfg = json.loads(res.stdout)
    assert cfg["data"]["imb_factor"] == 0.5 and cfg["data"]["dataset"] == "digits"
    assert list(tmp_path.iterdir()) == []


def test_main_job_runs_then_skips(tmp_path):
    """The main job as a user meets it: a Ctrl-C during the data stage, a Ctrl-C during training (exit
    130, one line), the rerun resuming from its checkpoint with its driver SIGKILLed after the next
    one, the rerun that resumes that (the data stage the first run built is reused), and a rerun
    that skips everything. Prints the fault-table rows (steps redone, wall time)."""
    base = ["--config", "configs/digits_lt.yaml", "--set", f"output_dir={tmp_path}"]
    run_dir, datasets = tmp_path / "runs" / "digits_lt", tmp_path / "datasets"

    started = time.perf_counter()
    proc = start_cli(*base, "--stages", "data")
    wait_for(lambda: datasets.is_dir() and any(p.name.startswith(".tmp-") for p in datasets.iterdir()), proc)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and interrupted_once(err), err[-2000:]
    assert not [p for p in datasets.iterdir() if not p.name.startswith(".")]  # nothing published half-built
    print(f"fault: SIGINT during the data stage -> rc 130, no dataset folder published "
          f"({time.perf_counter() - started:.1f} s to exit)")

    # every stage but classify (its rerun and resume are tests/test_classify_stage.py's; here it would
    # add a Ray Train fit and an augmentation set to the slowest test of the suite)
    job = [*base, "--stages", "data,train,sample,evaluate,report", "--set", "train.steps=30",
           "--set", "train.checkpoint_every=10"]
    started = time.perf_counter()
    proc = start_cli(*job)  # builds the data stage, then gets a Ctrl-C during training
    wait_for(lambda: checkpoint_steps(run_dir), proc)
    os.killpg(proc.pid, signal.SIGINT)  # Ray Train's own handler aborts the fit; the job still says how to go on
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and interrupted_once(err), err[-2000:]
    assert "label" in out  # the data stage's per-class table
    first = max(checkpoint_steps(run_dir))
    assert first < 30, first
    print(f"fault: SIGINT during training after checkpoint {first} -> rc 130, one line")
    proc = start_cli(*job)  # resumes from that checkpoint, then is killed outright after the next one
    wait_for(lambda: max(checkpoint_steps(run_dir), default=0) > first, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # no clean-up at all; its Ray goes with its process group
    proc.communicate()
    kept = max(checkpoint_steps(run_dir))
    assert not [p for p in datasets.iterdir() if p.name.startswith(".tmp-")]  # the SIGINT build's temp is gone
    written = json.loads((run_dir / "config.json").read_text())
    assert written["output_dir"] == str(tmp_path) and written["stages"] == [s for s in STAGES if s != "classify"]
    whole = run_cli(*job)
    assert whole.returncode == 0, whole.stderr[-3000:]
    log = whole.stdout + whole.stderr
    resumed = [ln for ln in log.splitlines() if "resuming from" in ln or "reusing" in ln or "had ended" in ln]
    # resumed from the checkpoint kept, or (the kill can land after rank 0 exported the finished model
    # and before the driver published it) the export is published as it is
    ended = "train[ddpm]: its run had ended" in log
    assert "data: reusing" in log and (kept == 30 or ended or f"resuming from step {kept}" in log), (kept, resumed)
    manifest = json.loads((datasets / json.loads((run_dir / "stages.json").read_text())["dataset_dir"].split("/")[-1]
                           / "manifest.json").read_text())
    assert manifest["dataset"] == "digits"
    stages = json.loads((run_dir / "stages.json").read_text())
    assert stages["data_reused"] and stages["models"]["ddpm"]["step"] == 30
    loss_steps = [int(x.split(",")[0]) for x in (run_dir / "train" / "ddpm" / "loss.csv").read_text().splitlines()[1:]]
    assert loss_steps == sorted(set(loss_steps)) and loss_steps[-1] == 30  # no repeated or interleaved rows
    print(f"fault: SIGKILL of the driver after checkpoint {kept} of 30 -> the rerun skipped the data stage and "
          + ("published the killed run's finished export (nothing retrained)" if ended else
             f"resumed from step {kept} (steps redone <= {10})") + f"; {time.perf_counter() - started:.1f} s for both runs")
    assert stages["samples"]["ddpm"]["images"] == 50
    assert (run_dir / "samples" / "ddpm" / "grid.png").is_file() and (run_dir / "train" / "ddpm" / "loss.png").is_file()
    assert (run_dir / "report.md").is_file() and (run_dir / "report.html").is_file()

    started = time.perf_counter()
    again = run_cli(*job)
    seconds = time.perf_counter() - started
    assert again.returncode == 0, again.stderr[-2000:]
    stages = json.loads((run_dir / "stages.json").read_text())
    assert stages["data_reused"] and stages["models"]["ddpm"]["reused"] and stages["samples"]["ddpm"]["reused"]
    assert stages["evaluation"]["ddpm"]["reused"]
    print(f"rerun of the whole main job with nothing changed: {seconds:.1f} s")


@pytest.mark.parametrize("args, message", [
    (["--set", "data.imb_factor=3"], "outside (0, 1]"),
    (["--set", "data.datset=digits"], "did you mean data.dataset?"),
    (["--config", "configs/nope.yaml"], "not found"),
    (["--stages", "data,dance"], "unknown stage(s) dance"),
    (["--set", "data.dataset=imagefolder", "--set", "data.data_root=/nonexistent", "--set", "data.imb_factor=null"],
     "does not exist"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    res = run_cli("--config", "configs/digits_lt.yaml", "--set", f"output_dir={tmp_path}", *args)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], res.stderr[-2000:]
    assert "Started a local Ray instance" not in res.stderr  # said before Ray starts, not 10-15 s later
