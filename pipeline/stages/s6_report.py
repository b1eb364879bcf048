"""Report stage: one `report.md` in the run folder gathering every stage's tables and images.

Sections: dataset (counts table + plot), training (per method: steps, time, loss plot),
generation (the evaluation table, per-class FID plots), sample grids per method (evaluation
and augmentation sets), classification (the classify table, the real / synthetic composition
of each augmented set, confusion matrices). Images are linked by paths relative to the report and
all inside the run folder (an image from elsewhere, the dataset's class_counts.png, is copied into
`report_assets/`), so the run folder can be copied and viewed as is. Beside it, `report.html`
(s6_report_html.py): the same report as one self-contained page, images embedded, tables sortable.
Rebuilt on every run: it reads only finished artifacts and takes well under a second.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from pipeline.config import Config
from pipeline.common.artifacts import DatasetArtifact
from pipeline.stages.s6_report_html import write_report_html

ASSETS = "report_assets"


def _rel(path: Path | str, base: Path) -> str:
    return os.path.relpath(Path(path).resolve(), base.resolve())


def _image(path: Path | str | None, base: Path, alt: str) -> list[str]:
    """A markdown image line; an image outside the run folder is copied into report_assets/ first, so
    every link stays inside the run folder and a copied run folder shows every image."""
    if path is None or not Path(path).is_file():
        return []
    path = Path(path).resolve()
    if not path.is_relative_to(base.resolve()):
        local = base / ASSETS / (re.sub(r"[^A-Za-z0-9]+", "_", alt).strip("_") + path.suffix)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(local.name + ".tmp")
        shutil.copyfile(path, tmp)
        os.replace(tmp, local)
        path = local
    return [f"![{alt}]({_rel(path, base)})", ""]


def dataset_section(data: DatasetArtifact, base: Path) -> list[str]:
    m = data.manifest
    lines = ["## Dataset", "",
             f"`{m['dataset']}`, profile `{m['profile']}`, imbalance {m['imbalance_ratio']:.0f}:1, "
             f"{m['num_train']} training images (LT), {m['num_test']} test images; folder `{_rel(data.path, base)}`.", "",
             "| class | training images |", "|---|---|"]
    lines += [f"| {name} | {n} |" for name, n in zip(m["class_names"], m["class_counts"])]
    return lines + [""] + _image(data.path / "class_counts.png", base, "class counts")


def methods_section(cfg: Config) -> list[str]:
    """The run's methods as the registry describes them, with the knob values this run used."""
    import dataclasses

    from models.methods.registry import method_parts

    lines = ["## Methods", "", "| method | parts | paper | what it does | knobs (this run) |", "|---|---|---|---|---|"]
    for name in cfg.train.methods:
        parts = method_parts(name)
        knobs = []
        for m in parts:
            if m.section:
                values = dataclasses.asdict(getattr(cfg, m.section))
                knobs.append(", ".join(f"{m.section}.{k}={v}" for k, v in values.items()))
        lines.append(f"| {name} | {' + '.join(m.name for m in parts)} | {'; '.join(m.paper for m in parts)} | "
                     f"{'; '.join(m.summary for m in parts)} | {'; '.join(dict.fromkeys(knobs)) or '—'} |")
    return lines + [""]


def devices_line(outputs: dict) -> list[str]:
    devices = outputs.get("devices")
    if not devices:
        return []
    parts = [f"{section}: {'GPU' if d['use_gpu'] else 'CPU'}{' bf16' if d['bf16'] else ''}"
             f"{' channels_last' if d['channels_last'] else ''}{' fused optimiser' if d['fused_optimizer'] else ''}"
             for section, d in devices.items() if isinstance(d, dict)]
    return [f"Devices (`use_gpu` resolved against the cluster, {devices.get('cluster_gpus', 0):g} GPUs): "
            + "; ".join(parts) + ".", ""]


