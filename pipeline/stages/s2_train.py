"""Train stage: every method of the run trained on Ray Train, fed by its rebalanced stream.

What is trained is planned as `TrainSpec`s from the method registry: one per method, plus what a
method's `Needs` ask for (DiffRC: a source model on the head classes and the feature network of
its sampling guidance). Specs run as jobs of one `TorchTrainer` per *wave*
(pipeline/common/launcher.py): first everything trained from scratch, then everything that
starts from another model (`train.init_from`, DiffRC's target from its source), so a run pays the
worker-group start-up once per wave, not once per model. No method is named here.

Layout under the run folder:
  train/ray/<wave>-<hash>/         Ray Train storage (checkpoints); the same name on a rerun
                                   resumes from the latest checkpoint
  train/.work/<name>-<key>/        what a run writes while it trains; moved to train/<name>/ when
                                   it ends, so a failed or changed run never damages a finished one
  train/<name>/model.pt            EMA weights + what is needed to rebuild the net (the artifact);
                                   features.pt for a guidance feature network
  train/<name>/loss.csv, loss.png, metrics.json, manifest.json, <diagnostic>.png

Each spec's key hashes everything that shapes its weights (data, resampling, model, training,
its method sections, the weights it starts from by content), so a changed config trains afresh.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from models.methods.registry import method_needs, method_parts, used_sections
from models.seeding import derive_seed
from pipeline.common.artifacts import DatasetArtifact, ModelArtifact, make_schedule
from pipeline.common.devices import cluster_gpus, resolve_use_gpu
from pipeline.common.files import write_json
from pipeline.common.launcher import MAX_JOBS_PER_FIT, Job, Scaling, chunked, run_jobs
from pipeline.config import Config, stable_hash
from pipeline.errors import TaildiffError

log = logging.getLogger("taildiff.train")
LOOPS = {"diffusion": "pipeline.stages.s2_train_loop:train_method_job",
         "features": "pipeline.stages.s2_train_loop:train_features_job"}


@dataclass(frozen=True)
class TrainSpec:
    """One model to train: `name` is its folder and job; `method` the registry loss it trains with."""

    name: str
    method: str
    steps: int
    kind: str = "diffusion"  # diffusion | features (a guidance feature network)
    init: str | None = None  # the spec (or model.pt path) whose weights it starts from
    source: str | None = None  # a frozen source model the loss compares against (a spec name)
    classes: tuple | None = None  # the stream restricted to these classes
    conditional: bool = True  # False: the null label throughout (an unconditional backbone)
    section: str | None = None  # the method section of a helper spec (for its options)


def method_resample(cfg: Config, method: str):
    """The data stream a method trains on: its Needs' resampling mode, else the run's resample section."""
    mode = method_needs(method, cfg.method_options()).resample
    return dataclasses.replace(cfg.resample, mode=mode) if mode else cfg.resample


def is_finetuned(cfg: Config, method: str) -> bool:
    return bool(cfg.train.init_from) and cfg.train.init_from != method


def method_steps(cfg: Config, method: str) -> int:
    """train.finetune_steps for a method fine-tuned from train.init_from, else train.steps."""
    if cfg.train.finetune_steps is not None and (is_finetuned(cfg, method) or _needs(cfg, method).source_model):
        return cfg.train.finetune_steps
    return cfg.train.steps


def _needs(cfg: Config, method: str):
    return method_needs(method, cfg.method_options())


def plan_specs(cfg: Config, data: DatasetArtifact) -> list[list[TrainSpec]]:
    """The run's specs in two waves: from scratch, then those that start from another model."""
    first, second = [], []
    for method in cfg.train.methods:
        needs = _needs(cfg, method)
        if needs.source_model:  # a source model on some classes first, then the method starts from it
            part = next(m for m in method_parts(method) if m.source_classes is not None)
            seen = tuple(part.source_classes(getattr(cfg, part.section), data.manifest["class_counts"]))
            source = f"{method}-source"
            first.append(TrainSpec(source, "ddpm", needs.source_steps or cfg.train.steps, classes=seen,
                                   conditional=needs.conditional))
        if needs.guidance:  # its feature network trains on the LT set, independently of the diffusion model
            options = cfg.method_options()
            guided = next(m for m in method_parts(method) if m.needs(options.get(m.section)).guidance)
            first.append(TrainSpec(f"{method}-features", method, needs.guidance_steps, kind="features",
                                   section=guided.section))
        if needs.source_model:
            source = f"{method}-source"
            second.append(TrainSpec(method, method, method_steps(cfg, method), init=source, source=source,
                                    conditional=needs.conditional))
        elif is_finetuned(cfg, method):
            second.append(TrainSpec(method, method, method_steps(cfg, method), init=cfg.train.init_from))
        else:
            first.append(TrainSpec(method, method, method_steps(cfg, method)))
    return [w for w in (first, second) if w]


