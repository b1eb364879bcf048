"""Faults a user's run meets, through the CLI as a user runs it: the driver killed during training
(SIGKILL: no clean-up at all) and a Ctrl-C during the data stage. Each test prints the steps redone
and the wall time (the fault table of the closing note)."""
import json
import os
import signal
import subprocess
import sys
import time

from conftest import REPO

CLI = [sys.executable, str(REPO / "pipeline" / "run.py"), "--config", "configs/digits_lt.yaml"]


def _start(*args):
    return subprocess.Popen([*CLI, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: the Ray it started dies with it


def _wait_for(predicate, proc, timeout=240):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the run ended (rc {proc.returncode}) before the fault point:\n{err[-3000:]}")
        time.sleep(0.1)
    raise AssertionError("the fault point was not reached")


def _checkpoint_steps(run_dir):
    steps = []
    for path in (run_dir / "train" / "ray").glob("*/checkpoint_*/progress.json"):
        try:
            steps.append(json.loads(path.read_text())["step"])
        except (OSError, ValueError, KeyError):
            pass  # being written
    return steps


def test_driver_killed_during_training_resumes_from_its_last_checkpoint(tmp_path):
    args = ["--set", f"output_dir={tmp_path}", "--stages", "data,train", "--set", "train.steps=80",
            "--set", "train.checkpoint_every=20", "--set", "train.log_every=5"]
    run_dir = tmp_path / "runs" / "digits_lt"
    started = time.perf_counter()
    proc = _start(*args)
    _wait_for(lambda: any(s >= 20 for s in _checkpoint_steps(run_dir)), proc)
    time.sleep(1.0)  # let it train past the checkpoint, so there are steps to redo
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = max(_checkpoint_steps(run_dir))
    logged = [int(line.split(",")[0]) for path in (run_dir / "train").glob(".work/ddpm-*/loss.csv")
              for line in path.read_text().splitlines()[1:] if line]
    killed_at = max(logged, default=kept)

    rerun = subprocess.run([*CLI, *args], cwd=REPO, capture_output=True, text=True, timeout=400)
    seconds = time.perf_counter() - started
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    log = rerun.stdout + rerun.stderr
    assert "data: reusing" in log, log[-2000:]  # the data stage is skipped
    assert f"resuming from step {kept}" in log, log[-3000:]
    stages = json.loads((run_dir / "stages.json").read_text())
    assert stages["data_reused"] and stages["models"]["ddpm"]["step"] == 80
    redone = max(0, killed_at - kept)
    assert redone <= 20  # at most one checkpoint interval
    loss = (run_dir / "train" / "ddpm" / "loss.csv").read_text().splitlines()[1:]
    loss_steps = [int(line.split(",")[0]) for line in loss if line]
    assert loss_steps == sorted(set(loss_steps)) and loss_steps[-1] == 80  # no interleaved or repeated rows
    print(f"fault: SIGKILL of the driver at step ~{killed_at} (checkpoint {kept}) -> rerun resumed, "
          f"steps redone {redone}, wall {seconds:.1f} s (both runs)")


def test_ctrl_c_during_the_data_stage_leaves_nothing_half_written(tmp_path):
    args = ["--set", f"output_dir={tmp_path}", "--stages", "data"]
    datasets = tmp_path / "datasets"
    started = time.perf_counter()
    proc = _start(*args)
    _wait_for(lambda: datasets.is_dir() and any(p.name.startswith(".tmp-") for p in datasets.iterdir()), proc)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    seconds = time.perf_counter() - started
    assert proc.returncode != 0
    assert not [p for p in datasets.iterdir() if not p.name.startswith(".")], list(datasets.iterdir())
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert proc.returncode == 130 and last.startswith("interrupted:"), err[-2000:]
    rerun = subprocess.run([*CLI, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert not [p for p in datasets.iterdir() if p.name.startswith(".tmp-")]  # the killed build's temp is gone
    print(f"fault: SIGINT during the data stage -> rc 130, no dataset folder published, rerun builds it; "
          f"{seconds:.1f} s to the interrupt's exit")


def test_worker_node_lost_during_training_on_a_simulated_cluster(tmp_path):
    """ray.cluster_utils.Cluster (head + two worker nodes): the node running the Ray Train worker is
    killed after the first checkpoint; the run finishes on the surviving node from that checkpoint."""
    res = subprocess.run([sys.executable, str(REPO / "tests" / "fault_cluster.py"), str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=500)
    assert res.returncode == 0, res.stderr[-3000:]
    row = json.loads(res.stdout.strip().splitlines()[-1])
    assert row["killed"] and row["final_step"] == row["steps"], row
    assert row["steps_redone"] <= row["checkpoint_every"] and row["loss_steps_unique"], row
    assert row["nodes_left"] == 2, row  # the head and the surviving worker
    print("fault:", row)
