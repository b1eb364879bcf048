"""`ray job submit --working-dir . -- python pipeline/run.py ...` against a local `ray start --head`.

The head runs as `ray start --head --block` in its own process group with its own ports, and is
stopped by signalling that process (never `ray stop`, which would stop every Ray instance on the
machine, the test session's included).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO

TINY = ["model.image_size=8", "train.steps=3", "train.batch_size=16", "train.log_every=3", "train.checkpoint_every=3",
        "train.bf16=false", "sample.steps=3", "sample.per_class=2", "sample.batch_size=20", "sample.bf16=false",
        "tracking.grid_per_class=0", "stages=[data,train,report]"]  # the job-submit wiring, Ray Train under it; the CLI test runs every stage


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli() -> str:
    exe = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    if not Path(exe).exists():
        pytest.skip("the ray CLI is not installed")
    return exe


@pytest.fixture
def auth_env():
    """Ray 2.60 turns token authentication on for a new local cluster, but the job CLI only sends
    a token with RAY_AUTH_MODE=token: give head and client the same fresh token explicitly."""
    return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


@pytest.fixture
def head_node(tmp_path, auth_env):
    """A separate local Ray cluster with a dashboard (the job server); yields its job API address."""
    dashboard = free_port()
    # its own temp dir (short: it holds Unix sockets), so the `ray_current_cluster` file it writes
    # cannot make a later plain `ray.init()` on this machine try to join it
    temp_dir = tempfile.mkdtemp(prefix="tdray", dir="/tmp")
    cmd = [ray_cli(), "start", "--head", "--block", "--num-cpus=2", f"--port={free_port()}", f"--temp-dir={temp_dir}",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
           f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
           f"--metrics-export-port={free_port()}", f"--ray-client-server-port={free_port()}",
           f"--runtime-env-agent-port={free_port()}", "--disable-usage-stats"]
    log = (tmp_path / "head.log").open("w")
    head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=auth_env)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{address}/api/version", timeout=2):
                    break
            except urllib.error.HTTPError:  # the server answers (401 under Ray's token auth): it is up
                break
            except OSError:
                pass
            if head.poll() is not None or time.time() > deadline:
                pytest.fail(f"the head node did not come up: {(tmp_path / 'head.log').read_text()[-2000:]}")
            time.sleep(1)
        yield address
    finally:
        # the whole disposable cluster at once (its own session and temp dir): a graceful SIGTERM
        # shutdown of `ray start --block` took 30 s of the suite
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=60)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_the_main_job(head_node, auth_env, tmp_path):
    out = tmp_path / "out"
    sets = [arg for item in [f"output_dir={out}", *TINY] for arg in ("--set", item)]
    env = {**auth_env, "RAY_ADDRESS": head_node}
    res = subprocess.run([ray_cli(), "job", "submit", "--working-dir", ".", "--", "python", "pipeline/run.py",
                          "--config", "configs/digits_lt.yaml", *sets],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert "succeeded" in res.stdout.lower(), res.stdout[-2000:]
    run_dir = out / "runs" / "digits_lt"
    stages = json.loads((run_dir / "stages.json").read_text())
    assert stages["models"]["ddpm"]["step"] == 3
    assert (run_dir / "report.md").is_file()