def weights_path(cfg: Config, ref: str | None, check: bool = True) -> str | None:
    """A spec name of this run (train/<name>/model.pt) or a model.pt path, as an absolute path."""
    if not ref:
        return None
    own = cfg.run_dir / "train" / ref / "model.pt"
    path = own if (ref in cfg.train.methods or ref.endswith("-source")) else Path(ref)
    if check and not path.is_file():
        raise TaildiffError(f"train.init_from={ref}: no weights at {path}; train that method first "
                            "(list it earlier in train.methods) or give an existing model.pt")
    return str(path.resolve())


def init_weights_path(cfg: Config, method: str, check: bool = True) -> str | None:
    """train.init_from as a model.pt path for a method fine-tuned from it (None otherwise)."""
    return weights_path(cfg, cfg.train.init_from, check) if is_finetuned(cfg, method) else None


def _stamp(path: str | None):
    """The weights' content (the same on any node and after a copy), not their path or mtime."""
    from pipeline.common.files import content_stamp

    return content_stamp(path) if path else None


def spec_resample(cfg: Config, spec: TrainSpec):
    return method_resample(cfg, spec.method) if spec.kind == "diffusion" else cfg.resample


def run_key(cfg: Config, data: DatasetArtifact, spec: TrainSpec) -> str:
    """Hash of everything that shapes a spec's weights but the step count (and not logging or
    checkpoint cadence): raising train.steps continues the same Ray Train run from its checkpoint."""
    train = dataclasses.asdict(dataclasses.replace(
        cfg.train, methods=(spec.method,), steps=0, log_every=0, checkpoint_every=0, keep_checkpoints=0,
        max_failures=0, init_from=None, use_gpu=False, torch_threads=None, cpus_per_worker=1.0))
    train.pop("finetune_steps")  # a step count, like steps
    finetune_lr = train.pop("finetune_lr")  # shapes only what starts from other weights:
    if spec.init and finetune_lr is not None:
        train["lr"] = finetune_lr
    sections = used_sections(spec.method) | ({spec.section} if spec.section else set())
    payload = {"data": data.manifest["config_hash"], "resample": dataclasses.asdict(spec_resample(cfg, spec)),
               "model": dataclasses.asdict(cfg.model), "train": train, "seed": cfg.seed, "spec":
               dataclasses.asdict(dataclasses.replace(spec, steps=0, init=None, source=None))}
    payload.update({name: _trained_fields(getattr(cfg, name), spec.kind) for name in sorted(sections)})
    payload["init_weights"] = _stamp(weights_path(cfg, spec.init))  # by content stamp, not by name
    payload["source_weights"] = _stamp(weights_path(cfg, spec.source))
    return stable_hash(payload)


def _trained_fields(options, kind: str) -> dict:
    """A method section's fields that shape a model of `kind`: all of them, unless its options
    dataclass names them (`trained_fields(kind)`, e.g. DiffRC's sampling-time s is not among them)."""
    fields = dataclasses.asdict(options)
    keep = getattr(options, "trained_fields", None)
    return fields if keep is None else {k: fields[k] for k in keep(kind)}


