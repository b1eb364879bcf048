"""`python pipeline/run.py` as a user runs it: dry run, a real run, a rerun, and bad input."""
import json
import subprocess
import sys
import time

import pytest

from conftest import REPO


QUICK_CLASSIFY = ["--set", "classify.epochs=1", "--set", "classify.baselines=[ce]", "--set", "classify.synthetic=per_class",
                  "--set", "classify.per_class=2", "--set", "classify.batch_size=64"]


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
    base = ["--config", "configs/digits_lt.yaml", "--set", f"output_dir={tmp_path}"]
    first = run_cli(*base, "--stages", "data")
    assert first.returncode == 0, first.stderr[-2000:]
    run_dir = tmp_path / "runs" / "digits_lt"
    written = json.loads((run_dir / "config.json").read_text())
    assert written["output_dir"] == str(tmp_path) and written["stages"] == ["data"]
    stages = json.loads((run_dir / "stages.json").read_text())
    manifest = json.loads((tmp_path / "datasets" / stages["dataset_dir"].split("/")[-1] / "manifest.json").read_text())
    assert manifest["dataset"] == "digits" and not stages["data_reused"]
    assert "label" in first.stdout  # the per-class table

    job = [*base, "--set", "train.steps=20", "--set", "train.checkpoint_every=10", *QUICK_CLASSIFY]
    whole = run_cli(*job)
    assert whole.returncode == 0, whole.stderr[-3000:]
    stages = json.loads((run_dir / "stages.json").read_text())
    assert stages["data_reused"] and stages["models"]["ddpm"]["step"] == 20
    assert stages["samples"]["ddpm"]["images"] == 50
    assert (run_dir / "samples" / "ddpm" / "grid.png").is_file() and (run_dir / "train" / "ddpm" / "loss.png").is_file()
    assert set(stages["classify"]) == {"ce", "syn-ddpm"} and (run_dir / "report.md").is_file()

    started = time.perf_counter()
    again = run_cli(*job)
    seconds = time.perf_counter() - started
    assert again.returncode == 0, again.stderr[-2000:]
    stages = json.loads((run_dir / "stages.json").read_text())
    assert stages["data_reused"] and stages["models"]["ddpm"]["reused"] and stages["samples"]["ddpm"]["reused"]
    assert stages["evaluation"]["ddpm"]["reused"] and all(arm["reused"] for arm in stages["classify"].values())
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
