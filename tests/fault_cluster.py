"""Worker nodes lost mid-stage, on a simulated multi-node cluster (`ray.cluster_utils.Cluster`:
a head and two worker nodes on this machine). Run by tests/test_faults.py in its own process (the
test session's Ray cannot also be a Cluster).

    python tests/fault_cluster.py <out_dir>      prints one JSON line per case: the fault-table rows

Each case removes, not gracefully (its raylet is killed), the node that hosts the stage's worker,
then adds a fresh node so the next case again has two workers:
  train     the DDPM (digits preset, tiny) on one Ray Train worker, killed after its first
            checkpoint: the launcher's retry resumes on the surviving node from that checkpoint.
  classify  a ResNet-32 arm, killed after its first epoch's checkpoint: the same, per epoch.
  sample    the sampling actor of the evaluation set, killed after the first batch arrived: Ray
            Data restarts the actor elsewhere and reruns its unfinished batches; every planned
            image (class, index, seed) is in the output exactly once.
  tune      a one-trial training sweep, killed at the node hosting the trial's function (its
            TorchTrainer's driver) after the trial's first checkpoint: Tune retries the trial
            (train.max_failures), whose run resumes from that checkpoint; no placement group is
            left behind.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _worker_raylets(title: bytes = b"ray::RayTrainWorker") -> set[int]:
    """The parent pids (raylets) of the live worker processes whose title starts with `title`, from
    /proc (no dashboard, no psutil): a worker process is started by its node's raylet."""
    parents = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "cmdline").read_bytes().startswith(title):
                stat = (proc / "stat").read_text()
                parents.add(int(stat.rsplit(")", 1)[1].split()[1]))
        except (OSError, ValueError, IndexError):
            continue
    return parents


