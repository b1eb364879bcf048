"""The dividing line: models/ computes numbers and never imports ray."""
import pkgutil
import subprocess
import sys

import models
from conftest import REPO


def test_models_never_import_ray():
    names = [f"models.{m.name}" for m in pkgutil.walk_packages(models.__path__)]
    assert names, "models/ has no modules"
    code = (f"import importlib, sys\nfor n in {names!r}: importlib.import_module(n)\n"
            "assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray'))")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_sources_and_shard_reader_work_without_ray():
    code = ("import sys; import pipeline.sources.fashion_mnist, pipeline.sources.digits, pipeline.shards\n"
            "assert 'ray' not in sys.modules")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_cluster_yaml_passes_rays_schema():
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(yaml.safe_load((REPO / "cluster.yaml").read_text())))
