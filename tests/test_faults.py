"""A worker node lost during diffusion training, on a simulated multi-node cluster
(tests/fault_cluster.py in its own process). The driver-side faults (SIGKILL during training,
Ctrl-C during the data stage) are in tests/test_cli.py's main-job test, which they share runs with."""
import json
import subprocess
import sys

from conftest import REPO


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
