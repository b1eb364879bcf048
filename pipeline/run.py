"""taildiff's entry point: resolve the config, write it into the run folder, chain the stages.

    python pipeline/run.py --config configs/fmnist_lt.yaml [--set key=value ...] [--stages data] [--dry-run]
    python pipeline/run.py tune --space tune_spaces/<file> ...      (pipeline/tuning/cli.py)

Each stage is one `run_<stage>(cfg, inputs) -> artifacts` in pipeline/stages/; this module only
chains them. Locally it starts a Ray instance of its own; under `ray job submit` (or with
RAY_ADDRESS set) it joins that cluster.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pipeline.config import DEFAULT_CONFIG, STAGES, Config, load_config
from pipeline.errors import TaildiffError

log = logging.getLogger("taildiff")
SUBCOMMANDS = {"tune": "pipeline.tuning.cli:main", "export": "pipeline.tools.export:main",
               "generate": "pipeline.tools.generate:main", "compare": "pipeline.tools.compare:main",
               "study": "pipeline.tools.study:main"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pipeline/run.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML preset (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set data.imb_factor=0.02 (repeatable)")
    parser.add_argument("--stages", default=None,
                        help=f"comma-separated stages to run (default: the config's; known: {','.join(STAGES)})")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and stop")
    return parser.parse_args(argv)


def resolve(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    if args.stages:
        overrides.append(f"stages={args.stages}")
    return load_config(args.config, overrides)


def write_run_config(cfg: Config, devices: dict | None = None) -> Path:
    """config.json in the run folder: the resolved config, and (once Ray is up) the device choices."""
    from pipeline.common.files import writable_dir, write_json

    run_dir = writable_dir(cfg.run_dir, "run folder")
    write_json(run_dir / "config.json", {**cfg.to_dict(), **({"resolved_devices": devices} if devices else {})})
    return run_dir


def run(cfg: Config) -> dict:
    """Run the configured stages in order; returns what each produced.

    Each stage skips itself when its artifacts for this config exist. A later stage needs the
    earlier ones' artifacts, so asking for `sample` alone still makes sure data and train are done.
    """
    from pipeline.common.files import check_writable, writable_dir
    from pipeline.common.locking import run_lock

    check_writable(Path(cfg.output_dir) / "datasets", "output folder")  # both folders a run writes, before Ray
    with run_lock(writable_dir(cfg.run_dir, "run folder")):
        return _run_stages(cfg)


def _run_stages(cfg: Config) -> dict:
    from pipeline.common.devices import resolve_devices
    from pipeline.common.preflight import check_data_sizes, check_run_inputs
    from pipeline.common.ray_setup import init_ray
    from pipeline.stages.s1_data import run_data

    from pipeline.common.storage import sync_run

    sync_run(cfg, "pull")  # shared storage: what another node finished (no-op without `storage`)
    write_run_config(cfg)  # before any work, so a failed run still says what it was
    check_run_inputs(cfg)  # the files it will read, before Ray starts
    init_ray()
    devices = resolve_devices(cfg)  # `use_gpu: true` without GPUs stops here, before any work is placed
    run_dir = write_run_config(cfg, devices)
    try:
        outputs: dict = {"data": run_data(cfg), "devices": devices}
        check_data_sizes(cfg, outputs["data"])
        sync_run(cfg, "push")
        stages = set(cfg.stages)
        needs_models = (stages & {"train", "sample", "evaluate"}
                        or ("classify" in stages and cfg.classify.synthetic != "none"))
        if needs_models:
            from pipeline.stages.s2_train import run_train

            outputs["train"] = run_train(cfg, outputs["data"])
            sync_run(cfg, "push")
        if stages & {"sample", "evaluate"}:
            from pipeline.stages.s3_sample import run_sample

            outputs["sample"] = run_sample(cfg, outputs["data"], outputs["train"])
            sync_run(cfg, "push")
        if "evaluate" in stages:
            from pipeline.stages.s4_evaluate import run_evaluate

            outputs["evaluate"] = run_evaluate(cfg, outputs["data"], outputs["sample"])
            sync_run(cfg, "push")
        if "classify" in stages:
            from pipeline.stages.s5_classify import run_classify

            outputs["classify"] = run_classify(cfg, outputs["data"], outputs.get("train", {}))
        if "report" in stages:
            from pipeline.stages.s6_report import run_report

            outputs["report"] = run_report(cfg, outputs)
        write_summary(run_dir, outputs)
    finally:
        sync_run(cfg, "push")  # finished artifacts only: half-written ones have temporary names
    return outputs


def write_summary(run_dir: Path, outputs: dict) -> None:
    """stages.json: what each stage produced and whether it was reused."""
    from pipeline.common.files import write_json

    summary = {"dataset_dir": str(outputs["data"].path), "data_reused": outputs["data"].skipped,
               "run_dir": str(run_dir), "devices": outputs.get("devices")}
    for method, art in outputs.get("train", {}).items():
        summary.setdefault("models", {})[method] = {"path": str(art.path), "reused": art.skipped,
                                                    "step": art.metrics.get("step")}
    for method, art in outputs.get("sample", {}).items():
        summary.setdefault("samples", {})[method] = {"path": str(art.path), "reused": art.skipped,
                                                     "images": art.num_images}
    for method, art in outputs.get("evaluate", {}).items():
        summary.setdefault("evaluation", {})[method] = {"path": str(art.path), "reused": art.skipped,
                                                        "fid": art.metrics["fid"]}
    for arm, art in outputs.get("classify", {}).items():
        summary.setdefault("classify", {})[arm] = {"path": str(art.path), "reused": art.skipped,
                                                   "accuracy": art.metrics["last"]["accuracy"],
                                                   "few_accuracy": art.metrics["last"]["few_accuracy"]}
    if outputs.get("report"):
        summary["report"] = str(outputs["report"])
    write_json(run_dir / "stages.json", summary)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SUBCOMMANDS:  # python pipeline/run.py tune --space ... (and the other subcommands)
        import importlib

        module, name = SUBCOMMANDS[argv[0]].split(":")
        return getattr(importlib.import_module(module), name)(argv[1:])
    args = parse_args(argv)
    try:
        cfg = resolve(args)
        if args.dry_run:
            print(json.dumps(cfg.to_dict(), indent=2))
            return 0
        run(cfg)
    except TaildiffError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # finished stages and checkpoints are kept; unfinished folders are temp ones
        print("interrupted: finished stages and the last training checkpoint are kept; rerun the same command "
              "to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