def _artifact_file(spec: TrainSpec) -> str:
    return "features.pt" if spec.kind == "features" else "model.pt"


def _finished(cfg: Config, data: DatasetArtifact, spec: TrainSpec) -> ModelArtifact | None:
    out = (cfg.run_dir / "train" / spec.name).resolve()
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if (manifest.get("run_key") == run_key(cfg, data, spec) and (out / _artifact_file(spec)).is_file()
            and manifest["metrics"].get("step") == spec.steps):
        return ModelArtifact(spec.name, out, manifest["metrics"], skipped=True)
    return None


def run_train(cfg: Config, data: DatasetArtifact, tune_hooks: dict | None = None) -> dict[str, ModelArtifact]:
    """Train (or reuse) every method of `cfg.train.methods` (and what they need); returns
    method -> artifact."""
    for method in cfg.train.methods:
        method_parts(method)  # names checked before Ray places anything
    out: dict[str, ModelArtifact] = {}
    for wave in plan_specs(cfg, data):
        out.update(train_wave(cfg, data, wave, tune_hooks))
    return {m: out[m] for m in cfg.train.methods}


def train_wave(cfg: Config, data: DatasetArtifact, specs: list[TrainSpec],
               tune_hooks: dict | None = None) -> dict[str, ModelArtifact]:
    """One wave: every unfinished spec as a job of TorchTrainer runs of at most MAX_JOBS_PER_FIT jobs."""
    results: dict[str, ModelArtifact] = {}
    for chunk in chunked(specs, MAX_JOBS_PER_FIT):
        results.update(_train_chunk(cfg, data, chunk, tune_hooks))
    return results


def _train_chunk(cfg: Config, data: DatasetArtifact, specs: list[TrainSpec],
                 tune_hooks: dict | None = None) -> dict[str, ModelArtifact]:
    from pipeline.common.progress import stage_progress

    results = {s.name: art for s in specs if (art := _finished(cfg, data, s)) is not None}
    for name, art in results.items():
        log.info("train[%s]: reusing %s (step %s)", name, art.path, art.metrics.get("step"))
    todo = [s for s in specs if s.name not in results]
    if not todo:
        return results
    from pipeline.common.storage import storage_of

    use_gpu = resolve_use_gpu(cfg.train.use_gpu, cluster_gpus(), "train")
    keys = {s.name: run_key(cfg, data, s) for s in specs}
    storage = (cfg.run_dir / "train" / "ray").resolve()
    # named after the whole wave, finished jobs included, so a rerun resumes the same Ray run
    name = f"{'-'.join(s.name for s in specs).replace('+', '-')[:80]}-{stable_hash(keys)}"
    jobs = [_job(cfg, data, s, keys[s.name], use_gpu, tune_hooks) for s in todo]
    pending = [j for j in jobs if not _exported(cfg, j.config)]  # ended but not published: not redone
    for job in jobs:
        if job.name not in {j.name for j in pending}:  # e.g. its driver was killed between the job's export and the publish
            log.info("train[%s]: its run had ended (export in %s); publishing it, nothing retrained",
                     job.name, job.config["out_dir"])
    hooks = tune_hooks or {}
    with (contextlib.nullcontext() if tune_hooks else stage_progress("train")):  # a Tune trial has no terminal
        run_jobs("pipeline.stages.s2_train_loop:train_job", pending, name=name, storage=storage,
                 shared=storage_of(cfg), output_dir=cfg.output_dir,
                 scaling=Scaling(cfg.train.num_workers, use_gpu, cfg.train.cpus_per_worker),
                 keep=cfg.train.keep_checkpoints, max_failures=cfg.train.max_failures, callbacks=hooks.get("callbacks"),
                 what=f"training {', '.join(s.name for s in todo)}",
                 pending=lambda js: [j for j in js if not _exported(cfg, j.config)])
    for spec in todo:
        results[spec.name] = _finish(cfg, data, spec, keys[spec.name], storage / name, use_gpu)
    return results


