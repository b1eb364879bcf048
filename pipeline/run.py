"""taildiff's entry point: resolve the config, write it into the run folder, chain the stages.

    python pipeline/run.py --config configs/fmnist_lt.yaml [--set key=value ...] [--stages data] [--dry-run]

Locally this starts a Ray instance of its own; under `ray job submit` (or with RAY_ADDRESS
set) it joins that cluster.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import from the repo root, not pipeline/
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from pipeline.config import DEFAULT_CONFIG, STAGES, Config, load_config  # noqa: E402
from pipeline.errors import TaildiffError  # noqa: E402

log = logging.getLogger("taildiff")


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


def write_run_config(cfg: Config) -> Path:
    from pipeline.data import writable_dir

    run_dir = writable_dir(cfg.run_dir, "run folder")
    tmp = run_dir / "config.json.tmp"
    tmp.write_text(json.dumps(cfg.to_dict(), indent=2))
    os.replace(tmp, run_dir / "config.json")
    return run_dir


def init_ray(**local_options) -> None:
    """Join the cluster of RAY_ADDRESS (also set inside `ray job submit`), else start a local Ray
    (never a stray `ray start` cluster) with `local_options` for ray.init."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address="auto", log_to_driver=False)
    else:
        ray.init(**{"address": "local", **local_options}, log_to_driver=False)
    # Stage progress is reported by the stages themselves; Ray Data's per-dataset chatter is not.
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def run(cfg: Config) -> dict:
    """Run the configured stages in order; returns what each produced.

    Each stage skips itself when its artifacts for this config exist. A later stage needs the
    earlier ones' artifacts, so asking for `sample` alone still makes sure data and train are done.
    """
    from pipeline.data import run_data

    run_dir = write_run_config(cfg)  # before any work, so a failed run still says what it was
    init_ray()
    outputs: dict = {"data": run_data(cfg)}
    stages = set(cfg.stages)
    needs_models = stages & {"train", "sample", "evaluate"} or ("classify" in stages and cfg.classify.synthetic != "none")
    if needs_models:
        from pipeline.train import run_train

        outputs["train"] = run_train(cfg, outputs["data"])
    if stages & {"sample", "evaluate"}:
        from pipeline.sample import run_sample

        outputs["sample"] = run_sample(cfg, outputs["data"], outputs["train"])
    if "evaluate" in stages:
        from pipeline.evaluate import run_evaluate

        outputs["evaluate"] = run_evaluate(cfg, outputs["data"], outputs["sample"])
    if "classify" in stages:
        from pipeline.classify import run_classify

        outputs["classify"] = run_classify(cfg, outputs["data"], outputs.get("train", {}))
    if "report" in stages:
        from pipeline.report import run_report

        outputs["report"] = run_report(cfg, outputs)
    summary = {"run_dir": str(run_dir), "dataset_dir": str(outputs["data"].path),
               "data_reused": outputs["data"].skipped}
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
    tmp = run_dir / "stages.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, run_dir / "stages.json")
    return outputs


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "tune":  # python pipeline/run.py tune --space tune_spaces/<file> --config ...
        from pipeline.tune import main as tune_main

        return tune_main(argv[1:])
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