class Faults:
    """The cluster and a killer thread: `arm(ready, title)` kills the node hosting a `title` process
    once `ready()` returns a dict (merged into the case's record), then adds a replacement node."""

    def __init__(self):
        import socket

        from ray.cluster_utils import Cluster

        with socket.socket() as sock:  # the dashboard's state API frees a dead Train run's placement group
            sock.bind(("127.0.0.1", 0))
            self.dashboard_port = sock.getsockname()[1]
        # a killed node is declared dead after 5 missed health checks: 1 s apart here, not Ray's 3 s
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "include_dashboard": True, "dashboard_port": self.dashboard_port,
            "_system_config": {"health_check_period_ms": 1000}})
        self.workers = [self.cluster.add_node(num_cpus=2) for _ in range(2)]
        self.cluster.wait_for_nodes()

    def arm(self, ready, title: bytes) -> dict:
        record: dict = {}

        def kill():
            while not record.get("stop"):
                info = ready()
                if info:
                    hosts = _worker_raylets(title)
                    victim = next((n for n in self.workers if n.all_processes["raylet"][0].process.pid in hosts), None)
                    if victim is not None:
                        record.update(info)
                        self.cluster.remove_node(victim, allow_graceful=False)
                        self.workers.remove(victim)
                        record["killed_at"] = time.perf_counter()
                        return
                time.sleep(0.05)

        threading.Thread(target=kill, daemon=True).start()
        return record

    def replace(self) -> None:
        self.workers.append(self.cluster.add_node(num_cpus=2))
        self.cluster.wait_for_nodes()

    def occupy_head(self):
        """An idle actor holding the head's CPU, so that the stage's worker lands on a worker node
        (the one the case kills); ray.kill it afterwards."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        head = self.cluster.head_node.node_id
        holder = ray.remote(num_cpus=1)(_Idle).options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False)).remote()
        ray.get(holder.ping.remote())
        return holder


class _Idle:
    def ping(self) -> bool:
        return True


def _alive() -> int:
    import ray

    return len([n for n in ray.nodes() if n["Alive"]])


def train_case(faults: Faults, out_dir: str) -> dict:
    from pipeline.config import load_config
    from pipeline.stages.s1_data import run_data
    from pipeline.stages.s2_train import run_train

    steps, every = 40, 10
    cfg = load_config(REPO / "configs" / "digits_lt.yaml", [
        f"output_dir={out_dir}/train", f"train.steps={steps}", f"train.checkpoint_every={every}", "train.log_every=5",
        "train.max_failures=1", "train.cpus_per_worker=1", "train.num_workers=1", "model.preset=small",
        "train.batch_size=32", "tracking.grid_per_class=0"])
    data = run_data(cfg)
    storage = cfg.run_dir / "train" / "ray"

    def ready():
        done = [json.loads(p.read_text())["step"] for p in storage.glob("*/checkpoint_*/progress.json")]
        if not done:
            return None
        logs = sorted(storage.parent.glob(".work/ddpm-*/loss.csv"))
        return {"checkpoint": max(done), "logged_before_kill": max(
            [int(x.split(",")[0]) for x in logs[0].read_text().splitlines()[1:] if x] if logs else [0])}

    fault = faults.arm(ready, b"ray::RayTrainWorker")
    started = time.perf_counter()
    art = run_train(cfg, data)["ddpm"]
    seconds = time.perf_counter() - started
    fault["stop"] = True
    loss = [int(x.split(",")[0]) for x in (art.path / "loss.csv").read_text().splitlines()[1:] if x]
    return {"case": "worker node lost during diffusion training", "killed": "killed_at" in fault,
            "checkpoint": fault.get("checkpoint"), "logged_before_kill": fault.get("logged_before_kill"),
            "final_step": art.metrics["step"], "steps": steps, "checkpoint_every": every,
            "steps_redone": max(0, (fault.get("logged_before_kill") or 0) - (fault.get("checkpoint") or 0)),
            "loss_steps_unique": loss == sorted(set(loss)), "nodes_left": _alive(), "wall_s": round(seconds, 1)}


def classify_case(faults: Faults, out_dir: str) -> dict:
    import ray

    from pipeline.config import load_config
    from pipeline.stages.s1_data import run_data
    from pipeline.stages.s5_classify import run_classify

    epochs = 6
    cfg = load_config(REPO / "configs" / "digits_lt.yaml", [
        f"output_dir={out_dir}/classify", "classify.baselines=[ce]", "classify.synthetic=none",
        f"classify.epochs={epochs}", "classify.eval_every=1", "classify.batch_size=64", "classify.input_size=8",
        "classify.cpus_per_worker=1", "train.max_failures=1", "stages=[data,classify]", "tracking.tensorboard=false"])
    data = run_data(cfg)
    storage = cfg.run_dir / "classify" / "ray"

    def ready():
        done = [json.loads(p.read_text())["epoch"] for p in storage.glob("*/checkpoint_*/progress.json")]
        return {"checkpoint_epoch": max(done)} if done else None

    holder = faults.occupy_head()
    fault = faults.arm(ready, b"ray::RayTrainWorker")
    started = time.perf_counter()
    art = run_classify(cfg, data, {})["ce"]
    seconds = time.perf_counter() - started
    fault["stop"] = True
    ray.kill(holder)
    rows = (art.path / "history.csv").read_text().splitlines()
    col = rows[0].split(",").index("epoch")
    history = [int(float(r.split(",")[col])) for r in rows[1:] if r]
    return {"case": "worker node lost during a classifier arm", "killed": "killed_at" in fault,
            "checkpoint_epoch": fault.get("checkpoint_epoch"), "final_epoch": art.metrics["epochs"], "epochs": epochs,
            "history_epochs_unique": history == sorted(set(history)) and history[-1] == epochs,
            "nodes_left": _alive(), "wall_s": round(seconds, 1)}


def sample_case(faults: Faults, out_dir: str) -> dict:
    import numpy as np
    import ray

    from pipeline.common.artifacts import load_samples
    from pipeline.common.generation import plan_rows
    from pipeline.config import load_config
    from pipeline.stages.s1_data import run_data
    from pipeline.stages.s2_train import run_train
    from pipeline.stages.s3_sample import plan_counts, run_sample

    cfg = load_config(REPO / "configs" / "digits_lt.yaml", [
        f"output_dir={out_dir}/sample", "train.steps=4", "train.batch_size=16", "model.image_size=8",
        "train.bf16=false", "sample.per_class=12", "sample.sampler=ddim", "sample.steps=60", "sample.batch_size=8",
        "sample.bf16=false", "stages=[data,train,sample]", "tracking.grid_per_class=0"])
    data = run_data(cfg)
    models = run_train(cfg, data)
    holder = faults.occupy_head()
    samples_root = cfg.run_dir / "samples"

    def ready():
        return {"batches_before_kill": n} if (n := len(list(samples_root.glob(".tmp-*/images/*.parquet")))) else None

    fault = faults.arm(ready, b"ray::MapWorker")
    started = time.perf_counter()
    art = run_sample(cfg, data, models)["ddpm"]
    seconds = time.perf_counter() - started
    fault["stop"] = True
    ray.kill(holder)
    got = load_samples(art, data.image_shape)
    plan = plan_rows(plan_counts(cfg, data.manifest), cfg.seed, "eval")
    planned = sorted(zip(plan["label"].tolist(), plan["k"].tolist(), plan["seed"].tolist()))
    produced = sorted(zip(got["label"].tolist(), got["k"].tolist(), got["seed"].tolist()))
    return {"case": "sampling actor's node lost", "killed": "killed_at" in fault,
            "batches_before_kill": fault.get("batches_before_kill"), "images": len(produced), "planned": len(planned),
            "each_planned_image_once": produced == planned and len(set(produced)) == len(produced),
            "images_finite": bool(np.isfinite(got["image"].astype(float)).all()),
            "nodes_left": _alive(), "wall_s": round(seconds, 1)}


def tune_case(faults: Faults, out_dir: str) -> dict:
    import ray

    from pipeline.config import load_config
    from pipeline.tuning.cli import run_tune, sweep_dir
    from pipeline.tuning.space import load_space

    steps, every = 30, 10
    base = load_config(REPO / "configs" / "digits_lt.yaml", [
        f"output_dir={out_dir}/tune", f"train.steps={steps}", f"train.checkpoint_every={every}", "train.log_every=5",
        "train.max_failures=1", "train.num_workers=1", "train.cpus_per_worker=0.5", "train.torch_threads=1",
        "model.preset=small", "train.batch_size=32", "tracking.grid_per_class=0", "tracking.tensorboard=false"])
    space_file = Path(out_dir) / "node_loss.yaml"
    space_file.write_text("method: ddpm\nkind: train\nnum_samples: 1\nproxy: {images: 20, steps: 2, batch_size: 20}\n"
                          "space:\n  train.p_uncond: {grid: [0.1]}\n")
    space = load_space(space_file, base)
    runs = sweep_dir(base, space.name) / "runs"

    def ready():
        done = [json.loads(p.read_text())["step"] for p in runs.glob("trial-*/train/ray/*/checkpoint_*/progress.json")]
        if not done:
            return None
        logs = sorted(runs.glob("trial-*/train/.work/ddpm-*/loss.csv"))
        return {"checkpoint": max(done), "logged_before_kill": max(
            [int(x.split(",")[0]) for x in logs[0].read_text().splitlines()[1:] if x] if logs else [0])}

    holder = faults.occupy_head()  # the trial's function lands on a worker node: the one killed
    fault = faults.arm(ready, b"ray::ImplicitFunc")
    started = time.perf_counter()
    result = run_tune(base, space)
    seconds = time.perf_counter() - started
    fault["stop"] = True
    ray.kill(holder)
    deadline = time.time() + 30
    while True:  # the GCS removes a dead owner's groups asynchronously
        live = [pg for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"]
        if not live or time.time() > deadline:
            break
        time.sleep(0.5)
    (row,) = result["rows"]
    loss = [int(x.split(",")[0]) for x in (Path(row["run_dir"]) / "train" / "ddpm" / "loss.csv").read_text().splitlines()[1:] if x]
    return {"case": "Tune trial's node lost", "killed": "killed_at" in fault, "status": row["status"],
            "attempts": row["attempts"], "checkpoint": fault.get("checkpoint"),
            "logged_before_kill": fault.get("logged_before_kill"), "final_step": row["step"], "steps": steps,
            "checkpoint_every": every,
            "steps_redone": max(0, (fault.get("logged_before_kill") or 0) - (fault.get("checkpoint") or 0)),
            "loss_steps_unique": loss == sorted(set(loss)) and loss[-1] == steps, "fid": row["fid"],
            "placement_groups_left": len(live), "nodes_left": _alive(), "wall_s": round(seconds, 1)}


CASES = {"train": train_case, "classify": classify_case, "sample": sample_case, "tune": tune_case}


def main(out_dir: str, cases: list[str]) -> int:
    import ray

    faults = Faults()
    api = f"http://127.0.0.1:{faults.dashboard_port}"  # as pipeline/tuning/cli.py's local Ray
    ray.init(address=faults.cluster.address, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": api}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        for name in cases:
            print(json.dumps(CASES[name](faults, out_dir)), flush=True)
            faults.replace()
    finally:
        ray.shutdown()
        faults.cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:] or list(CASES)))
