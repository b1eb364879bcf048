"""The method registry: every long-tail method, listed once.

A run's method is a `+`-joined list of registry names (`cbdm`, `t2h+cbdm`, `cbdm+diffrop`), so
the papers' combinations are configs, not code. The same registry drives the CLI, the config
schema (each method's options dataclass is its config section), the Tune space checks, and the
README / report method tables. Adding a method = its module + one line below (+ a tune space).
"""
from __future__ import annotations

from models.methods.base import BuildContext, Method, Needs
from models.methods.cbdm import CBDM
from models.methods.compose import DiffusionLoss
from models.methods.ddpm import DDPM
from models.methods.diffrc import DIFFRC, DIFFRC_CFG, PCG, load_prototype_guidance
from models.methods.diffrop import DIFFROP
from models.methods.oc import H2T, OC_FULL, T2H
from models.methods.resample import RS, RS_SQRT
from models.methods.reweight import REWEIGHT

METHODS: dict[str, Method] = {m.name: m for m in (DDPM, CBDM, T2H, H2T, OC_FULL, DIFFROP, DIFFRC, DIFFRC_CFG, PCG,
                                                   REWEIGHT, RS, RS_SQRT)}

# Needs.guidance name -> loader(path, device) of its grad_fn(x_t, t, y) (the direction raising p(y | x_t))
GUIDANCES = {"prototype": load_prototype_guidance}


def method_parts(name: str) -> list[Method]:
    """The registry entries of a (composed) name, checked; `ddpm` adds nothing to others."""
    parts = [p.strip() for p in str(name).split("+") if p.strip()]
    unknown = [p for p in parts if p not in METHODS]
    if not parts or unknown:
        raise ValueError(f"unknown method {name!r}: compose names from {', '.join(METHODS)} with '+'")
    return [METHODS[p] for p in dict.fromkeys(parts)]


def sections() -> dict[str, type]:
    """Config section name -> options dataclass, over the whole registry (t2h/h2t/oc_full share `oc`)."""
    out: dict[str, type] = {}
    for m in METHODS.values():
        if m.section:
            out.setdefault(m.section, m.options)
    return out


def used_sections(name: str) -> set[str]:
    """The config sections a (composed) method reads: a key of any other section does nothing for it."""
    return {m.section for m in method_parts(name) if m.section}


def method_needs(name: str, options: dict) -> Needs:
    """The merged Needs of a composition; one resampling mode and one target transform at most.
    `options`: section name -> options instance."""
    parts = method_parts(name)
    needs = [m.needs(options.get(m.section)) for m in parts]
    modes = {n.resample for n in needs if n.resample}
    transforms = [m.name for m in parts if m.section == "oc"]
    if len(modes) > 1 or len(transforms) > 1:
        clash = sorted(modes) if len(modes) > 1 else transforms
        raise ValueError(f"method {name!r} combines {', '.join(clash)}: use one OC mode and one resampling")
    sources = [n for n in needs if n.source_model]
    guided = [n for n in needs if n.guidance]
    if len(sources) > 1 or len(guided) > 1:
        raise ValueError(f"method {name!r} combines two source models or two guidances: use one")
    return Needs(resample=next(iter(modes), None), source_model=bool(sources),
                 source_steps=sources[0].source_steps if sources else None,
                 guidance=guided[0].guidance if guided else None,
                 guidance_steps=guided[0].guidance_steps if guided else 0,
                 guidance_scale=guided[0].guidance_scale if guided else 0.0,
                 conditional=all(n.conditional for n in needs),
                 diagnostics=tuple(d for n in needs for d in n.diagnostics))


def training_cost(name: str, options: dict) -> float:
    """A training step's cost relative to DDPM's, from the passes each piece adds (equal-compute
    comparisons; benchmarks/bench_methods.py measures the real ratio)."""
    return 1.0 + sum(m.extra_cost(options.get(m.section)) for m in method_parts(name))


def validate_method(name: str, options: dict) -> None:
    """Names, combination rules and the options of every section the method uses."""
    for m in method_parts(name):
        if m.section:
            options[m.section].validate()
    method_needs(name, options)


def make_loss(name: str, options: dict, class_counts, T: int = 1000) -> DiffusionLoss:
    """The loss object of a (composed) method, built from its sections' options and the counts."""
    import torch

    validate_method(name, options)
    ctx = BuildContext(class_counts=torch.as_tensor(list(class_counts), dtype=torch.long), T=T)
    pieces = [m.build(options.get(m.section), ctx) for m in method_parts(name)]
    return DiffusionLoss(pieces, name=name)


def default_options() -> dict:
    """Every section at its defaults (tests, benchmarks)."""
    return {section: cls() for section, cls in sections().items()}
