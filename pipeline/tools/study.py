"""`python pipeline/run.py study --config configs/fmnist_lt_study.yaml`: the comparison a reviewer
would accept, in one resumable command.

1. one shared DDPM pre-training (`study.base`: a run of this output_dir whose DDPM is reused, or
   trained here as run `<name>-base`);
2. every method of `study.methods` fine-tuned from it for the same `train.finetune_steps` (DDPM
   itself continued for the same steps), and the methods of `study.equal_compute` again at the
   steps their cost allows (run `<name>-eqc`: CBDM's two forwards get half the steps); a method that
   trains its own source model (DiffRC: a DDPM on the head classes) gets the same total budget
   instead, source + target = train.steps + train.finetune_steps (run `<name>-own`);
3. ω per model from a held-out sampling sweep (`study.omega_grid`, `study.omega_images` images
   drawn from their own seeds, never the reported ones);
4. the evaluation set of every model (`sample.per_class` × classes images, the same per-image
   seeds for every model: paired) and its metrics with bootstrap intervals;
5. the classify stage with `classify.seeds` seeds per arm: the classifier-only baselines and real +
   synthetic arms of DDPM, the `study.classify_top` best methods by few-group FID and
   `study.classify_always`;
6. `study.results_dir`: results.json (every number with its interval, the config, the commit),
   table.md (the paired comparison and one line per paper claim: reproduced / not reproduced /
   inconclusive), and the figures.
Every piece is a stage artifact: a rerun (or a resumed interrupted run) reuses what is finished.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.config import DEFAULT_CONFIG, Config, load_config
from pipeline.errors import TaildiffError

log = logging.getLogger("taildiff.study")


def _replace(cfg: Config, **sections) -> Config:
    """cfg with dotted-free section replacements: _replace(cfg, train={"methods": (...)}, name="x")."""
    changes = {}
    for key, value in sections.items():
        changes[key] = dataclasses.replace(getattr(cfg, key), **value) if isinstance(value, dict) else value
    return dataclasses.replace(cfg, **changes)


def forward_cost(method: str, cfg: Config) -> float:
    from models.methods.registry import training_cost

    return training_cost(method, cfg.method_options())


def base_model(cfg: Config, data) -> Path:
    """The shared DDPM: `study.base` (a model.pt, or a run name of this output_dir: its finished DDPM as it is,
    trained there first when it has none), else trained here as run `<name>-base`."""
    from pipeline.stages.s2_train import run_train

    s = cfg.study
    if s.base and s.base.endswith(".pt"):
        path = Path(s.base)
    else:
        base_cfg = _replace(cfg, name=s.base or f"{cfg.name}-base",
                            train={"methods": ("ddpm",), "init_from": None, "finetune_steps": None})
        finished = base_cfg.run_dir / "train" / "ddpm"
        if s.base and (finished / "manifest.json").is_file() and (finished / "model.pt").is_file():
            # another run's finished DDPM is shared as it is: never retrained (and overwritten) because this
            # study's config differs from that run's (a fine-tuning replicate with another seed, say)
            log.info("study: shared DDPM %s (trained by run %s)", finished / "model.pt", s.base)
            path = finished / "model.pt"
        else:
            path = run_train(base_cfg, data)["ddpm"].weights
    if not path.is_file():
        raise TaildiffError(f"study.base={s.base}: no DDPM weights at {path}; give a model.pt or a run name")
    return path.resolve()


def own_source_runs(cfg: Config) -> list[tuple[Config, tuple]]:
    """The study's methods that train their own source model, as runs at the equal total budget.

    Every other method gets train.steps (the shared DDPM) + train.finetune_steps; such a method gets
    the same: its source's `source_steps` + a target of the rest (at least 1), in run `<name>-own`.
    Its target is trained at train.lr, as the shared DDPM: train.finetune_lr shapes the short
    fine-tunes from the trained DDPM, not a target that learns the tail classes from a head-only source."""
    from models.methods.registry import method_needs

    options = cfg.method_options()
    budget = cfg.train.steps + (cfg.train.finetune_steps or 0)
    groups: dict[int, list] = {}
    for m in cfg.study.methods:
        needs = method_needs(m, options)
        if needs.source_model:
            target = max(1, budget - (needs.source_steps or cfg.train.steps))
            groups.setdefault(target, []).append(m)
    return [(_replace(cfg, name=f"{cfg.name}-own" + (f"{target}" if len(groups) > 1 else ""),
                      train={"methods": tuple(ms), "init_from": None, "finetune_steps": target,
                             "finetune_lr": None}), tuple(ms))
            for target, ms in sorted(groups.items())]


def choose_omegas(cfg: Config, data, models: dict) -> dict:
    """ω per model minimising FID of `omega_images` held-out samples (own seeds) on domain features."""
    from models.evaluation.intervals import frechet_from_stats, gaussian_stats
    from pipeline.common.artifacts import load_model, make_schedule
    from pipeline.common.features import Extractor, balanced_plan, generate_images, real_features
    from pipeline.common.files import write_json
    from pipeline.common.generation import build_denoiser

    path = cfg.run_dir / "study_omega.json"
    done = json.loads(path.read_text()) if path.is_file() else {}
    extractor = Extractor(cfg, data)
    ref = gaussian_stats(real_features(extractor, cfg, data)["reference_feats"])
    labels, seeds = balanced_plan(data.num_classes, cfg.study.omega_images, cfg.seed, "study-omega")
    for name, art in models.items():
        stamp = f"{art.weights}:{art.weights.stat().st_mtime}:{list(cfg.study.omega_grid)}"
        if done.get(name, {}).get("stamp") == stamp:
            continue
        net, run_cfg, manifest = load_model(art.weights)
        schedule, rows = make_schedule(run_cfg), []
        for omega in cfg.study.omega_grid:
            den = build_denoiser(net, art.weights, omega, cfg.sample.bf16, schedule, "cpu")
            images = generate_images(net, schedule, manifest, run_cfg.model.image_size, labels, seeds,
                                     sampler=cfg.sample.sampler, steps=cfg.sample.steps, batch_size=cfg.sample.batch_size,
                                     denoiser=den)
            rows.append({"omega": omega, "fid": frechet_from_stats(*gaussian_stats(extractor(images)[0]), *ref)})
            log.info("study: %s ω=%.2f held-out FID %.3f", name, omega, rows[-1]["fid"])
        best = min(rows, key=lambda r: r["fid"])
        done[name] = {"stamp": stamp, "rows": rows, "omega": best["omega"]}
        write_json(path, done)
    return {name: done[name]["omega"] for name in models}


def evaluate_models(cfg: Config, data, models: dict, omegas: dict) -> dict:
    """Each model's paired evaluation set at its ω, then the evaluate stage on them."""
    from pipeline.common.devices import cluster_gpus, resolve_use_gpu
    from pipeline.common.generation import SetRequest, generate_sets
    from pipeline.stages.s3_sample import plan_counts
    from pipeline.stages.s4_evaluate import run_evaluate

    use_gpu = resolve_use_gpu(cfg.sample.use_gpu, cluster_gpus(), "sample")
    counts = plan_counts(cfg, data.manifest)
    samples = generate_sets(data, [SetRequest(_replace(cfg, sample={"omega": omegas[name], "omega_by_method": ()}), art,
                                              counts, folder=name, seed_tag="eval")
                                   for name, art in models.items()], use_gpu)  # one actor pool for every model
    return run_evaluate(cfg, data, samples)


