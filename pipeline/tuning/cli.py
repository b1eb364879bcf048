"""`python pipeline/run.py tune`: Ray Tune sweeps over the long-tail methods' knobs.

    python pipeline/run.py tune --space tune_spaces/cbdm.yaml [--config configs/fmnist_lt.yaml] [--set k=v ...]
    python pipeline/run.py tune --space tune_spaces/guidance.yaml --checkpoint outputs/runs/fmnist_lt/train/ddpm/model.pt

A `kind: train` space trains one run per trial (pipeline/tune_train.py) with a proxy FID per
checkpoint for ASHA; a `kind: sample` space sweeps ω / DDIM steps on fixed checkpoints
(pipeline/tune_sample.py). Output under <output_dir>/tune/<sweep>/: results.md / results.csv,
plots, best.yaml (train) or best-<checkpoint>.yaml (sample), sweep.json. Locally this starts
Ray with its dashboard (a stopped trial's placement group is freed through it); under
`ray job submit` or with RAY_ADDRESS set it joins that cluster.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import sys
import time
from pathlib import Path

from pipeline.config import DEFAULT_CONFIG, Config, assign_key, config_from_dict, load_config
from pipeline.errors import ConfigError, TaildiffError
from pipeline.tuning.space import SearchSpace, load_space, sample_points

log = logging.getLogger("taildiff.tune")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pipeline/run.py tune", description=__doc__.splitlines()[0])
    parser.add_argument("--space", required=True, help="search space file, e.g. tune_spaces/cbdm.yaml")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="base preset (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a base config key (repeatable); sample sweeps apply it to the checkpoints' "
                             "configs too (except name / output_dir)")
    parser.add_argument("--name", default=None, help="sweep name (default: the space file's name)")
    parser.add_argument("--num-samples", type=int, default=None, help="trials / random draws (default: the space's)")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="MODEL_PT",
                        help="sample sweeps: a trained model.pt (repeatable; default: the base run's methods)")
    parser.add_argument("--images", type=int, default=None,
                        help="images per point (sample sweeps) or per proxy FID (train sweeps)")
    parser.add_argument("--dry-run", action="store_true", help="validate the space, print sampled points and stop")
    return parser.parse_args(argv)


def init_ray() -> None:
    from pipeline.common.ray_setup import init_ray as init_run_ray

    init_run_ray(**local_ray_options())


def local_ray_options() -> dict:
    """ray.init options for a local sweep. A stopped trial's placement group is freed by Train's
    PlacementGroupCleaner through the dashboard's state API; the workers are told its address, so
    this works even when other Ray instances run on the same machine (auto-detection fails there)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return {"address": "local", "include_dashboard": True, "dashboard_port": port,
            "runtime_env": {"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}}}


def sweep_dir(base: Config, name: str) -> Path:
    return (Path(base.output_dir) / "tune" / name).resolve()


def run_tune(base: Config, space: SearchSpace, *, name: str | None = None, num_samples: int | None = None,
             checkpoints: list[str] | None = None, overrides: list[str] | None = None, images: int | None = None,
             stop=None) -> dict:
    """Run one sweep and write its outputs; returns {"dir", "rows", "best", "best_yaml", "seconds"}."""
    import dataclasses

    # trials run in Tune's own working directories: every path they get must be absolute
    base = dataclasses.replace(base, output_dir=str(Path(base.output_dir).resolve()))
    init_ray()
    name = name or space.name
    out = sweep_dir(base, name)
    started = time.perf_counter()
    if space.kind == "train":
        result = _train_sweep(base, space, out, num_samples, images, stop)
    else:
        result = _sample_sweep(base, space, out, checkpoints or [], overrides or [], images, num_samples)
    result["seconds"] = round(time.perf_counter() - started, 1)
    summary = {"space": space.__dict__, "name": name, "seconds": result["seconds"], "best": result["best"],
               "best_yaml": [str(p) for p in result["best_yaml"]], "trials": len(result["rows"]),
               "rows": result["rows"]}  # every point's numbers (a sample sweep's per-class fidelity included)
    (out / "sweep.json").write_text(json.dumps(summary, indent=2, default=str))
    log.info("tune[%s]: %d rows in %.1f s -> %s", name, len(result["rows"]), result["seconds"], out)
    return result


def _train_sweep(base: Config, space: SearchSpace, out: Path, num_samples, images, stop) -> dict:
    from pipeline.stages.s1_data import run_data
    from pipeline.common.features import prepare_reference
    from pipeline.tuning.report import plot_train_sweep, write_best_yaml, write_table
    from pipeline.tuning.train_sweep import best_trial, run_training_sweep

    for old in ("runs", "ray"):  # a sweep starts afresh; trial ids are random, so nothing is resumed
        shutil.rmtree(out / old, ignore_errors=True)
    data = run_data(base)
    ref = prepare_reference(base, data, out)
    proxy = {**space.proxy, "extractor_weights": ref["extractor_weights"], "reference": ref["reference"]}
    if images:
        proxy["images"] = images
    rows = run_training_sweep(base, space, data, out, proxy, num_samples=num_samples, stop=stop)
    keys = list(space.space)
    write_table(rows, keys, out, ["status", "step", "seconds"],
                f"Sweep **{space.name}** ({space.method}): proxy FID of {proxy['images']} DDIM-{proxy['steps']} "
                f"samples at ω={proxy['omega']}, {ref['extractor']['extractor']} features; best first.")
    log_keys = {k for k, v in space.space.items() if isinstance(v, dict) and "loguniform" in v}
    plot_train_sweep(rows, keys, out, log_keys, ref["extractor"]["extractor"])
    best = best_trial(rows, space.mode)
    from pipeline.tuning.space import point_config

    best_cfg = point_config(base, space, best["params"], name=f"{base.name}-{out.name}-best")
    path = write_best_yaml(best_cfg, out / "best.yaml",
                           f"Best trial {best['trial_id']} of sweep {out.name} (proxy FID {best['fid']:.4g} at step "
                           f"{best['step']}): {best['params']}\nRun it: python pipeline/run.py --config {out / 'best.yaml'}")
    return {"dir": out, "rows": rows, "best": best, "best_yaml": [path]}


def _checkpoint_config(weights: Path, overrides: list[str]) -> Config:
    """The config a checkpoint was trained with, plus the --set overrides (not name / output_dir)."""
    import torch

    try:
        blob = torch.load(weights, map_location="cpu", weights_only=True)
        raw = json.loads(blob["config"])["run"]
    except (OSError, RuntimeError, KeyError, EOFError, json.JSONDecodeError) as exc:
        raise TaildiffError(f"cannot read the checkpoint {weights} ({exc}): give a model.pt from the train stage") \
            from None
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() not in ("name", "output_dir"):
            import yaml

            assign_key(raw, key.strip().split("."), yaml.safe_load(value) if value else None)
    return config_from_dict(raw)


def _sample_sweep(base: Config, space: SearchSpace, out: Path, checkpoints, overrides, images, num_samples) -> dict:
    from pipeline.stages.s1_data import run_data
    from pipeline.common.features import prepare_reference
    from pipeline.tuning.report import plot_sample_sweep, write_best_yaml, write_table
    from pipeline.tuning.sample_sweep import run_sample_sweep
    from pipeline.tuning.space import point_config

    paths = [Path(p) for p in checkpoints] or [base.run_dir / "train" / m / "model.pt" for m in base.train.methods]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise TaildiffError(f"no checkpoint at {', '.join(missing)}: train it first (python pipeline/run.py "
                            "--stages train) or pass --checkpoint <model.pt>")
    found: dict[str, tuple] = {}
    out.mkdir(parents=True, exist_ok=True)
    for path in paths:
        cfg = _checkpoint_config(path, overrides)
        label = path.parent.name
        if label in found:
            label = f"{cfg.name}/{label}"
        data = run_data(cfg)
        ref = prepare_reference(cfg, data, out / "reference" / label.replace("/", "-"))
        ref["class_counts"] = data.manifest["class_counts"]
        found[label] = (str(path.resolve()), cfg, ref)
    if num_samples:
        space = SearchSpace(**{**space.__dict__, "num_samples": num_samples})
    rows = run_sample_sweep(found, space, images or space.images, seed=base.seed)
    extractor = next(iter(found.values()))[2]["extractor"]["extractor"]
    write_table(rows, list(space.space), out, ["fid_many", "fid_medium", "fid_few", "class_fidelity", "images",
                                               "seconds"],
                f"Sweep **{space.name}**: FID of {images or space.images} class-balanced samples per point "
                f"({extractor} features, reference = balanced set; groups: thirds by training count; class "
                f"fidelity = the share the domain classifier recognises as their class); best first.")
    plot_sample_sweep(rows, out, extractor)
    best, yamls = {}, []
    for label, (weights, cfg, _) in found.items():
        mine = [r for r in rows if r["checkpoint"] == label]
        pick = (min if space.mode == "min" else max)(mine, key=lambda r: r["fid"])
        best[label] = {"params": pick["params"], "fid": pick["fid"]}
        best_cfg = point_config(cfg, space, pick["params"])
        yamls.append(write_best_yaml(best_cfg, out / f"best-{label.replace('/', '-')}.yaml",
                                     f"{weights}'s training config with the best point of sweep {out.name} "
                                     f"(FID {pick['fid']:.4g}): {pick['params']}\nThe same run name and training "
                                     "keys, so run.py reuses the trained model and only samples / evaluates:\n"
                                     f"python pipeline/run.py --config {out / ('best-' + label.replace('/', '-') + '.yaml')}"))
    return {"dir": out, "rows": rows, "best": best, "best_yaml": yamls}


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        base = load_config(args.config, args.overrides)
        space = load_space(args.space, base)
        if args.dry_run:
            points = sample_points(space, args.num_samples, seed=base.seed)
            print(json.dumps({"space": space.__dict__, "points": points}, indent=2, default=str))
            return 0
        if space.kind == "train" and args.checkpoint:
            raise ConfigError("--checkpoint is for sample sweeps (kind: sample); a train sweep trains its own models")
        result = run_tune(base, space, name=args.name, num_samples=args.num_samples, checkpoints=args.checkpoint,
                          overrides=args.overrides, images=args.images)
    except TaildiffError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"sweep: {result['dir']} ({result['seconds']} s); table {result['dir'] / 'results.md'}; "
          f"best config: {', '.join(str(p) for p in result['best_yaml'])}")
    return 0
