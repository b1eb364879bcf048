"""`python pipeline/run.py export --checkpoint <run>/train/<method>/model.pt --out <dir>`: a trained
model as a diffusers folder.

    <dir>/unet/                          UNet2DModel.save_pretrained (config.json + safetensors)
    <dir>/scheduler/scheduler_config.json  a DDIMScheduler with the run's β_t (taildiff's ddim sampler)
    <dir>/taildiff.json                  labels, image shape, method, step, where it came from
    <dir>/README.md                      the model card: data, LT profile, labels, CFG, metrics

The conversion itself is models/diffusion/diffusers_export.py; this module only reads the
checkpoint, writes the folder (a temp folder, then one rename) and fills in the card. No Ray.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import uuid
from pathlib import Path

from pipeline.errors import TaildiffError

CHECKPOINT_FIX = "give the model.pt of a finished train stage (<run>/train/<method>/model.pt)"


def load_checkpoint(path: str | Path, device: str = "cpu") -> dict:
    """net (EMA, eval), cfg, manifest, extras (method, conditional, guidance) and step of a model.pt,
    or a TaildiffError naming the fix."""
    import torch

    from pipeline.common.artifacts import load_model, model_extras

    path = Path(path)
    if not path.is_file():
        raise TaildiffError(f"checkpoint {path} not found: {CHECKPOINT_FIX}")
    try:
        net, cfg, manifest = load_model(path, device)
        extras = model_extras(path)
        step = torch.load(path, map_location="cpu", weights_only=True).get("step")
    except TaildiffError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable or foreign file is the same user error
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise TaildiffError(f"{path} is not a taildiff model.pt ({first}): {CHECKPOINT_FIX}") from None
    return {"net": net, "cfg": cfg, "manifest": manifest, "extras": extras,
            "step": None if step is None else int(step), "path": path.resolve()}


def new_output_dir(out: str | Path) -> tuple[Path, Path]:
    """(final path, temp folder beside it) for a folder output that must not exist or be empty."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TaildiffError(f"output {out} exists and is not an empty folder: pass a new --out path "
                            "(or remove that one)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".tmp-{out.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as exc:
        raise TaildiffError(f"cannot write beside {out} ({exc.strerror or exc}): pass an --out in a writable "
                            "folder") from None
    return out, tmp


def finish_output_dir(tmp: Path, out: Path) -> None:
    """Move the finished temp folder into place (over an empty folder of that name)."""
    if out.is_dir():
        out.rmdir()  # empty, checked before the work started
    os.rename(tmp, out)


def run_metrics(checkpoint: Path) -> dict | None:
    """<run>/evaluation/<method>/metrics.json of a <run>/train/<method>/model.pt, when evaluated."""
    path = checkpoint.parent.parent.parent / "evaluation" / checkpoint.parent.name / "metrics.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def export(checkpoint: str | Path, out: str | Path) -> Path:
    from models.diffusion.diffusers_export import build_scheduler, to_diffusers
    from pipeline.common.artifacts import make_schedule

    ck = load_checkpoint(checkpoint)
    out, tmp = new_output_dir(out)
    try:
        cfg = ck["cfg"]
        schedule = make_schedule(cfg)
        try:
            unet = to_diffusers(ck["net"], sample_size=cfg.model.image_size)
        except ValueError as exc:
            raise TaildiffError(f"cannot export {ck['path']}: {exc}") from None
        unet.save_pretrained(tmp / "unet")
        build_scheduler(schedule, "ddim").save_pretrained(tmp / "scheduler")
        info = export_info(ck)
        (tmp / "taildiff.json").write_text(json.dumps(info, indent=2))
        (tmp / "README.md").write_text(model_card(ck, info, run_metrics(ck["path"])))
        finish_output_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def export_info(ck: dict) -> dict:
    cfg, manifest = ck["cfg"], ck["manifest"]
    names = list(manifest["class_names"])
    return {"source": str(ck["path"]), "method": ck["extras"]["method"], "step": ck["step"],
            "conditional": ck["extras"]["conditional"], "guidance": ck["extras"]["guidance"],
            "class_names": names, "class_counts": manifest.get("class_counts"), "null_label": len(names),
            "image_shape": manifest["image_shape"], "sample_size": cfg.model.image_size,
            "cond_drop": cfg.model.cond_drop, "schedule": cfg.model.schedule, "timesteps": cfg.model.timesteps,
            "sample": {"sampler": cfg.sample.sampler, "steps": cfg.sample.steps,
                       "omega": cfg.sample.omega_for(ck["extras"]["method"])}}


def _num(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _metrics_table(m: dict) -> list[str]:
    def ci(key: str) -> str:
        interval = m.get(f"{key}_interval")
        return _num(m.get(key), 2) + (f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else "")

    def rate(entry) -> str:
        return "n/a" if not entry else f"{100 * entry['rate']:.1f}%"

    fidelity = m.get("class_fidelity") or {}
    extractor = (m.get("extractor") or {}).get("extractor", "?")
    rows = [("FID (all classes) [95% CI]", ci("fid")), ("FID, many-shot third", ci("fid_thirds_many")),
            ("FID, medium third", ci("fid_thirds_medium")), ("FID, few-shot third", ci("fid_thirds_few")),
            ("class fidelity (all / few)", f"{rate(fidelity.get('all'))} / {rate(fidelity.get('few'))}"),
            ("precision / recall", f"{_num(m.get('precision'))} / {_num(m.get('recall'))}"),
            ("memorised (all)", _num((m.get("memorization") or {}).get("all")))]
    return [f"Evaluated by the run on {m.get('num_samples', '?')} generated images, features: `{extractor}` "
            "(taildiff's evaluate stage; FID groups are thirds of the classes by training count).", "",
            "| metric | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]]


def model_card(ck: dict, info: dict, metrics: dict | None) -> str:
    cfg, manifest = ck["cfg"], ck["manifest"]
    names, counts = info["class_names"], info["class_counts"] or ["?"] * len(info["class_names"])
    N, (H, W, C), S = info["null_label"], manifest["image_shape"], cfg.model.image_size
    method, omega = info["method"], info["sample"]["omega"]
    imb = manifest.get("imbalance_ratio")
    lines = ["---", "library_name: diffusers", "tags: [diffusion, class-conditional, long-tailed, taildiff]", "---", "",
             f"# taildiff `{method}` on long-tailed {manifest.get('dataset', cfg.data.dataset)}", "",
             f"A class-conditional DDPM UNet (Ho et al. 2020, the `{cfg.model.preset}` preset) trained with taildiff's "
             f"`{method}` method for {info['step']} steps, exported to diffusers' `UNet2DModel` (same outputs to "
             "float round-off).", "",
             "## Training data", "",
             f"- dataset: `{manifest.get('dataset', cfg.data.dataset)}`, images {H}×{W}×{C} (the network runs at "
             f"{S}×{S}{'; smaller images are centred on a −1 (black) pad' if (H, W) != (S, S) else ''})",
             f"- long-tail profile: `{manifest.get('profile', cfg.data.profile)}`, imb_factor "
             f"{manifest.get('imb_factor', cfg.data.imb_factor)}, imbalance n_max/n_min "
             f"{'n/a' if imb is None else f'{imb:g}'}, {manifest.get('num_train', '?')} training images", "",
             "| label | class | training images |", "|---|---|---|",
             *[f"| {i} | {name} | {n} |" for i, (name, n) in enumerate(zip(names, counts))],
             f"| {N} | (null: no label) | — |", "",
             "## Labels and guidance", "",
             f"Labels 0–{N - 1} are the classes above; label **{N}** is the null label ∅ used for classifier-free "
             f"guidance: ε̂ = (1+ω)·ε(x_t, y) − ω·ε(x_t, ∅). The run sampled with ω = {omega} "
             f"({cfg.sample.sampler}, {cfg.sample.steps} steps).",
             ""]
    if not info["conditional"]:
        lines += [f"This is an **unconditional** backbone of the method: always pass label {N}.", ""]
    if info["guidance"]:
        g = info["guidance"]
        lines += [f"The method samples with `{g['kind']}` classifier guidance (scale {g['scale']}) from a feature "
                  "network that this export does **not** include: the loop below is classifier-free guidance only.",
                  ""]
    lines += ["## Training", "",
              f"- method `{method}`, {info['step']} steps, batch {cfg.train.batch_size}, lr {cfg.train.lr}, "
              f"EMA {cfg.train.ema_decay} (these are the EMA weights), label dropout p = {cfg.train.p_uncond} "
              f"(`cond_drop: {cfg.model.cond_drop}`)",
              f"- noise schedule `{cfg.model.schedule}`, T = {cfg.model.timesteps}; the scheduler config carries the "
              "β_t table exactly (`trained_betas`)", "",
              "## Sampling with diffusers", "",
              "```python", "import torch", "from diffusers import DDIMScheduler, UNet2DModel", "",
              'unet = UNet2DModel.from_pretrained("<this folder>", subfolder="unet").eval()',
              'scheduler = DDIMScheduler.from_pretrained("<this folder>", subfolder="scheduler")',
              f"y = torch.tensor([0, 1, {N - 1}])  # class labels", f"null, omega = torch.full_like(y, {N}), {omega}",
              f"x = torch.randn(len(y), {C}, {S}, {S})", f"scheduler.set_timesteps({cfg.sample.steps})",
              "with torch.no_grad():", "    for t in scheduler.timesteps:",
              "        cond, uncond = unet(torch.cat([x, x]), t, class_labels=torch.cat([y, null])).sample.chunk(2)",
              "        eps = (1 + omega) * cond - omega * uncond",
              "        x = scheduler.step(eps, t, x, eta=0.0, use_clipped_model_output=True).prev_sample",
              f"top, left = ({S} - {H}) // 2, ({S} - {W}) // 2",
              f"images = ((x[:, :, top:top + {H}, left:left + {W}].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)",
              "```", "",
              "`use_clipped_model_output=True` makes the step taildiff's DDIM (ε re-derived from the clipped x̂_0). "
              "For ancestral DDPM: `DDPMScheduler.from_pretrained(..., subfolder=\"scheduler\", "
              "variance_type=\"fixed_large\", clip_sample=False)` and `set_timesteps(" f"{cfg.model.timesteps})`.",
              "Or without diffusers: `python pipeline/run.py generate --checkpoint <model.pt> --classes 0,1 --n 8 "
              "--out grid.png`.", "",
              "## Metrics", ""]
    lines += _metrics_table(metrics) if metrics else ["No evaluation of this model was found next to its run."]
    lines += ["", f"Source: `{info['source']}`.", ""]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pipeline/run.py export", description="Export a trained model.pt as a "
                                     "diffusers folder: UNet2DModel, DDIM scheduler config, model card.")
    parser.add_argument("--checkpoint", required=True, help="a model.pt of the train stage")
    parser.add_argument("--out", required=True, help="the folder to write (must not exist, or be empty)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        out = export(args.checkpoint, args.out)
    except TaildiffError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"export: {out} (unet/, scheduler/, README.md)")
    return 0