def run_study(cfg: Config) -> dict:
    from pipeline.common.locking import run_lock
    from pipeline.tools.study_clock import InvocationClock

    started = time.perf_counter()
    with run_lock(cfg.run_dir):
        clock = InvocationClock(cfg.run_dir)  # every invocation's phases, kept across interruptions and kills
        try:
            out = _phases(cfg, clock, started)
        except BaseException:
            clock.close(interrupted=True)  # the seconds of the phase that failed stay on the record
            raise
        clock.close()
        return out


def _phases(cfg: Config, clock, started: float) -> dict:
    from pipeline.common.ray_setup import init_ray
    from pipeline.stages.s1_data import run_data
    from pipeline.stages.s2_train import run_train
    from pipeline.stages.s5_classify import run_classify
    from pipeline.tools.study_report import write_results

    s = cfg.study
    init_ray()
    data = run_data(cfg)
    base = base_model(cfg, data)
    own = own_source_runs(cfg)
    owned = {m for _, ms in own for m in ms}
    ft = _replace(cfg, train={"methods": tuple(m for m in s.methods if m not in owned), "init_from": str(base)})
    models = run_train(ft, data)
    for own_cfg, _ in own:
        models.update(run_train(own_cfg, data))
    models = {m: models[m] for m in s.methods}
    clock.lap("train")  # each lap: the seconds since the previous one (the first: since the clock's start)
    eqc_models = {}
    for cost in sorted({forward_cost(m, cfg) for m in s.equal_compute}):
        group = tuple(m for m in s.equal_compute if forward_cost(m, cfg) == cost)
        steps = max(1, int(round((cfg.train.finetune_steps or cfg.train.steps) / cost)))
        eqc = _replace(cfg, name=f"{cfg.name}-eqc{cost:g}",
                       train={"methods": group, "init_from": str(base), "finetune_steps": steps})
        for m, art in run_train(eqc, data).items():
            eqc_models[f"{m}@{steps}steps"] = (eqc, art)
    clock.lap("train_equal_compute")
    omegas = choose_omegas(ft, data, models)
    clock.lap("omega_sweep")
    evaluations = evaluate_models(ft, data, models, omegas)
    eqc_evals = {}
    for label, (eqc, art) in eqc_models.items():
        omega = choose_omegas(eqc, data, {art.method: art})[art.method]
        omegas[label] = omega
        eqc_evals[label] = evaluate_models(eqc, data, {art.method: art}, {art.method: omega})[art.method]
    clock.lap("sample_evaluate")
    classified = classify_methods(s, evaluations)
    cls = classify_config(ft, classified)
    classifiers = run_classify(cls, data, {m: models[m] for m in classified}, omegas=omegas)
    clock.lap("classify")
    return write_results(cfg, data, models, evaluations, eqc_evals, classifiers, omegas, classified,
                         time.perf_counter() - started, clock=clock)


def classify_config(ft: Config, classified: list[str]) -> Config:
    """The classify stage's config: its methods, with train.methods naming every study method (a method
    trained in its own run, DiffRC, is not in the fine-tuning run's list, and classify.methods must be)."""
    return _replace(ft, train={"methods": tuple(ft.study.methods)}, classify={"methods": tuple(classified)})


def classify_methods(s, evaluations: dict) -> list[str]:
    """DDPM, the `classify_top` best by few-group FID, then `classify_always` (those evaluated), no repeats."""
    few = {m: e.metrics["fid_thirds_few"] for m, e in evaluations.items() if m != "ddpm"}
    chosen = ["ddpm"] + sorted(few, key=few.get)[:s.classify_top]
    return chosen + [m for m in s.classify_always if m in evaluations and m not in chosen]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pipeline/run.py study", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG.parent / "fmnist_lt_study.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        out = run_study(cfg)
    except TaildiffError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"study: {out['results_dir']} ({out['seconds']:.0f} s)")
    return 0
