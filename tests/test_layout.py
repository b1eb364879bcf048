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
    code = ("import sys; import pipeline.sources.fashion_mnist, pipeline.sources.digits, pipeline.common.shards\n"
            "assert 'ray' not in sys.modules")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_the_training_streams_processes_import_no_torch():
    """What a Ray Train fit's data processes unpickle (the stream's map step and its arguments; the
    split coordinator, the shard provider and the map tasks each start a fresh Python), and the
    sampling plan's slice step, import no torch: 2.5-3.5 s per process, in series; 4.9 s
    [2.8, 7.0] per fit measured (bench_fit_overhead, README "Measured")."""
    code = ("import pickle, sys\nfrom pipeline.common import streams, launcher, progress\n"
            "assert 'torch' not in sys.modules, 'torch imported by the stream/launcher modules'\n"
            "from pipeline.config import ResampleConfig\n"
            "kw = streams.plan_kwargs(ResampleConfig(mode='balanced_batch', batch_size=8))\n"
            "blob = pickle.dumps((streams._gather_block, kw, streams._plan_slice))\n"
            "print(blob.hex())")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    load = (f"import pickle, sys\npickle.loads(bytes.fromhex({res.stdout.strip()!r}))\n"
            "assert 'torch' not in sys.modules, 'unpickling the map step imported torch'")
    res = subprocess.run([sys.executable, "-c", load], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_cluster_yaml_passes_rays_schema():
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(yaml.safe_load((REPO / "cluster.yaml").read_text())))


def test_cluster_yaml_is_safe_and_loud():
    """Dashboard/job API on localhost only, SSH the only inbound port, set-up that fails loudly,
    the same pins as pyproject.toml, a CPU head and autoscaled GPU workers."""
    import re

    import yaml

    text = (REPO / "cluster.yaml").read_text()
    cfg = yaml.safe_load(text)
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    rules = cfg["provider"]["security_group"]["IpPermissions"]
    assert [(r["FromPort"], r["ToPort"]) for r in rules] == [(22, 22)]
    for cmd in cfg["setup_commands"]:
        assert cmd.startswith("set -euo pipefail;") and "|| true" not in cmd, cmd
    pins = dict(re.findall(r'"(ray|diffusers)[^"=]*==([\d.]+)"', " ".join(cfg["setup_commands"])))
    project = (REPO / "pyproject.toml").read_text()
    for name, version in pins.items():
        assert re.search(rf'"{name}[^"=]*==\s*{re.escape(version)}"', project), (name, version)
    assert set(pins) == {"ray", "diffusers"}
    nodes = cfg["available_node_types"]
    assert nodes[cfg["head_node_type"]]["max_workers"] == 0 and nodes["gpu_worker"]["max_workers"] > 0


def _imports(path):
    """Every pipeline/models module a file imports (module level and inside functions)."""
    import ast

    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in found if m.split(".")[0] in ("pipeline", "models")}


def _module_graph():
    modules = {}
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_pipeline_has_no_import_circles():
    graph = _module_graph()
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])


def test_no_stage_imports_another_stage():
    """Stages share artifact types and loaders through pipeline.common, never each other's modules."""
    graph = _module_graph()
    for name, deps in graph.items():
        if name.startswith("pipeline.stages.s"):
            own = name.split(".")[2].split("_")[0]  # s1, s2, ...
            others = [d for d in deps if d.startswith("pipeline.stages.s") and d.split(".")[2].split("_")[0] != own]
            assert not others, f"{name} imports {others}"
        if name.startswith("pipeline.common"):
            assert not [d for d in deps if d.startswith(("pipeline.stages", "pipeline.tuning"))], name


def test_no_sys_path_edits():
    for path in list((REPO / "pipeline").rglob("*.py")) + list((REPO / "models").rglob("*.py")):
        assert "sys.path" not in path.read_text(), path


def test_readme_method_table_lists_exactly_the_registry():
    import re

    from models.methods.registry import METHODS

    text = (REPO / "README.md").read_text()
    section = text.split("### Long-tail methods", 1)[1].split("\n### ", 1)[0]
    names = []
    for cell in re.findall(r"^\| (`[^|]+`) \|", section, flags=re.M):  # the first cell: `a`, `b`, ...
        names += re.findall(r"`([^`]+)`", cell)
    assert sorted(names) == sorted(METHODS), "README's method table and models/methods/registry.py disagree"
