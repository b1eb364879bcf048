"""Worker nodes lost during diffusion training, a classifier arm, sampling and a Tune trial, on one simulated
multi-node cluster (tests/fault_cluster.py in its own process). The driver-side faults (SIGKILL
during training, Ctrl-C during the data stage) are in tests/test_cli.py's main-job test, which
they share runs with."""
import json
import subprocess
import sys

from conftest import REPO


def test_worker_nodes_lost_mid_stage_on_a_simulated_cluster(tmp_path):
    """ray.cluster_utils.Cluster (head + two worker nodes; a fresh node replaces each lost one):
    the node running the stage's worker is killed mid-stage and the stage finishes on the others,
    from the last checkpoint (train, classify, the Tune trial's retry) or by rerunning the lost
    batches (sample)."""
    res = subprocess.run([sys.executable, str(REPO / "tests" / "fault_cluster.py"), str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith('{"case"')]  # Ray may print to stdout too
    rows = {row["case"]: row for row in map(json.loads, lines)}
    assert len(rows) == 4, res.stdout[-3000:]
    train = rows["worker node lost during diffusion training"]
    assert train["killed"] and train["final_step"] == train["steps"], train
    assert train["steps_redone"] <= train["checkpoint_every"] and train["loss_steps_unique"], train
    assert train["nodes_left"] == 2, train  # the head and the surviving worker

    arm = rows["worker node lost during a classifier arm"]
    assert arm["killed"] and arm["final_epoch"] == arm["epochs"] and arm["history_epochs_unique"], arm
    assert arm["checkpoint_epoch"] >= 1, arm  # at most the epoch in flight was redone

    sample = rows["sampling actor's node lost"]
    assert sample["killed"] and sample["batches_before_kill"] >= 1, sample
    assert sample["each_planned_image_once"] and sample["images"] == sample["planned"], sample
    trial = rows["Tune trial's node lost"]  # the node of the trial's function (its TorchTrainer's driver)
    assert trial["killed"] and trial["attempts"] == 2 and trial["status"] == "finished", trial
    assert trial["final_step"] == trial["steps"] and trial["loss_steps_unique"], trial
    assert trial["steps_redone"] <= trial["checkpoint_every"] and trial["fid"] > 0, trial
    assert trial["placement_groups_left"] == 0, trial  # the dead run's worker group was freed
    for row in rows.values():
        print("fault:", row)