def work_dir(cfg: Config, spec: TrainSpec, key: str) -> Path:
    """Where a spec's run writes while it trains (loss.csv, the export), per key: a failed or
    changed run never touches the finished train/<name>/, which is replaced only when it ends."""
    return (cfg.run_dir / "train" / ".work" / f"{spec.name.replace('+', '-')}-{key}").resolve()


def _exported(cfg: Config, job_config: dict) -> bool:
    """A job's artifact + final.json exist (written by its rank 0 when it ended; pulled from shared
    storage when rank 0 ran on another node)."""
    from pipeline.common.storage import pull_path, storage_of

    out = pull_path(job_config["out_dir"], storage_of(cfg), job_config["output_dir"])
    return (out / "final.json").is_file() and (out / job_config["artifact"]).is_file()


def _job(cfg: Config, data: DatasetArtifact, spec: TrainSpec, key: str, use_gpu: bool, tune_hooks) -> Job:
    from pipeline.common.streams import resampled_stream

    out = work_dir(cfg, spec, key)
    final = (cfg.run_dir / "train" / spec.name).resolve()
    if not out.exists() and (final / "loss.csv").is_file():  # resuming a run whose export was lost:
        out.mkdir(parents=True)  # its rows up to the checkpoint's step are kept (LossLog drops the rest)
        shutil.copy2(final / "loss.csv", out / "loss.csv")
    out.mkdir(parents=True, exist_ok=True)  # per key: a final.json here is this very run's
    per_worker = cfg.train.batch_size // cfg.train.num_workers
    rcfg = dataclasses.replace(spec_resample(cfg, spec), batch_size=per_worker)
    if spec.kind == "diffusion":
        for diagnostic in _needs(cfg, spec.method).diagnostics:
            plot_diagnostic(cfg, data, spec.method, diagnostic, rcfg, out)
    guidance = None
    if spec.kind == "diffusion" and _needs(cfg, spec.method).guidance:
        guidance = {"kind": _needs(cfg, spec.method).guidance, "scale": _needs(cfg, spec.method).guidance_scale,
                    "weights": str((cfg.run_dir / "train" / f"{spec.name}-features" / "features.pt").resolve())}
    # run_dir absolute: a Ray Train worker runs in its own artifacts folder, where a relative
    # output_dir (the presets' "outputs") would put the TensorBoard logs
    config = {"config": cfg.to_dict(), "run_dir": str(cfg.run_dir.resolve()),
              "output_dir": str(Path(cfg.output_dir).resolve()), "method": spec.method,
              "name": spec.name, "kind": spec.kind,
              "loop": LOOPS[spec.kind], "steps": spec.steps, "manifest": data.manifest, "out_dir": str(out),
              "artifact": _artifact_file(spec), "init_weights": weights_path(cfg, spec.init),
              "source_weights": weights_path(cfg, spec.source), "conditional": spec.conditional,
              "section": spec.section, "guidance": guidance, "use_gpu": use_gpu, "start_epoch": 0,
              "lr": cfg.train.finetune_lr if spec.init and cfg.train.finetune_lr is not None else cfg.train.lr}
    if (tune_hooks or {}).get("proxy"):
        config["proxy"] = tune_hooks["proxy"]
    seed = derive_seed(cfg.seed, "resample", spec.name)

    def stream(start_epoch: int):
        config["start_epoch"] = start_epoch
        return resampled_stream(data.split_dir("train"), data.image_shape, rcfg, seed=seed, start_epoch=start_epoch,
                                num_classes=data.num_classes, classes=spec.classes)

    return Job(name=spec.name, config=config, stream=stream)