def training_section(models: dict, base: Path) -> list[str]:
    lines = ["## Training", "", "| method | steps | final loss | img/s | fit seconds | reused |", "|---|---|---|---|---|---|"]
    for method, art in models.items():
        m = art.metrics
        lines.append(f"| {method} | {m.get('step')} | {m.get('loss', float('nan')):.4f} | "
                     f"{m.get('images_per_second', float('nan')):.1f} | {m.get('fit_seconds', 'n/a')} | {art.skipped} |")
    lines.append("")
    for method, art in models.items():
        lines += _image(art.path / "loss.png", base, f"{method} loss")
        lines += _image(art.path / "oc_transfer.png", base, f"{method} OC transfer probability")
    return lines


def generation_section(cfg: Config, evaluations: dict, base: Path) -> list[str]:
    table = cfg.run_dir / "evaluation" / "table.md"
    s = cfg.sample
    lines = ["## Generation quality", "",
             f"{s.sampler.upper()} {s.steps} steps, ω = {s.omega_label()}, plan `{s.plan}`.", ""]
    if table.is_file():
        lines += [table.read_text().rstrip(), ""]
    for method, art in evaluations.items():
        lines += _image(art.path / "per_class_fid.png", base, f"{method} per-class FID")
        lines += _image(art.path / "memorization.png", base, f"{method} memorisation")
    return lines


def samples_section(cfg: Config, base: Path) -> list[str]:
    lines = ["## Samples", ""]
    root = cfg.run_dir / "samples"
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []:
        manifest = folder / "manifest.json"
        if not manifest.is_file():
            continue
        meta = json.loads(manifest.read_text())
        purpose = ("augmentation set (classify)" if folder.name.endswith("-augment") else
                   "its frozen source model (head classes only), the evaluation set's first noises"
                   if folder.name.endswith("-source") else
                   "without its sampling-time guidance (s = 0), the evaluation set's first noises"
                   if folder.name.endswith("-unguided") else "evaluation set")
        lines += [f"### {folder.name}: {purpose}, {meta['num_images']} images, "
                  f"{meta['sample']['sampler']} {meta['sample']['steps']} steps, ω = {meta['sample']['omega']}", ""]
        lines += _image(folder / "grid.png", base, f"{folder.name} samples")
    return lines


def classification_section(cfg: Config, classifiers: dict, base: Path) -> list[str]:
    table = cfg.run_dir / "classify" / "table.md"
    lines = ["## Classification (ResNet-32 on the balanced test set)", ""]
    if table.is_file():
        lines += [table.read_text().rstrip(), ""]
    augmented = list({art.arm.method: art for art in classifiers.values() if art.arm.method is not None}.values())
    if augmented:  # one column per method: its recipes share the training set
        names = augmented[0].composition["class_names"]
        lines += ["### Training-set composition (real + synthetic per class)", "",
                  "| class | real | " + " | ".join(f"{a.arm.method} synthetic (filtered out)" for a in augmented) + " |",
                  "|" + "---|" * (2 + len(augmented))]
        for c, name in enumerate(names):
            cells = " | ".join(f"{a.composition['synthetic'][c]} ({a.composition['filtered_out'][c]})" for a in augmented)
            lines.append(f"| {name} | {augmented[0].composition['real'][c]} | {cells} |")
        lines.append("")
    matrices = [line for name, art in classifiers.items()
                for line in _image(art.path / "confusion.png", base, f"{name} confusion matrix")]
    return lines + (["### Confusion matrices", "", *matrices] if matrices else [])


def run_report(cfg: Config, outputs: dict) -> Path:
    """Write <run>/report.md and <run>/report.html from the stages' artifacts (atomically); returns
    report.md's path."""
    base = cfg.run_dir
    lines = [f"# taildiff report: {cfg.name}", "",
             f"Resolved config: [`config.json`](config.json) (seed {cfg.seed}); stages run: {', '.join(cfg.stages)}.", ""]
    lines += devices_line(outputs)
    lines += dataset_section(outputs["data"], base)
    if outputs.get("train"):
        lines += methods_section(cfg)
        lines += training_section(outputs["train"], base)
    if outputs.get("evaluate"):
        lines += generation_section(cfg, outputs["evaluate"], base)
    if outputs.get("sample"):
        lines += samples_section(cfg, base)
    if outputs.get("classify"):
        lines += classification_section(cfg, outputs["classify"], base)
    text = "\n".join(lines) + "\n"
    path = base / "report.md"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    write_report_html(text, base, f"taildiff report: {cfg.name}")
    return path
