"""A worker node lost during diffusion training, on a simulated multi-node cluster
(`ray.cluster_utils.Cluster`: a head and two worker nodes on this machine). Run by
tests/test_faults.py in its own process (the test session's Ray cannot also be a Cluster).

    python tests/fault_cluster.py <out_dir>      prints one JSON line: the fault-table row

The DDPM (digits preset, tiny) trains on one Ray Train worker; after its first checkpoint the node
that hosts that worker is removed (not gracefully: the raylet is killed). The launcher's retry
starts a fresh worker group on the surviving node, which resumes from the last checkpoint.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _train_worker_raylets() -> set[int]:
    """The parent pids (raylets) of the live Ray Train worker processes, from /proc (no dashboard,
    no psutil): a worker process is titled `ray::RayTrainWorker...` and started by its node's raylet."""
    parents = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                stat = (proc / "stat").read_text()
                parents.add(int(stat.rsplit(")", 1)[1].split()[1]))
        except (OSError, ValueError, IndexError):
            continue
    return parents


def main(out_dir: str) -> int:
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.config import load_config
    from pipeline.stages.s1_data import run_data
    from pipeline.stages.s2_train import run_train

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    steps, every = 40, 10
    cfg = load_config(REPO / "configs" / "digits_lt.yaml", [
        f"output_dir={out_dir}", f"train.steps={steps}", f"train.checkpoint_every={every}", "train.log_every=5",
        "train.max_failures=1", "train.cpus_per_worker=1", "train.num_workers=1", "model.preset=small",
        "train.batch_size=32"])
    data = run_data(cfg)
    storage = cfg.run_dir / "train" / "ray"
    fault: dict = {}

    def kill_after_first_checkpoint():
        while not fault.get("stop"):
            done = [json.loads(p.read_text())["step"] for p in storage.glob("*/checkpoint_*/progress.json")]
            if done:
                hosts = _train_worker_raylets()
                victim = next((n for n in workers if n.all_processes["raylet"][0].process.pid in hosts), None)
                if victim is None:
                    time.sleep(0.1)
                    continue
                logs = sorted(storage.parent.glob(".work/ddpm-*/loss.csv"))
                fault["checkpoint"] = max(done)
                fault["logged_before_kill"] = max(
                    [int(x.split(",")[0]) for x in logs[0].read_text().splitlines()[1:] if x] if logs else [0])
                cluster.remove_node(victim, allow_graceful=False)
                fault["killed_at"] = time.perf_counter()
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    started = time.perf_counter()
    killer.start()
    art = run_train(cfg, data)["ddpm"]
    seconds = time.perf_counter() - started
    fault["stop"] = True
    loss = [int(x.split(",")[0]) for x in (art.path / "loss.csv").read_text().splitlines()[1:] if x]
    row = {"case": "worker node lost during diffusion training", "killed": "killed_at" in fault,
           "checkpoint": fault.get("checkpoint"), "logged_before_kill": fault.get("logged_before_kill"),
           "final_step": art.metrics["step"], "steps": steps, "checkpoint_every": every,
           "steps_redone": max(0, (fault.get("logged_before_kill") or 0) - (fault.get("checkpoint") or 0)),
           "loss_steps_unique": loss == sorted(set(loss)), "nodes_left": len([n for n in ray.nodes() if n["Alive"]]),
           "wall_s": round(seconds, 1)}
    print(json.dumps(row))
    ray.shutdown()
    cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