def _finish(cfg: Config, data: DatasetArtifact, spec: TrainSpec, key: str, ray_run: Path,
            use_gpu: bool) -> ModelArtifact:
    from pipeline.common.files import publish_dir

    work, out = work_dir(cfg, spec, key), (cfg.run_dir / "train" / spec.name).resolve()
    from pipeline.common.storage import pull_path, storage_of

    pull_path(work, storage_of(cfg), cfg.output_dir)  # rank 0 may have run on another node
    try:
        metrics = json.loads((work / "final.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise TaildiffError(f"training {spec.name} ended without its export; see the Ray logs under {ray_run}") from None
    plot_loss_curve(work / "loss.csv", work / "loss.png", title=f"{cfg.name}: {spec.name}")
    write_json(work / "metrics.json", metrics)
    manifest = {"method": spec.method, "name": spec.name, "spec": dataclasses.asdict(spec), "run_key": key,
                "ray_run": str(ray_run), "metrics": metrics, "dataset": str(data.path),
                "init_from": weights_path(cfg, spec.init), "source": weights_path(cfg, spec.source),
                "resample": spec_resample(cfg, spec).mode, "use_gpu": use_gpu, "config": cfg.to_dict()}
    write_json(work / "manifest.json", manifest)  # marks the model finished ...
    publish_dir(work, out)  # ... and only now does it replace train/<name>/
    parts = [f"{metrics['step']} steps"]  # a feature network's job reports neither loss nor img/s (its loss.csv has loss_pc)
    parts += [f"final loss {metrics['loss']:.4f}"] if "loss" in metrics else []
    parts += [f"{metrics['images_per_second']:.1f} img/s"] if "images_per_second" in metrics else []
    parts += [f"{metrics['fit_seconds']:.0f} s"] if "fit_seconds" in metrics else []
    log.info("train[%s]: %s", spec.name, ", ".join(parts))
    return ModelArtifact(spec.name, out, metrics, skipped=False)


def plot_loss_curve(csv_path: Path, png_path: Path, title: str) -> None:
    """One panel per logged term (loss, mse, cbdm_reg, oc_moved, ...) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not csv_path.is_file():
        return
    lines = [line.split(",") for line in csv_path.read_text().splitlines()]
    header, rows = lines[0], [r for r in lines[1:] if r and r[0]]
    if not rows:
        return
    cols = {name: [float(r[i]) for r in rows] for i, name in enumerate(header)}
    meta = {"step", "epoch", "lr", "images_per_second", "data_wait_fraction"}
    names = [n for n in header if n not in meta]
    fig, axes = plt.subplots(1, len(names), figsize=(3.0 * len(names), 2.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        ax.plot(cols["step"], cols[name])
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def plot_diagnostic(cfg: Config, data: DatasetArtifact, method: str, name: str, rcfg, out: Path,
                    batch: int = 256) -> Path:
    """A method's diagnostic curve (e.g. OC's transfer probability against t, its Fig. 7) on a
    batch of the run's own training stream, written before training starts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from models.data.images import to_model_space
    from models.data.resampling import epoch_plan
    from pipeline.common.shards import read_split

    arrays = read_split(data.split_dir("train"), data.image_shape)
    plan = epoch_plan(arrays["label"], rcfg.mode, seed=cfg.seed, epoch=0, power=rcfg.power, batch_size=batch,
                      epoch_size=max(batch, len(arrays["label"])))[:batch]
    x0 = to_model_space(torch.from_numpy(arrays["image"][plan]), cfg.model.image_size)
    entry = next(m for m in method_parts(method) if m.diagnostic is not None)
    curve = entry.diagnostic(name, getattr(cfg, entry.section), x0, make_schedule(cfg),
                             generator=torch.Generator().manual_seed(0))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.csv").write_text("x,y\n" + "".join(f"{x},{y:.6f}\n" for x, y in zip(curve["x"], curve["y"])))
    fig, ax = plt.subplots(figsize=(5.0, 3.2))
    ax.plot(curve["x"], curve["y"], marker=".")
    if curve.get("marker_x") is not None:
        ax.axvline(curve["marker_x"], color="grey", linestyle="--", label=curve.get("marker_label"))
        ax.legend(fontsize=8)
    ax.set_xlabel(curve["xlabel"])
    ax.set_ylabel(curve["ylabel"])
    ax.set_title(f"{method}: {name} on a batch of {batch} ({rcfg.mode} stream)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=110)
    plt.close(fig)
    return out / f"{name}.png"
