"""`python pipeline/run.py generate --checkpoint <model.pt> --classes 7,8,9 --n 64 --out <dir|grid.png>`:
images of chosen classes from a trained model, no config and no Ray.

Image k of class c starts from the noise of seed derive_seed(--seed, "generate", c, k), so an image
is the same whatever --n, --classes order or --batch-size it was drawn with.
  --out grid.png   one PNG, a row per class, and grid.json: the (class, k, seed) of every image
  --out <folder>   images/part-00000.parquet (image uint8 H×W×C, label, k, seed), png/ one file per
                   image, grid.png, and generate.json (checkpoint, sampler, steps, ω, seeds)
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

import numpy as np

from pipeline.errors import TaildiffError
from pipeline.tools.export import finish_output_dir, load_checkpoint, new_output_dir

DEVICES = ("auto", "cpu", "cuda")


def parse_args(argv: list[str]) -> argparse.Namespace:
    from models.diffusion.samplers import SAMPLERS

    p = argparse.ArgumentParser(prog="pipeline/run.py generate", description="Images of chosen classes from a "
                                "trained model.pt, with per-image seeds (no config, no Ray).")
    p.add_argument("--checkpoint", required=True, help="a model.pt of the train stage")
    p.add_argument("--out", required=True, help="a .png path (one grid) or a folder (must not exist, or be empty)")
    p.add_argument("--classes", default=None, help="comma-separated label ids (default: every class)")
    p.add_argument("--n", type=int, default=8, help="images per class (default: %(default)s)")
    p.add_argument("--sampler", default=None, help=f"{' | '.join(SAMPLERS)} (default: the run's)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the run's; ddpm visits all T)")
    p.add_argument("--omega", type=float, default=None, help="CFG ω in (1+ω)ε(x,y) − ωε(x,∅) (default: the run's)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise level (ddim only; default 0)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="a method's sampling-time guidance scale (DiffRC's s; default: the model's own)")
    p.add_argument("--guidance-norm", default="rms", choices=("rms", "l2"),
                   help="normalisation of the guidance gradient: unit RMS or unit norm per image (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="base seed of the per-image seeds (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward batch (results do not depend on it)")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one) | cpu | cuda")
    p.add_argument("--bf16", action="store_true", help="autocast the network in bfloat16")
    return p.parse_args(argv)


def check_options(args: argparse.Namespace) -> str:
    """The checks that need no checkpoint; returns the torch device name."""
    import torch

    from models.diffusion.samplers import SAMPLERS

    if args.n < 1:
        raise TaildiffError(f"--n {args.n}: pass --n 1 or more (images per class)")
    if args.batch_size < 1:
        raise TaildiffError(f"--batch-size {args.batch_size}: pass 1 or more")
    if args.sampler is not None and args.sampler not in SAMPLERS:
        raise TaildiffError(f"unknown sampler {args.sampler!r}: pass --sampler one of {', '.join(SAMPLERS)}")
    if args.device not in DEVICES:
        raise TaildiffError(f"unknown device {args.device!r}: pass --device one of {', '.join(DEVICES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise TaildiffError("--device cuda but torch sees no GPU: pass --device cpu (or auto)")
    if args.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return args.device


def parse_classes(text: str | None, names: list[str]) -> list[int]:
    K = len(names)
    if text is None:
        return list(range(K))
    try:
        classes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise TaildiffError(f"--classes {text!r} is not a list of label ids: pass e.g. --classes 0,3,7") from None
    bad = [c for c in classes if not 0 <= c < K]
    if not classes or bad:
        listing = ", ".join(f"{i}={n}" for i, n in enumerate(names))
        raise TaildiffError(f"--classes {text!r}: {'ids ' + str(bad) + ' are' if bad else 'no id is'} outside "
                            f"[0, {K}); pass ids of this model's classes ({listing})")
    if len(set(classes)) != len(classes):
        raise TaildiffError(f"--classes {text!r} repeats an id: pass each class once (--n sets how many)")
    return classes


def plan(classes: list[int], n: int, seed: int) -> dict[str, np.ndarray]:
    """(label, k, seed) of every image, class by class."""
    from models.seeding import derive_seed

    labels = np.repeat(np.asarray(classes, dtype=np.int64), n)
    ks = np.tile(np.arange(n, dtype=np.int64), len(classes))
    seeds = np.array([derive_seed(seed, "generate", int(c), int(k)) for c, k in zip(labels, ks)], dtype=np.int64)
    return {"label": labels, "k": ks, "seed": seeds}


def sample_images(ck: dict, rows: dict, *, sampler: str, steps: int, omega: float, eta: float,
                  guidance_scale: float | None, batch_size: int, device: str, bf16: bool,
                  guidance_norm: str = "rms") -> np.ndarray:
    """uint8 (N, H, W, C) images of the plan's rows."""
    import torch

    from models.data.images import to_uint8_images
    from models.diffusion.guidance import ImageNoise
    from models.diffusion.samplers import generate
    from pipeline.common.artifacts import make_schedule
    from pipeline.common.generation import build_denoiser

    cfg, (H, W, C) = ck["cfg"], ck["manifest"]["image_shape"]
    net, schedule, size = ck["net"].to(device), make_schedule(cfg), cfg.model.image_size
    try:
        denoiser = build_denoiser(net, ck["path"], omega, bf16, schedule, device, guidance_scale, guidance_norm)
    except (OSError, KeyError, RuntimeError) as exc:
        raise TaildiffError(f"cannot set up this model's sampling guidance ({type(exc).__name__}: "
                            f"{str(exc)[:200]}): keep the run folder the model.pt came from in place (the "
                            "guidance network's features.pt lives beside it)") from None
    out, total = [], len(rows["label"])
    for start in range(0, total, batch_size):
        part = slice(start, start + batch_size)
        noise = ImageNoise(rows["seed"][part].tolist(), (C, size, size), device)
        y = torch.as_tensor(rows["label"][part], device=device)
        x = generate(denoiser, schedule, noise, y, sampler=sampler, steps=steps, eta=eta)  # (b, C, S, S)
        out.append(to_uint8_images(x.float(), H, W).cpu().numpy())  # (b, H, W, C)
        print(f"generate: {min(total, start + batch_size)}/{total} images", file=sys.stderr)
    return np.concatenate(out)


def _parquet(folder: Path, images: np.ndarray, rows: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.common.shards import tensor_array

    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table({"image": tensor_array(images), "label": pa.array(rows["label"]), "k": pa.array(rows["k"]),
                      "seed": pa.array(rows["seed"])})
    pq.write_table(table, folder / "part-00000.parquet")


def _png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)


def run_generate(args: argparse.Namespace) -> Path:
    from models.diffusion.samplers import sampler_timesteps
    from pipeline.common.files import write_json
    from pipeline.common.generation import write_grid

    device = check_options(args)
    to_grid = str(args.out).lower().endswith(".png")
    out = Path(args.out)
    if not to_grid:  # before the model is loaded: a bad --out fails fast
        out, tmp = new_output_dir(out)
    try:
        ck = load_checkpoint(args.checkpoint)
        cfg, manifest = ck["cfg"], ck["manifest"]
        classes = parse_classes(args.classes, list(manifest["class_names"]))
        sampler = args.sampler or cfg.sample.sampler
        steps = args.steps if args.steps is not None else cfg.sample.steps
        omega = args.omega if args.omega is not None else cfg.sample.omega_for(ck["extras"]["method"])
        try:
            sampler_timesteps(sampler, cfg.model.timesteps, steps)
        except ValueError as exc:
            raise TaildiffError(f"{exc}: pass another --steps") from None
        if args.eta and sampler != "ddim":
            raise TaildiffError(f"--eta is DDIM's noise level; the {sampler} sampler takes none: drop --eta")
        rows = plan(classes, args.n, args.seed)
        started = time.perf_counter()
        images = sample_images(ck, rows, sampler=sampler, steps=steps, omega=omega, eta=args.eta,
                               guidance_scale=args.guidance_scale, batch_size=args.batch_size, device=device,
                               bf16=args.bf16, guidance_norm=args.guidance_norm)
        record = {"checkpoint": str(ck["path"]), "method": ck["extras"]["method"], "model_step": ck["step"],
                  "sampler": sampler, "steps": steps, "omega": omega, "eta": args.eta,
                  "guidance_scale": args.guidance_scale, "guidance_norm": args.guidance_norm, "seed": args.seed, "seed_rule": "derive_seed(seed, "
                  "'generate', class, k)", "classes": classes, "class_names": [manifest["class_names"][c] for c in classes],
                  "n": args.n, "device": device, "bf16": args.bf16, "image_shape": manifest["image_shape"],
                  "seconds": round(time.perf_counter() - started, 2)}
        title = f"{ck['extras']['method']}: {sampler}-{steps} ω={omega} seed={args.seed}"
        per_image = [{"class": int(c), "k": int(k), "seed": int(s)}
                     for c, k, s in zip(rows["label"], rows["k"], rows["seed"])]
        if to_grid:
            return _write_grid_png(out, images, rows, manifest, classes, args.n, title, {**record, "images": per_image})
        _parquet(tmp / "images", images, rows)
        (tmp / "png").mkdir()
        for item, image in zip(per_image, images):
            item["png"] = f"png/c{item['class']}_k{item['k']}.png"
            _png(tmp / item["png"], image)
        record["grid"] = write_grid(tmp / "images", manifest, tmp / "grid.png", args.n, title, classes=classes)
        write_json(tmp / "generate.json", {**record, "images": per_image})
        finish_output_dir(tmp, out)
        return out
    finally:
        if not to_grid:
            shutil.rmtree(tmp, ignore_errors=True)


def _write_grid_png(out: Path, images: np.ndarray, rows: dict, manifest: dict, classes: list[int], n: int,
                    title: str, record: dict) -> Path:
    """grid.png (through a temp name, then renamed) and grid.json beside it."""
    from pipeline.common.files import write_json
    from pipeline.common.generation import write_grid

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TaildiffError(f"cannot write {out} ({exc.strerror or exc}): pass an --out in a writable folder") from None
    tmp = out.parent / f".tmp-{out.stem}-{uuid.uuid4().hex[:8]}"
    try:
        _parquet(tmp / "images", images, rows)
        write_grid(tmp / "images", manifest, tmp / "grid.png", n, title, classes=classes)
        os.replace(tmp / "grid.png", out)
        write_json(out.with_suffix(".json"), {**record, "grid": out.name})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        out = run_generate(args)
    except TaildiffError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"generate: {out}")
    return 0
